"""python tools/bench/fold_levers.py

Prints the prototype levers for surgeon's merge and fold that ``bench_fold.py --variant`` applies,
one line each (name: what it changes). Imported by bench_fold.py; surgeon/ is never edited: each
lever is a function patched in from the outside.

Also here: ``Timers`` (wall seconds inside patched helpers: write_merged, factors_of, own_param,
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
# The chunked in-place merge that was prototyped here (fp32 addmm into ~2 MiB row chunks, a NaN/Inf check per
# chunk, one tie scan) is now surgeon's own code (surgeon/passes/merge_kernel.py): "surgeon" measures it.


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

        from surgeon.graphs import graphs_of

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
    import surgeon.passes.fold as sf

    if "lazy" in parts:
        sf.copy_graph = _lazy_copy_graph
        sf.fold = _codegen_once(sf.fold)


VARIANTS = {
    "surgeon": "surgeon as it is (chunked in-place merge, new tensors for fold)",
    "surgeon+lazy": "fold's copy of the graph generates no code (lazy): one codegen, not two",
    "surgeon+lazy+thp": "surgeon+lazy with THP_MEM_ALLOC_ENABLE=1 (huge pages: fewer page faults on the new tensors)",
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
    import surgeon.model.merging as sm
    import surgeon.passes.fold as sf

    t = Timers()
    names = ("write_merged", "factors_of", "copy_graph", "set_nested", "own_param")
    saved = [(mod, n) for mod in (sm, sf) for n in names if hasattr(mod, n)]  # where each caller looks it up
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
