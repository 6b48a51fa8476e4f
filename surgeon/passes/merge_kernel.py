"""``W + sign * sum scale * B @ A``, written in fp32 row chunks and checked for NaN/Inf before each write.

The one merge kernel: the fold pass writes new tensors with it, ``merge_adapter`` writes the base
weights in place with it, and both undo with the same factors they added.
"""

from __future__ import annotations

import torch

from surgeon.errors import FoldError
from surgeon.layers import LoraLayer

CHUNK_ELEMENTS = 1 << 19  # ~2 MiB of fp32 per row chunk: the sum and its check stay in cache
Factors = tuple[tuple[torch.Tensor, torch.Tensor, float], ...]  # (B [out, r], A [r, in], scale), fp32


def factors_of(layer: LoraLayer, names: tuple[str, ...] | None = None) -> Factors:
    """A snapshot of ``(B, A, scale)`` of the layer's active (or named) adapters: fp32 copies, rank-trimmed."""
    chosen = names if names is not None else layer.active
    return tuple((a.lora_B[:, : a.r].detach().float().clone(), a.lora_A[: a.r].detach().float().clone(), float(a.scaling))
                 for n in chosen if n in layer.adapters for a in (layer.adapters[n],))


def _add_rows(out: torch.Tensor, factors: Factors, kind: str, start: int, stop: int, sign: float) -> torch.Tensor:
    """``out += sign * delta[start:stop]`` in the weight's layout, by addmm (no full-size delta)."""
    for b, a, scale in factors:
        b, a = b.to(out.device), a.to(out.device)
        if kind == "linear":  # W [out, in]: rows of B
            torch.addmm(out, b[start:stop], a, alpha=sign * scale, out=out)
        else:  # conv1d [in, out] and embedding [num, dim] hold (B @ A)^T: rows are columns of A
            torch.addmm(out, a[:, start:stop].t(), b.t(), alpha=sign * scale, out=out)
    return out


def write_merged(weight: torch.Tensor, factors: Factors, kind: str, where: str, *, dst: torch.Tensor | None = None,
                 sign: float = 1.0, check_only: bool = False) -> None:
    """``dst = weight + sign * sum scale * B @ A``, chunk by chunk, each checked before it is written.

    ``dst`` may be ``weight`` itself (in place): on a non-finite chunk the rows already written are
    rolled back (within fp32 rounding) and ``FoldError`` names ``where``. ``check_only`` writes nothing.
    """
    w = weight.detach()
    rows = max(1, CHUNK_ELEMENTS // max(1, w[0].numel()))
    for i in range(0, w.shape[0], rows):
        j = min(i + rows, w.shape[0])
        part = _add_rows(w[i:j].to(torch.float32, copy=True), factors, kind, i, j, sign)
        if not torch.isfinite(part.sum()) and not torch.isfinite(part).all():
            if dst is weight and i and not check_only:
                w[:i].copy_(_add_rows(w[:i].to(torch.float32, copy=True), factors, kind, 0, i, -sign))
            bad = (~torch.isfinite(part)).sum().item()
            raise FoldError(f"folding the adapter into {where} gives {bad}+ NaN/Inf values; the adapter weights are "
                            "too large or already non-finite (check them with `surgeon inspect`)")
        if not check_only:
            (dst if dst is not None else w)[i:j].copy_(part)
