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
CHUNK_ELEMENTS = 1 << 19  # rows per chunk: about 2 MiB of fp32, so the fp32 sum and its check stay in cache


def _fused_lora_delta(layer, names=None):
    """``lora_delta`` with the scale applied in place (``mm(B, A).mul_(scale)``): one full-size temporary fewer."""
    import torch

    delta = None
    for name in names if names is not None else layer.active:
        if name not in layer.adapters:
            continue
        ad = layer.adapters[name]
        d = torch.mm(ad.lora_B.detach().float(), ad.lora_A.detach().float()).mul_(ad.scale)
        delta = d if delta is None else delta.add_(d)
    if delta is None:
        return None
    return delta if layer.kind == "linear" else delta.t()


def _fused_merged_weight(weight, delta, where, *, sign=1.0):
    """``merged_weight`` as one ``torch.add(W, delta, alpha=sign)``: W is promoted to fp32 inside the kernel (no
    ``W.float()`` copy, no ``sign * delta`` temporary), and the cast is skipped for fp32."""
    import torch

    from surgeon.passes.fold import FoldError

    if delta is None:
        return weight.detach().clone()
    out = torch.add(weight.detach(), delta.to(weight.device), alpha=sign)
    if not torch.isfinite(out).all():
        raise FoldError(f"folding the adapter into {where} gives NaN/Inf values")
    return out if out.dtype == weight.dtype else out.to(weight.dtype)


class LowRank:
    """What ``lora_delta`` returns in the chunked lever: the factors, not the [out, in] product."""

    def __init__(self, layer, names):
        self.kind = layer.kind
        self.parts = [(layer.adapters[n].lora_B.detach().float(), layer.adapters[n].lora_A.detach().float(),
                       layer.adapters[n].scale) for n in (names if names is not None else layer.active)
                      if n in layer.adapters]

    def add_rows(self, out, start: int, stop: int, sign: float):
        """``out += sign * delta[start:stop]`` (``out`` fp32, rows of the weight's layout) via addmm."""
        import torch

        for b, a, scale in self.parts:
            if self.kind == "linear":  # W [out, in]: rows of B
                torch.addmm(out, b[start:stop], a, alpha=sign * scale, out=out)
            else:  # conv1d [in, out] / embedding [num, dim]: W = (B @ A)^T, rows are columns of A
                torch.addmm(out, a[:, start:stop].t(), b.t(), alpha=sign * scale, out=out)
        return out


def _lowrank_delta(layer, names=None):
    low = LowRank(layer, names)
    return low if low.parts else None


