"""``SurgeonModel``: PEFT's ``PeftModel`` surface over captured, injected graphs.

The eager model keeps its parameters (frozen); every call signature gets its own captured
graph (made lazily, cached) and all graphs share the same adapter modules. The loss is
computed outside the graph with the base model's own ``loss_function`` so that ``Trainer``'s
``num_items_in_batch`` and gradient accumulation behave exactly as with PEFT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import fx, nn

from surgeon.capturing import accepts, capture, signature_of
from surgeon.config import LoraConfig
from surgeon.compat import check_kwargs, forward_keywords, params_of, refuse_peft_load_flags, refuse_value
from surgeon.errors import AdapterError, did_you_mean
from surgeon.layers import LoraLayer, SavedTensor
from surgeon.matching import match
from surgeon.merge import MergeOps
from surgeon.model_io import AdapterIO
from surgeon.passes.graph_copy import set_nested
from surgeon.passes.lora import inject_lora

# transformers loss types whose loss we compute outside the graph, and how to call them.
_LOSS_CALLS = {
    "ForCausalLM": lambda fn, out, labels, cfg, n: fn(logits=out.logits, labels=labels, vocab_size=cfg.vocab_size, num_items_in_batch=n),
    "ForSequenceClassification": lambda fn, out, labels, cfg, n: fn(labels=labels, pooled_logits=out.logits, config=cfg),
    "ForTokenClassification": lambda fn, out, labels, cfg, n: fn(logits=out.logits, labels=labels, config=cfg),
}


class _Base(nn.Module):
    """Holds the transformers model so parameter names read ``base_model.model.<path>`` as in PEFT."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class SurgeonModel(AdapterIO, MergeOps, nn.Module):
    """A base model with LoRA adapters, used like ``peft.PeftModel``."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default", *, is_trainable: bool = True):
        super().__init__()
        prepare_quantized(model)
        self.base_model = _Base(model)
        self.adapter_modules = nn.Module()  # surgeon_lora.* and surgeon_saved.*, shared by every graph
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self._trainable: dict[str, bool] = {}
        self._graphs: dict[tuple, fx.GraphModule] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        self._add(adapter_name, config, trainable=is_trainable)

    # ---- adapters ----------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new adapter (freshly initialised); the active adapter stays active."""
        self._add(adapter_name, peft_config)

    def delete_adapter(self, adapter_name: str) -> None:
        self._known(adapter_name)
        for module in self._registry().values():
            store = module.adapters if isinstance(module, LoraLayer) else module.copies
            if adapter_name in store:
                del store[adapter_name]
        del self.peft_config[adapter_name]
        self._trainable.pop(adapter_name, None)
        if self.active_adapter == adapter_name and self.peft_config:
            self._set_active(next(iter(self.peft_config)))

    def _known(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterError(f"no adapter named {name!r}{did_you_mean(name, self.peft_config)}; "
                               f"adapters: {sorted(self.peft_config)}")

    def _add(self, name: str, config: LoraConfig, *, trainable: bool = True) -> None:
        if name in self.peft_config:
            raise AdapterError(f"an adapter named {name!r} exists already; adapters: {sorted(self.peft_config)}")
        if not isinstance(name, str) or "." in name:  # torch's ModuleDict refuses dots (PEFT's names do too)
            raise AdapterError(f"adapter name {name!r}: must be a string without '.', e.g. 'my-adapter'")
        graphs = self._graphs or {None: capture(self.base)}
        for sig, graph in list(graphs.items()):
            graphs[sig] = inject_lora(graph, config, name, reuse=self._registry())
            self._adopt(graphs[sig])
        self._graphs = {(k if k is not None else graphs[k].meta["surgeon"].signature): g for k, g in graphs.items()}
        self.peft_config[name] = config
        self._trainable[name] = trainable
        if trainable:
            self._set_bias_trainable(config)
        self._set_active(self.active_adapter if self.active_adapter in self.peft_config else name)

    def _registry(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.adapter_modules.named_modules() if isinstance(m, (LoraLayer, SavedTensor))}

    def _adopt(self, graph: fx.GraphModule) -> None:
        for name, module in graph.named_modules():
            if isinstance(module, (LoraLayer, SavedTensor)) and name not in self._registry():
                set_nested(self.adapter_modules, name, module)

    def _set_bias_trainable(self, config: LoraConfig) -> None:
        if config.bias == "none":
            return
        targets = {t.path for t in match(next(iter(self._graphs.values())), config).targets}
        for name, p in self.base.named_parameters():
            owner = name.rsplit(".", 1)[0]
            if name.endswith("bias") and (config.bias == "all" or owner in targets):
                p.requires_grad_(True)

    def _set_active(self, name: str) -> None:
        """Activate ``name`` everywhere; only its tensors train (if it was loaded trainable)."""
        train = self._trainable.get(name, True)
        for module in self._registry().values():
            module.active = (name,)
            if isinstance(module, LoraLayer):
                for other, adapter in module.adapters.items():
                    adapter.requires_grad_(train and other == name)
            else:
                for other, tensor in module.copies.items():
                    tensor.requires_grad_(train and other == name)
        self.active_adapter = name

    def set_adapter(self, adapter_name: str) -> None:
        self._known(adapter_name)
        self._set_active(adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the base model's outputs."""
        modules = list(self._registry().values())
        for m in modules:
            m.enabled = False
        try:
            yield
        finally:
            for m in modules:
                m.enabled = True

    # ---- forward ----------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        return self.base

    def graph_for(self, **call: Any) -> fx.GraphModule:
        """The injected graph for this call signature (captured on first use)."""
        check_kwargs(f"{type(self.base).__name__}.forward", call, forward_keywords(self.base))
        sig = signature_of(call)
        if sig not in self._graphs:
            graph = capture(self.base, call)
            for name, config in self.peft_config.items():
                graph = inject_lora(graph, config, name, reuse=self._registry())
            self._adopt(graph)
            graph.train(self.training)
            self._graphs[sig] = graph
        return self._graphs[sig]

    def decoder_graph(self):
        """The injected decode graph (KV cache as flat tensors, see ``surgeon.generation``) and its cache layout."""
        from surgeon.capturing import capture_decoder
        from surgeon.generation import DECODE_KEY

        if DECODE_KEY not in self._graphs:
            graph, layout = capture_decoder(self.base)
            for name, config in self.peft_config.items():
                graph = inject_lora(graph, config, name, reuse=self._registry())
            self._adopt(graph)
            graph.train(self.training)
            graph.meta["cache_layout"] = layout
            self._graphs[DECODE_KEY] = graph
        graph = self._graphs[DECODE_KEY]
        return graph, graph.meta["cache_layout"]

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        call = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        return_dict = call.pop("return_dict", None)
        call = {k: v for k, v in call.items() if v is not None}
        has_cache = any(k in call for k in ("cache", "past_key_values"))
        if "use_cache" not in call and not has_cache and accepts(self.base, "use_cache"):
            call["use_cache"] = False
        loss_call = _LOSS_CALLS.get(_loss_kind(self.base))
        if labels is not None and loss_call is None:
            call["labels"] = labels  # unknown head: let the model compute its own loss in the graph
        out = self.graph_for(**call)(**call)
        if labels is not None and loss_call is not None:
            loss = loss_call(self.base.loss_function, out, labels, self.base.config, num_items_in_batch)
            out = type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
        return out.to_tuple() if return_dict is False else out

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Trainer reads this; we answer as it would for the base model (it unwraps PEFT models too)."""
        import inspect

        if hasattr(self.base, "accepts_loss_kwargs"):
            return bool(self.base.accepts_loss_kwargs)
        params = inspect.signature(self.base.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` with the active adapters unmerged, every step run by the injected decode graph."""
        from surgeon.generation import generate

        return generate(self, *args, **kwargs)

    # ---- modes and devices ------------------------------------------------------------
    def train(self, mode: bool = True) -> SurgeonModel:
        super().train(mode)
        for graph in self._graphs.values():
            graph.train(mode)
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for graph in self._graphs.values():
            graph._apply(fn, recurse)  # idempotent for shared tensors; moves graph-only constants
        return self

    # ---- parameters and state -----------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        from surgeon.quant import QuantLinear

        # quantized weights are buffers; count them as PEFT counts Params4bit / Int8Params: in x out each
        total += sum(m.in_features * m.out_features for m in self.base.modules() if isinstance(m, QuantLinear))
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line, e.g. ``trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364``."""
        print(trainable_parameters_line(*self.get_nb_trainable_parameters()))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapter_modules", "_graphs"):
                raise
            return getattr(self.base_model.model, name)


def _loss_kind(model: nn.Module) -> str:
    """The key of ``model.loss_function`` in transformers' loss table ('' when it has none).

    Encoder-decoder models compute their own loss (in the graph): their ``loss_function`` falls back
    to the causal-LM loss, whose label shift would be wrong for them.
    """
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return ""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING

        fn = model.loss_function
    except (ImportError, AttributeError):
        return ""
    return next((k for k, v in LOSS_MAPPING.items() if v is fn), "")


def trainable_parameters_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None, low_cpu_mem_usage: bool = False,
                   **kwargs: Any) -> SurgeonModel:
    """Capture ``model``, inject ``peft_config``'s LoRA, freeze everything else (PEFT's entry point).

    PEFT's other arguments are accepted by name at the values surgeon honours and refused otherwise.
    """
    check_kwargs("get_peft_model", kwargs, params_of(get_peft_model))
    refuse_value("get_peft_model", "mixed", mixed, [False], "surgeon has no PeftMixedModel; add adapters of one method")
    refuse_value("get_peft_model", "revision", revision, [None], "surgeon loads nothing from a hub")
    refuse_peft_load_flags("get_peft_model", autocast_adapter_dtype, low_cpu_mem_usage)
    if not isinstance(peft_config, LoraConfig):
        raise AdapterError(f"get_peft_model takes a surgeon.LoraConfig, got {type(peft_config).__name__}; "
                           "build one with surgeon.LoraConfig(...) (same fields as peft.LoraConfig)")
    return SurgeonModel(model, peft_config, adapter_name)


def prepare_quantized(model: nn.Module) -> None:
    """A model transformers loaded with BitsAndBytesConfig: its bitsandbytes layers become ``QuantLinear``
    (same packed storage, same outputs), which torch.export can capture; other quantizations are refused."""
    from surgeon.quant import check_quant_config, from_bitsandbytes, has_bitsandbytes_layers

    check_quant_config(getattr(getattr(model, "config", None), "quantization_config", None))
    if has_bitsandbytes_layers(model):
        from_bitsandbytes(model)
