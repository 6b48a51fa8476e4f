"""The injected graphs of one model: one per call signature plus the decode graph, each made on first
use by one path (capture, then attach every adapter the model owns, in the order they were added), and
the fast variants derived from them (``fast``: causal attention without a mask, the graph without its
output head for the chunked loss), made on first use and dropped whenever their source graph changes."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import fx, nn

from surgeon.capturing import DECODE_KEY, capture, capture_decoder
from surgeon.config import LoraConfig
from surgeon.matching import match
from surgeon.model.adapter_state import AdapterState
from surgeon.passes.attention import causal_attention
from surgeon.passes.head import Head, headless
from surgeon.passes.lora import attach


class GraphSet:
    def __init__(self, base: nn.Module, state: AdapterState):
        self.base, self.state = base, state
        self.graphs: dict[tuple, fx.GraphModule] = {}
        self.derived: dict[tuple, tuple[fx.GraphModule, Head | None]] = {}  # (sig, causal, headless) -> variant
        self.training = True
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> torch.compile(graph)

    def __contains__(self, sig: tuple) -> bool:
        return sig in self.graphs

    def __len__(self) -> int:
        return len(self.graphs)

    def __iter__(self) -> Iterator[fx.GraphModule]:
        return iter(list(self.graphs.values()))

    def any(self) -> fx.GraphModule:
        """Some graph of the model (the default signature's, captured if there is none yet)."""
        if not self.graphs:
            self._store(None, capture(self.base))
        return next(iter(self.graphs.values()))

    def get(self, sig: tuple, call: dict) -> fx.GraphModule:
        if sig not in self.graphs:
            self._store(sig, capture(self.base, call))
        return self.graphs[sig]

    def fast(self, sig: tuple, call: dict, *, causal: bool, cut_head: bool) -> tuple[fx.GraphModule, Head | None]:
        """The graph for ``sig`` with the causal rewrite and/or without its head, where each is exact (a pass
        that does not apply leaves the graph as it was; the head is None unless it was cut)."""
        key = (sig, causal, cut_head)
        if key not in self.derived:
            graph, head = self.get(sig, call), None
            if causal:
                graph = causal_attention(graph, getattr(self.base, "config", None)) or graph
            if cut_head and (cut := headless(graph)) is not None:
                graph, head = cut
            graph.train(self.training)
            self.derived[key] = graph, head
        return self.derived[key]

    def compiled(self, graph: fx.GraphModule) -> Callable:
        """``torch.compile(graph)`` (inductor), made once per graph: dynamo keeps one compiled graph per
        ``train()``/``eval()`` mode on it; inductor's own on-disk caches (FX graph, AOTAutograd; torch's default
        folder, or ``TORCHINDUCTOR_CACHE_DIR``) make a second process start faster."""
        fn = self._compiled.get(graph)
        if fn is None:
            fn = self._compiled[graph] = torch.compile(graph)
        return fn

    def decoder(self) -> fx.GraphModule:
        if DECODE_KEY not in self.graphs:
            graph, _ = capture_decoder(self.base)
            self._store(DECODE_KEY, graph)
        return self.graphs[DECODE_KEY]

    def _store(self, sig: tuple | None, captured: fx.GraphModule) -> None:
        graph = captured
        for config in self.state.configs.values():
            if config.peft_type != "PROMPT_TUNING":  # prompt tuning leaves the graph alone (model/prompting.py)
                graph = attach(graph, match(graph, config), self.state.registry())
        graph.train(self.training)
        self.graphs[sig if sig is not None else graph.meta["surgeon"].signature] = graph

    def attach_new(self, config: LoraConfig) -> None:
        """Every graph calls the adapter just added to the state (new graphs; the old ones are dropped)."""
        self.derived.clear()
        if config.peft_type == "PROMPT_TUNING":
            return
        for sig, graph in list(self.graphs.items()):
            self.graphs[sig] = attach(graph, match(graph, config), self.state.registry())

    def clear(self) -> None:
        """Drop every graph (the base's tensors changed identity): capture again on next use."""
        self.graphs.clear()
        self.derived.clear()

    def rebind(self, live: dict[str, torch.Tensor]) -> None:
        """Point every graph (and every cut-off head) at ``live``'s tensors, by name: FSDP swaps a module's
        parameters between their shards and the gathered tensors around each forward."""
        moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(old) -> (old kept alive: ids stay unique, new)
        for graph in [*self.graphs.values(), *(g for g, _ in self.derived.values())]:
            for name, t in list(itertools.chain(graph.named_parameters(remove_duplicate=False),
                                                graph.named_buffers(remove_duplicate=False))):
                new = live.get(name)
                if new is None or new is t:
                    continue
                owner_path, _, leaf = name.rpartition(".")
                owner = graph.get_submodule(owner_path)
                (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = new
                moved[id(t)] = t, new
        for key, (graph, head) in self.derived.items():
            if head is not None:
                self.derived[key] = graph, Head(*(None if t is None else moved.get(id(t), (t, t))[1] for t in head))

    def train(self, mode: bool) -> None:
        self.training = mode
        for graph in [*self.graphs.values(), *(g for g, _ in self.derived.values())]:
            graph.train(mode)

    def apply(self, fn: Callable, recurse: bool) -> None:
        self.derived.clear()  # made again from the moved graphs on next use
        for graph in self.graphs.values():
            graph._apply(fn, recurse)  # idempotent for shared tensors; moves graph-only constants