def _write_merged(weight, low, dst, where, sign: float) -> None:
    """``dst = weight + sign * delta`` row chunk by row chunk: fp32 addmm into a cache-sized chunk, a NaN/Inf check
    of the chunk through its sum (a non-finite sum flags a chunk; only then are its values counted), one cast/copy
    into ``dst`` (``dst`` may be ``weight`` itself: in place, rolled back on failure)."""
    import torch

    from surgeon.passes.fold import FoldError

    rows = max(1, CHUNK_ELEMENTS // max(1, weight[0].numel()))
    for i in range(0, weight.shape[0], rows):
        j = min(i + rows, weight.shape[0])
        part = low.add_rows(weight[i:j].to(torch.float32, copy=True), i, j, sign)
        if not bool(torch.isfinite(part.sum())) and not bool(torch.isfinite(part).all()):
            if dst is weight and i:  # roll back the rows already written (in place)
                _write_merged_rows_back(weight, low, i, sign)
            raise FoldError(f"folding the adapter into {where} gives NaN/Inf values")
        dst[i:j].copy_(part)


def _write_merged_rows_back(weight, low, stop: int, sign: float) -> None:
    import torch

    part = low.add_rows(weight[:stop].to(torch.float32, copy=True), 0, stop, -sign)
    weight[:stop].copy_(part)


def _chunked_merged_weight(weight, delta, where, *, sign=1.0):
    """``merged_weight`` into a new tensor of W's dtype, without a full-size delta or fp32 temporary."""
    import torch

    if delta is None:
        return weight.detach().clone()
    if not isinstance(delta, LowRank):  # a caller that built a full delta itself
        return _fused_merged_weight(weight, delta, where, sign=sign)
    w = weight.detach()
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    _write_merged(w, delta, out, where, sign)
    return out


def _chunked_merge_adapter(self, adapter_names=None, safe_merge=False):
    """``merge_adapter`` writing ``W + scale * B @ A`` into W in place, chunk by chunk (``_write_merged``), and
    finding tied weights in one ``named_parameters`` walk instead of one walk per layer."""
    import torch

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
    if safe_merge:  # check every layer before writing any (one chunk at a time: no extra memory)
        for layer, todo, w in plan:
            _check_only(w.detach(), _lowrank_delta(layer, todo), layer.path)
    done = []
    try:
        with torch.no_grad():
            for layer, todo, w in plan:
                _write_merged(w.data, _lowrank_delta(layer, todo), w.data, layer.path, 1.0)
                layer.merged += todo
                done.append((layer, todo, w))
    except Exception:
        with torch.no_grad():
            for layer, todo, w in done:
                _write_merged(w.data, _lowrank_delta(layer, todo), w.data, layer.path, -1.0)
                layer.merged = tuple(n for n in layer.merged if n not in todo)
        raise


def _check_only(weight, low, where) -> None:
    import torch

    from surgeon.passes.fold import FoldError

    rows = max(1, CHUNK_ELEMENTS // max(1, weight[0].numel()))
    for i in range(0, weight.shape[0], rows):
        j = min(i + rows, weight.shape[0])
        if not bool(torch.isfinite(low.add_rows(weight[i:j].to(torch.float32, copy=True), i, j, 1.0)).all()):
            raise FoldError(f"folding the adapter into {where} gives NaN/Inf values")


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


def _lazy_copy_graph(gm):
    """``copy_graph`` that skips the code generation of the copy (torch.fx's ``_LazyGraphModule``): fold edits the
    copy and generates its code once at the end instead of twice."""
    import copy
    import warnings

    from torch import fx
    from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    with _use_lazy_graph_module(True):
        new = _make_graph_module(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    for name, child in list(new.named_children()):
        if isinstance(child, fx.GraphModule):
            setattr(new, name, _lazy_copy_graph(child))
    new.train(gm.training)
    return new


def _codegen_once(fold):
    def fold_then_codegen(gm):
        from torch.fx._lazy_graph_module import _LazyGraphModule

        from surgeon.matching import graphs_of

        new = fold(gm)
        for _, sub in graphs_of(new):
            if isinstance(sub, _LazyGraphModule):
                sub.real_recompile()  # the code is generated here, inside the timed fold, once
        return new
    return fold_then_codegen


def apply_variant(variant: str) -> None:
    """Patch surgeon for ``variant`` (a key of ``VARIANTS``); ``thp`` must be applied before torch is imported."""
    import os

    parts = set(variant.split("+")) - {"surgeon"}
    if "thp" in parts:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # c10's CPU allocator: madvise(MADV_HUGEPAGE) on large blocks
    import surgeon.merge as sm
    import surgeon.passes.fold as sf

    if "fused" in parts:
        sf.lora_delta = sm.lora_delta = _fused_lora_delta
        sf.merged_weight = sm.merged_weight = _fused_merged_weight
    if "chunked" in parts:
        sf.lora_delta = sm.lora_delta = _lowrank_delta
        sf.merged_weight = sm.merged_weight = _chunked_merged_weight
        sm.MergeOps.merge_adapter = _chunked_merge_adapter
    if "lazy" in parts:
        sf.copy_graph = _lazy_copy_graph
        sf.fold = _codegen_once(sf.fold)


VARIANTS = {
    "surgeon": "surgeon as it is",
    "surgeon+fused": "lora_delta: mm(B, A).mul_(scale); merged_weight: torch.add(W, delta, alpha=sign) (2 temporaries fewer)",
    "surgeon+chunked": "lora_delta returns the factors; W + scale*B@A by addmm in ~2 MiB fp32 row chunks, NaN/Inf "
                       "check of each chunk by its sum, "
                       "new tensor for fold, in place for merge_adapter; one tie scan",
    "surgeon+chunked+lazy": "surgeon+chunked, and fold's copy of the graph generates no code (lazy): one codegen, not two",
    "surgeon+chunked+lazy+thp": "surgeon+chunked+lazy with THP_MEM_ALLOC_ENABLE=1 (huge pages: fewer page faults on the "
                                "new tensors)",
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
    saved.append((sys.modules[__name__], "_write_merged"))  # the chunked lever's in-place merge
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
