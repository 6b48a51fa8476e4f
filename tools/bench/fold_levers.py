"""python tools/bench/fold_levers.py

Prints the prototype levers for surgeon's merge and fold that ``bench_fold.py --variant`` applies,
one line each (name: what it changes). Imported by bench_fold.py; surgeon/ is never edited: each
lever is a function patched in from the outside.

Also here: ``Timers`` (wall seconds inside patched helpers: lora_delta, merged_weight, _own_param,
copy_graph, set_nested for surgeon; Linear.merge / get_delta_weight for PEFT) and ``profile_top``
(cProfile, top functions by own time).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

# ---- prototype levers (surgeon patched from the outside; surgeon/ is not edited) -------------
def _inplace_merge_adapter(self, adapter_names=None, safe_merge=False):
    """``merge_adapter`` as PEFT does it: ``W += delta`` in place (fp32 math), one finiteness check on the delta,
    and the weight owners found once (not one ``named_parameters`` walk per layer)."""
    import torch

    from surgeon.passes.fold import FoldError, lora_delta

    names = tuple(adapter_names or self.active_adapters)
    for name in names:
        self._known(name)
    shared = _shared_params(self.base)
    plan = []
    for layer in self._lora_layers():
        todo = tuple(n for n in names if n in layer.adapters and n not in layer.merged)
        if todo:
            key = f"{layer.path}.weight"
            plan.append((layer, todo, self._own_param(key) if key in shared else _param(self.base, key)))
    deltas = {}
    for layer, todo, w in plan:
        d = lora_delta(layer, todo)
        if not torch.isfinite(d).all():  # delta finite and W finite -> W + delta finite unless it overflows W's dtype
            raise FoldError(f"folding the adapter into {layer.path}: the adapter weights are non-finite")
        deltas[layer.path] = d
    for layer, todo, w in plan:
        with torch.no_grad():
            w.add_(deltas.pop(layer.path))  # fp32 delta into W: computed in fp32, rounded once to W's dtype
        layer.merged += todo


def _shared_params(base) -> set[str]:
    """Names of parameters that another module also holds (tied weights), found in one walk."""
    seen, shared = {}, set()
    for name, p in base.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            shared.update((name, seen[id(p)]))
        else:
            seen[id(p)] = name
    return shared


def _param(base, key: str):
    owner, _, leaf = key.rpartition(".")
    return getattr(base.get_submodule(owner), leaf)


def _fused_merged_weight(weight, delta, where, *, sign=1.0):
    """``merged_weight`` with one fp32 temporary fewer: ``torch.add(W, delta, alpha=sign)`` promotes W to fp32
    inside the kernel (no ``W.float()`` copy), the NaN/Inf check reads the result once, the cast is skipped for fp32."""
    import torch

    from surgeon.passes.fold import FoldError

    if delta is None:
        return weight.detach().clone()
    out = torch.add(weight.detach(), delta.to(weight.device), alpha=sign)  # fp32 (type promotion with the fp32 delta)
    if not torch.isfinite(out).all():
        raise FoldError(f"folding the adapter into {where} gives NaN/Inf values")
    return out if out.dtype == weight.dtype else out.to(weight.dtype)


def _chunked_merged_weight(weight, delta, where, *, sign=1.0):
    """``merged_weight`` computed into a new tensor of W's dtype, ``chunk`` rows at a time: the fp32 sum and the
    NaN/Inf check stay in cache (one read of W, one write of W'; no full-size fp32 temporary)."""
    import torch

    from surgeon.passes.fold import FoldError

    if delta is None:
        return weight.detach().clone()
    w, d = weight.detach(), delta.to(weight.device)
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    rows = max(1, (1 << 18) // max(1, w.shape[-1]))  # ~1 MiB of fp32 per chunk
    bad = False
    for i in range(0, w.shape[0], rows):
        part = torch.add(w[i:i + rows], d[i:i + rows], alpha=sign)
        bad |= not bool(torch.isfinite(part).all())
        out[i:i + rows].copy_(part)
    if bad:
        raise FoldError(f"folding the adapter into {where} gives NaN/Inf values")
    return out


def apply_variant(variant: str) -> None:
    """Patch surgeon for ``variant`` (names in ``VARIANTS``)."""
    import surgeon.merge
    import surgeon.passes.fold

    parts = set(variant.split("+")) - {"surgeon"}
    if "inplace" in parts:
        surgeon.merge.MergeOps.merge_adapter = _inplace_merge_adapter
    if "fused" in parts:
        surgeon.passes.fold.merged_weight = _fused_merged_weight
        surgeon.merge.merged_weight = _fused_merged_weight
    if "chunked" in parts:
        surgeon.passes.fold.merged_weight = _chunked_merged_weight
        surgeon.merge.merged_weight = _chunked_merged_weight


VARIANTS = {
    "surgeon": "surgeon as it is",
    "surgeon+fused": "merged_weight: torch.add(W, delta) (no W.float() copy, no cast for fp32)",
    "surgeon+chunked": "merged_weight: chunked fp32 add + check into a new W-dtype tensor (no full-size temporaries)",
    "surgeon+inplace": "merge_adapter: W.add_(delta) in place, check the delta only, one tie scan",
    "surgeon+inplace+chunked": "both: in-place merge (merge_and_unload) and chunked merged_weight (fold)",
}


# ---- timers (an extra, untimed run) --------------------------------------------------------
class Timers:
    """Wall seconds spent inside patched functions; ``wrap`` returns the timing replacement."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn):
        def timed_fn(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
        return timed_fn


def surgeon_timers() -> tuple[Timers, callable]:
    """Patch surgeon's merge/fold helpers with timers; returns the timers and an undo function."""
    import surgeon.merge as sm
    import surgeon.passes.fold as sf

    t = Timers()
    names = ("lora_delta", "merged_weight", "copy_graph", "set_nested", "_set_attr")
    saved = [(mod, n) for mod in (sm, sf) for n in names if hasattr(mod, n)] + [(sm.MergeOps, "_own_param")]
    originals = [(obj, name, getattr(obj, name)) for obj, name in saved]
    for obj, name, fn in originals:
        setattr(obj, name, t.wrap(name, fn))

    def undo():
        for obj, name, fn in originals:
            setattr(obj, name, fn)
    return t, undo


def peft_timers() -> tuple[Timers, callable]:
    from peft.tuners.lora import layer as pl

    t = Timers()
    originals = [(pl.Linear, "merge", pl.Linear.merge), (pl.Linear, "get_delta_weight", pl.Linear.get_delta_weight)]
    for obj, name, fn in originals:
        setattr(obj, name, t.wrap(name, fn))

    def undo():
        for obj, name, fn in originals:
            setattr(obj, name, fn)
    return t, undo


def profile_top(fn, n: int = 14) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(n)
    return buf.getvalue()


if __name__ == "__main__":
    for name, what in VARIANTS.items():
        print(f"{name}: {what}")
    sys.exit(0)
