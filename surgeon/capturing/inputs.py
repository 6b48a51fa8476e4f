"""Example inputs for capture and the key of a call signature."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.export import Dim

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8  # sizes torch.export keeps symbolic (0 and 1 would be specialised)


def signature_of(kwargs: Mapping[str, Any]) -> tuple:
    """Hashable key of a call: tensor names with rank and dtype kind, other values as given."""
    items = []
    for key in sorted(kwargs):
        value = kwargs[key]
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            items.append((key, "tensor", value.dim(), value.is_floating_point()))
        else:
            items.append((key, "const", value))
    return tuple(items)


def accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def default_call(model: nn.Module) -> dict[str, Any]:
    """The plain training call: ids and mask (decoder ids for encoder-decoders), no KV cache."""
    call: dict[str, Any] = {"input_ids": None, "attention_mask": None}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        call["decoder_input_ids"] = None
    if accepts(model, "use_cache"):
        call["use_cache"] = False
    return call


def _example_tensor(key: str, value, vocab: int, g: torch.Generator):
    shape = (EXAMPLE_BATCH, EXAMPLE_SEQ)
    if key in ("input_ids", "decoder_input_ids"):
        return torch.randint(min(4, vocab - 1), vocab, shape, generator=g)
    if key == "attention_mask":
        return torch.ones(shape, dtype=torch.long)
    if key == "position_ids":
        return torch.arange(EXAMPLE_SEQ).expand(shape).contiguous()
    if key == "token_type_ids":
        return torch.zeros(shape, dtype=torch.long)
    if key == "inputs_embeds":
        return torch.randn(*shape, value.shape[-1], generator=g, dtype=value.dtype)
    if isinstance(value, torch.Tensor):
        return torch.zeros((EXAMPLE_BATCH, EXAMPLE_SEQ, *value.shape[2:])[: value.dim()], dtype=value.dtype)
    return None


def example_inputs(model: nn.Module, like: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Inputs for capture with batch 2 and sequence 8.

    ``like`` gives the names (and dtypes, ranks) of a real call; default: input_ids + attention_mask.
    """
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 2)
    like = dict(like) if like else default_call(model)
    g = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    out: dict[str, Any] = {}
    for key, value in like.items():
        if not isinstance(value, torch.Tensor) and value is not None:
            out[key] = value
            continue
        t = _example_tensor(key, value, vocab, g)
        if t is None:
            continue
        if isinstance(value, torch.Tensor) and key != "inputs_embeds":
            t = t.to(value.dtype)
        out[key] = t.to(device)
    return out


def dynamic_shapes(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Batch and sequence dims of every tensor input left to torch.export (``Dim.AUTO``)."""
    return {key: {i: Dim.AUTO for i in range(min(value.dim(), 2))} if isinstance(value, torch.Tensor) else None
            for key, value in kwargs.items()}
