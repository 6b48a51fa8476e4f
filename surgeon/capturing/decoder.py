"""The decode signature: a decoder's KV cache as flat tensors, so one graph serves prefill and decode.

The traced function is called as
``(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past=[k0, v0, k1, v1, ...])``
with every past tensor ``[B, kv_heads, P, head_dim]`` and returns ``(logits, presents)``, the
presents being the same list grown to ``P+S``. Inside it the flat tensors become a
``DynamicCache``; outside the graph there is no cache object at all, which is what ONNX wants.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from surgeon.compat import cache_name, output_cache
from surgeon.errors import GenerationError

DECODE_KEY = ("decode", "input_ids", "attention_mask", "position_ids", "past")  # the decode graph's signature key
EXAMPLE_PAST = 5  # past length of the capture example (sizes 0 and 1 would be specialised by torch.export)
EXAMPLE_SEQ = 3


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shape of the KV cache of a decoder: per layer ``[batch, heads, past, head_dim]`` for keys and values."""

    layers: int
    key_heads: tuple[int, ...]
    key_dims: tuple[int, ...]
    value_dims: tuple[int, ...]
    dtype: torch.dtype

    def empty(self, batch: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The flat past of a prefill: one zero-length tensor per key and value."""
        out = []
        for heads, kd, vd in zip(self.key_heads, self.key_dims, self.value_dims):
            out.append(torch.zeros(batch, heads, 0, kd, dtype=self.dtype, device=device))
            out.append(torch.zeros(batch, heads, 0, vd, dtype=self.dtype, device=device))
        return out


def check_decoder(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise GenerationError(f"{type(model).__name__}: generation is supported for decoder-only models; for an "
                              "encoder-decoder model, merge the adapter (merge_and_unload) and call the base's generate")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise GenerationError(f"{type(model).__name__} has no language-model head; generation needs a *ForCausalLM model")


def cache_layout(model: nn.Module) -> CacheLayout:
    """Read the cache shapes from one eager two-token forward of the base model."""
    check_decoder(model)
    device = next(model.parameters()).device
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        out = model(input_ids=ids, **{cache_name(model): DynamicCache()}, use_cache=True)
    layers = output_cache(out).layers
    return CacheLayout(len(layers), tuple(int(x.keys.shape[1]) for x in layers), tuple(int(x.keys.shape[3]) for x in layers),
                       tuple(int(x.values.shape[3]) for x in layers), layers[0].keys.dtype)


def cache_from_flat(past: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> DynamicCache:
    """A ``DynamicCache`` holding the flat ``[k0, v0, k1, v1, ...]`` (plain layers, no sliding window)."""
    cache = DynamicCache()
    cache.layers = []
    for i in range(0, len(past), 2):
        layer = DynamicLayer()
        layer.lazy_initialization(past[i], past[i + 1])
        layer.keys, layer.values = past[i], past[i + 1]
        cache.layers.append(layer)
    return cache


def decode_forward(model: nn.Module):
    """The function traced for the decode signature; it calls the model's own (class) forward."""
    original = type(model).forward
    name = cache_name(model)

    def forward(input_ids, attention_mask, position_ids, past):
        cache = cache_from_flat(past)
        out = original(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, **{name: cache})
        presents = [t for layer in output_cache(out).layers for t in (layer.keys, layer.values)]
        return out.logits, presents

    return forward


def decode_example(model: nn.Module, layout: CacheLayout, batch: int = 2) -> dict[str, Any]:
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 8))
    g = torch.Generator().manual_seed(0)
    total = EXAMPLE_PAST + EXAMPLE_SEQ
    past = [t.new_zeros(batch, t.shape[1], EXAMPLE_PAST, t.shape[3]) for t in layout.empty(batch, device)]
    return {
        "input_ids": torch.randint(min(4, vocab - 1), vocab, (batch, EXAMPLE_SEQ), generator=g).to(device),
        "attention_mask": torch.ones(batch, total, dtype=torch.long, device=device),
        "position_ids": torch.arange(EXAMPLE_PAST, total, device=device).expand(batch, -1).contiguous(),
        "past": past,
    }


@contextlib.contextmanager
def forward_as(model: nn.Module, forward) -> Iterator[None]:
    """Within the block, ``model(...)`` and ``model.forward`` call ``forward`` (an instance attribute)."""
    had = "forward" in vars(model)
    saved = vars(model).get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if had:
            model.forward = saved
        else:
            del model.forward


def context_length(model: nn.Module) -> int | None:
    config = model.config
    return next((int(getattr(config, k)) for k in ("max_position_embeddings", "n_positions")
                 if isinstance(getattr(config, k, None), int)), None)
