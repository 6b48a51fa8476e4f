"""Pass: LoRA layers -> branches fed by graph inputs, for export with switchable adapters.

Before: ``z = call_module(surgeon_lora.<path>, (x, y))`` (weights inside the module).
After:  ``z = call_module(surgeon_lora.<path>, (x, y))`` where the module is an ``InputLora`` that
computes ``y + (x @ A) @ B`` (embedding: ``y + A[ids] @ B``) with ``A`` [in, r] and ``B`` [r, out]
(scale baked into B) taken from the tensors the export wrapper feeds for that path.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn
from torch.nn import functional as F

from surgeon.layers import LoraLayer
from surgeon.graphs import copy_graph


@dataclasses.dataclass(frozen=True)
class LoraInput:
    path: str
    kind: str
    in_features: int
    out_features: int


class InputFeed:
    """Per-call mapping path -> (A, B), set by the export wrapper before it calls the graph."""

    def __init__(self):
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


class InputLora(nn.Module):
    def __init__(self, path: str, kind: str, feed: InputFeed):
        super().__init__()
        self.path, self.kind, self.feed = path, kind, feed

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.feed.tensors[self.path]
        if self.kind == "embedding":
            return y + (F.embedding(x, a) @ b).to(y.dtype)
        return y + ((x.to(a.dtype) @ a) @ b).to(y.dtype)


def lora_as_inputs(gm: fx.GraphModule, feed: InputFeed) -> tuple[fx.GraphModule, tuple[LoraInput, ...]]:
    """A new graph whose LoRA layers read (A, B) from ``feed``; and the inputs it needs, sorted by path."""
    new = copy_graph(gm)
    found: dict[str, LoraInput] = {}
    for name, module in list(new.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, leaf = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, leaf, InputLora(module.path, module.kind, feed))
            found[module.path] = LoraInput(module.path, module.kind, module.in_features, module.out_features)
    new.recompile()
    return new, tuple(found[p] for p in sorted(found))


def adapter_tensors(layer: LoraLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [in, r], B [r, out] * scale)`` of one adapter: the layout the ONNX inputs take."""
    adapter = layer.adapters[adapter_name]
    a = adapter.lora_A[: adapter.r].detach().t().contiguous()
    b = (adapter.lora_B[:, : adapter.r].detach().t() * adapter.scaling).contiguous()
    return a.float(), b.float()
