"""``W + sign * sum scale * B @ A``, written in fp32 row chunks and checked for NaN/Inf before each write.

The one merge kernel: the fold pass writes new tensors with it, ``merge_adapter`` writes the base
weights in place with it, and both undo with the same factors they added. A DoRA factor also holds
``g = magnitude / ||W + scale * B @ A||`` per output, taken when the factors are: it merges as
``g * (W + scale * B @ A)`` and undoes as ``W / g - scale * B @ A`` (factors undone in reverse).
"""

from __future__ import annotations

import torch

from surgeon.errors import FoldError
from surgeon.layers import LoraLayer

CHUNK_ELEMENTS = 1 << 19  # ~2 MiB of fp32 per row chunk: the sum and its check stay in cache
# (B [out, r], A [r, in], scale, DoRA's g [out] or None), fp32
Factors = tuple[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None], ...]


def factors_of(layer: LoraLayer, names: tuple[str, ...] | None = None, weight: torch.Tensor | None = None) -> Factors:
    """A snapshot of ``(B, A, scale, g)`` of the layer's active (or named) adapters: fp32 copies, rank-trimmed.

    A DoRA adapter's ``g`` is taken against ``weight`` with the factors before it merged (as PEFT merges one adapter
    after another)."""
    chosen = [layer.adapters[n] for n in (names if names is not None else layer.active) if n in layer.adapters]
    out = []
    for a in chosen:
        g = None
        if a.dora:
            if weight is None:
                raise ValueError(f"{layer.path}: merging a DoRA adapter needs the base weight")
            current = weight
            if out:
                current = torch.empty_like(weight, dtype=torch.float32)
                write_merged(weight, tuple(out), layer.kind, layer.path, dst=current)
            g = (a.magnitude.detach().float() / a.weight_norm(current)).clone()
        out.append((a.lora_B[:, : a.r].detach().float().clone(), a.lora_A[: a.r].detach().float().clone(),
                    float(a.scaling), g))
    return tuple(out)


def _add_rows(out: torch.Tensor, factors: Factors, kind: str, start: int, stop: int, sign: float) -> torch.Tensor:
    """``out += sign * delta[start:stop]`` in the weight's layout, by addmm (no full-size delta); DoRA factors scale
    each output by ``g`` after (``sign`` < 0: divide before, factors in reverse)."""
    for b, a, scale, g in (factors if sign > 0 else reversed(factors)):
        b, a = b.to(out.device), a.to(out.device)
        rows = None if g is None else (g.to(out.device)[start:stop, None] if kind == "linear" else g.to(out.device))
        if rows is not None and sign < 0:
            out.div_(rows)
        if kind == "linear":  # W [out, in]: rows of B
            torch.addmm(out, b[start:stop], a, alpha=sign * scale, out=out)
        else:  # conv1d [in, out] and embedding [num, dim] hold (B @ A)^T: rows are columns of A
            torch.addmm(out, a[:, start:stop].t(), b.t(), alpha=sign * scale, out=out)
        if rows is not None and sign > 0:
            out.mul_(rows)
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
