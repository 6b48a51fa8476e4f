"""Pass: LoRA layers -> branches fed by graph inputs, for export with switchable adapters.

Before: ``z = call_module(surgeon_lora.<path>, (x, y))`` (weights inside the module).
After:  ``z = call_module(surgeon_lora.<path>, (x, y))`` where the module is an ``InputLora`` that
computes ``y + (x @ A) @ B`` (embedding: ``y + A[ids] @ B``) with ``A`` [in, r] and ``B`` [r, out]
(scale baked into B) taken from the tensors the export wrapper feeds for that path.
A DoRA site (``(x, y, W, b)``) also takes ``g`` [out], DoRA's ``magnitude / ||W + scale * B @ A||`` worked out
when the adapter file is written (the norm is a constant of the adapter: no weight-sized work per run), and computes
``y + (g - 1) * (y - b) + g * (x @ A) @ B``; with ``g`` ones and rank 0 that is ``y``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn
from torch.nn import functional as F

from surgeon.layers import IA3Layer, LoraLayer
from surgeon.graphs import copy_graph
from surgeon.names import onnx_dora_name, onnx_ia3_name, onnx_input_names


@dataclasses.dataclass(frozen=True)
class LoraInput:
    path: str
    kind: str
    in_features: int
    out_features: int
    dora: bool = False
    ia3: str | None = None  # an (IA)^3 site: "input" (feed-forward) or "output", which its vector scales

    @property
    def names(self) -> tuple[str, ...]:
        """Its graph inputs: A, B, and DoRA's g; or the (IA)^3 vector."""
        if self.ia3:
            return (onnx_ia3_name(self.path),)
        return onnx_input_names(self.path) + ((onnx_dora_name(self.path),) if self.dora else ())

    @property
    def ia3_size(self) -> int:
        return self.in_features if self.ia3 == "input" else self.out_features


class InputFeed:
    """Per-call mapping path -> (A, B), set by the export wrapper before it calls the graph.

    An adapter bank (``ids`` set): A is [slots, in, r] and B [slots, r, out], and row ``i`` of the batch uses slot
    ``ids[i]``; ``ids`` of one element applies that slot to every row.
    """

    def __init__(self):
        self.tensors: dict[str, tuple[torch.Tensor, ...]] = {}  # (A, B), or (A, B, g) at a DoRA site
        self.ids: torch.Tensor | None = None


class InputLora(nn.Module):
    def __init__(self, path: str, kind: str, feed: InputFeed):
        super().__init__()
        self.path, self.kind, self.feed = path, kind, feed

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        a, b, *g = self.feed.tensors[self.path]
        ids = self.feed.ids
        if g and ids is not None:  # a DoRA bank: g [slots, out], each row its slot's, on [rows, -1, out] views
            rows = ids.shape[0]
            yr = y.reshape(rows, -1, y.shape[-1])
            gr = g[0].index_select(0, ids)[:, None, :]
            base = yr if bias is None else yr - bias
            return (yr + (gr - 1) * base + gr * self._bank(x, a, b, ids).to(y.dtype)).reshape(y.shape)
        if g:  # DoRA (weight only marks the site: g was worked out from it when the adapter was written)
            base = y if bias is None else y - bias
            return y + (g[0] - 1) * base + g[0] * ((x.to(a.dtype) @ a) @ b).to(y.dtype)
        if ids is not None:
            return y + self._bank(x, a, b, self.feed.ids).reshape(y.shape).to(y.dtype)
        if self.kind == "embedding":
            return y + (F.embedding(x, a) @ b).to(y.dtype)
        return y + ((x.to(a.dtype) @ a) @ b).to(y.dtype)


    def _bank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each row's slot of A and B applied to that row; sites that flatten batch and sequence (GPT-2's ``addmm``)
        are viewed as [rows, -1, in] first. Returns [rows, -1, out]."""
        rows = ids.shape[0]
        b_rows = b.index_select(0, ids)  # [rows, r, out]
        if self.kind == "embedding":  # A [slots, vocab, r]: one flat table, each row's ids offset into its slot
            flat = x.reshape(rows, -1) + ids.unsqueeze(1) * a.shape[1]
            return F.embedding(flat, a.reshape(-1, a.shape[2])) @ b_rows
        return (x.to(a.dtype).reshape(rows, -1, x.shape[-1]) @ a.index_select(0, ids)) @ b_rows


class InputIA3(nn.Module):
    """An (IA)^3 site fed its vector ``l`` (flat) by the export wrapper: ``x * l`` (feed-forward) or ``y * l``."""

    def __init__(self, path: str, feedforward: bool, feed: InputFeed):
        super().__init__()
        self.path, self.feedforward, self.feed = path, feedforward, feed

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        (vector,) = self.feed.tensors[self.path]
        t = x if self.feedforward else y
        ids = self.feed.ids
        if ids is not None:  # a bank: vectors [slots, size], each row its slot's
            rows = ids.shape[0]
            scaled = t.to(vector.dtype).reshape(rows, -1, t.shape[-1]) * vector.index_select(0, ids)[:, None, :]
            return scaled.reshape(t.shape).to(t.dtype)
        return (t.to(vector.dtype) * vector).to(t.dtype)


def lora_as_inputs(gm: fx.GraphModule, feed: InputFeed) -> tuple[fx.GraphModule, tuple[LoraInput, ...]]:
    """A new graph whose LoRA layers read (A, B) from ``feed``; and the inputs it needs, sorted by path."""
    new = copy_graph(gm)
    found: dict[str, LoraInput] = {}
    for name, module in list(new.named_modules()):
        if isinstance(module, LoraLayer):
            parent, _, leaf = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, leaf, InputLora(module.path, module.kind, feed))
            found[module.path] = LoraInput(module.path, module.kind, module.in_features, module.out_features,
                                           module.dora)
        elif isinstance(module, IA3Layer):
            parent, _, leaf = name.rpartition(".")
            setattr(new.get_submodule(parent) if parent else new, leaf, InputIA3(module.path, module.feedforward, feed))
            found[module.path] = LoraInput(module.path, module.kind, module.in_features, module.out_features,
                                           ia3="input" if module.feedforward else "output")
    new.recompile()
    return new, tuple(found[p] for p in sorted(found))


def adapter_tensors(layer: LoraLayer, adapter_name: str, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``(A [in, r], B [r, out] * scale)`` of one adapter: the layout the ONNX inputs take; a DoRA adapter also
    ``g = magnitude / ||W + scale * B @ A||`` [out] against the site's base ``weight``; (IA)^3: ``(l,)`` flat."""
    adapter = layer.adapters[adapter_name]
    if isinstance(layer, IA3Layer):
        return (adapter.ia3_l.detach().float().flatten().contiguous(),)
    a = adapter.lora_A[: adapter.r].detach().t().contiguous()
    b = (adapter.lora_B[:, : adapter.r].detach().t() * adapter.scaling).contiguous()
    if not adapter.dora:
        return a.float(), b.float()
    if weight is None:
        raise ValueError(f"{layer.path}: a DoRA adapter's ONNX tensors need the base weight")
    return a.float(), b.float(), (adapter.magnitude.detach().float() / adapter.weight_norm(weight)).contiguous()
