"""python tools/bench/bench_fold.py

Prints the machine line and the load, the measured copy bandwidth, then one table row per
model x dtype x tool: the median seconds of surgeon ``model.merge_and_unload()``, PEFT
``merge_and_unload()`` and surgeon's graph pass ``surgeon.fold(graph)``, the bandwidth floor,
and under each model x dtype the surgeon/PEFT ratios and the ratios to the floor next to the
goals (fold <= 0.5x PEFT merge time, within 3x of the floor); then, per surgeon row, where the
time goes (timers around write_merged / factors_of / own_param). Progress goes to stderr.
About 10 minutes on 2 cores; ``--quick`` (tiny configs, 2 repeats) takes about 30 seconds.

Workload: a GPT-2-small-sized model (GPT2Config defaults, 124.4M params, LoRA on c_attn and
c_proj: 36 modules) and a Llama at about 1B (hidden 2048, 16 layers, 32 heads, MLP 5504, vocab
32000, untied head: 940.6M params, LoRA on q/k/v/o_proj: 64 modules, 268M targeted weights),
random-init and seeded (built from config, nothing downloaded), fp32 and bf16 (built in fp32,
then cast), LoRA r=16 alpha=32 with ``init_lora_weights=False`` (B is nonzero). Each model x
dtype x tool runs in its own subprocess (``--worker surgeon|peft``, one JSON line). A repeat
needs unmerged weights again: the worker restores the targeted weights from a saved copy and
wraps the base again (untimed); only the merge call (or the fold call) is timed.

Floor: (targeted weights read + written + A and B read) bytes / copy bandwidth, where the copy
bandwidth is (read + written bytes) / seconds of ``dst.copy_(src)`` on a 1 GiB fp32 tensor into
an already-touched ``dst`` (median of 7). The bandwidth into a freshly allocated ``dst`` (page
faults included, what a fold that allocates new weights pays) is printed beside it.

Options: ``--models gpt2,llama1b``, ``--dtypes float32,bfloat16``, ``--repeat 5`` (merge
repeats; the 1B model uses min(repeat, 3)), ``--threads``, ``--variant NAME`` (surgeon with a
prototype patch applied from the outside, see ``VARIANTS``; ``--variant all`` adds one surgeon
row per variant), ``--profile`` (cProfile of one surgeon merge and fold, top functions to
stderr), ``--json PATH``, ``--quick``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time
from pathlib import Path

import harness as h
from fold_levers import VARIANTS, apply_variant, peft_timers, profile_top, surgeon_timers

GOAL_VS_PEFT, GOAL_VS_FLOOR = 0.5, 3.0
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "init_lora_weights": False}

# name -> (transformers config class, full-size kwargs, --quick kwargs, LoRA targets)
MODELS = {
    "gpt2": ("GPT2Config", h.MODELS["gpt2"][1], h.MODELS["gpt2"][2], ["c_attn", "c_proj"]),
    "llama1b": (*h.MODELS["llama1b"][:3], ["q_proj", "k_proj", "v_proj", "o_proj"]),
}


# ---- worker ------------------------------------------------------------------------------------
def build(name: str, dtype: str, quick: bool):
    cls_name, full, tiny, _ = MODELS[name]
    return h.build_from_config(cls_name, tiny if quick else full, dtype)


def targeted(base, name: str) -> dict:
    """path -> weight of every module whose last name is a LoRA target (what both tools match)."""
    targets = set(MODELS[name][3])
    return {p: m.weight for p, m in base.named_modules() if p.rpartition(".")[2] in targets}


def wrap(tool: str, base, name: str):
    lib = sys.modules[tool]
    return lib.get_peft_model(base, lib.LoraConfig(task_type="CAUSAL_LM", target_modules=list(MODELS[name][3]), **LORA))


def restore(weights: dict, originals: dict) -> None:
    import torch

    with torch.no_grad():
        for path, w in weights.items():
            w.copy_(originals[path])


def adapter_bytes(model, tool: str) -> int:
    """Bytes of every A and B of the wrapped model."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)


def fold_runs(model, repeats: int, label: str) -> tuple[list[float], dict]:
    """Seconds of ``surgeon.fold(graph)`` per repeat, and the first fold's check (``fold_check``)."""
    import surgeon
    from surgeon.capturing import example_inputs

    graph = model.graph_for(**example_inputs(model.base))
    times, check = [], {}
    for k in range(repeats):
        gc.collect()
        folded, dt = h.timed(lambda: surgeon.fold(graph))
        times.append(dt)
        if k == 0:
            check = fold_check(folded, model)
        del folded
        h.progress(f"{label} fold {k + 1}/{repeats}: {dt:.3f} s")
    return times, check


def expected_weight(model, tool: str, path: str, original):
    """``W + scale * B @ A`` for one target, the plain way (fp32, cast once to W's dtype)."""
    if tool == "surgeon":
        layer = next(x for x in model.adapter_state.lora_layers() if x.path == path)
        ad = layer.adapters["default"]
        d = (ad.lora_B.detach().float() @ ad.lora_A.detach().float()) * ad.scale
        d = d if layer.kind == "linear" else d.t()
    else:
        m = model.base_model.model.get_submodule(path)
        d = (m.lora_B["default"].weight.detach().float() @ m.lora_A["default"].weight.detach().float()) * m.scaling["default"]
        d = d.t() if m.fan_in_fan_out else d
    return (original.float() + d).to(original.dtype)


def diffs(new, original, expected) -> dict:
    """max |W' - W| (nonzero: B is nonzero) and max |W' - expected| (the merge is right)."""
    return {"change": (new.float() - original.float()).abs().max().item(),
            "error": (new.float() - expected.float()).abs().max().item()}


def fold_check(folded, model) -> dict:
    from surgeon.passes.fold import FOLDED_ROOT

    site = folded.meta["surgeon_folded"][0]
    w = model.base.get_submodule(site.layer.path).weight
    mine = next(p for n, p in folded.named_parameters() if n.startswith(FOLDED_ROOT) and n.endswith("." + site.node))
    return diffs(mine, w, expected_weight(model, "surgeon", site.layer.path, w.detach()))


def worker(args: argparse.Namespace) -> int:
    tool = "surgeon" if args.worker.startswith("surgeon") else "peft"
    if tool == "surgeon":
        apply_variant(args.worker)  # first: the thp lever sets an environment variable torch reads once
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    importlib.import_module(tool)
    label = f"[{args.worker} {args.model} {args.dtype}]"
    h.progress(f"{label} building the base model")
    base, build_s = h.timed(lambda: build(args.model, args.dtype, args.quick))
    weights = targeted(base, args.model)
    originals = {p: w.detach().clone() for p, w in weights.items()}
    result = {"tool": args.worker, "model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in base.parameters()), "build_s": build_s, "targets": len(weights),
              "target_params": sum(w.numel() for w in weights.values()),
              "weight_bytes": sum(w.numel() * w.element_size() for w in weights.values())}
    merges, wraps = [], []
    for k in range(args.repeat):
        if k:
            restore(weights, originals)
        gc.collect()
        torch.manual_seed(h.SEED + 3)
        model, wrap_s = h.timed(lambda: wrap(tool, base, args.model))
        wraps.append(wrap_s)
        if k == 0:
            result["lora_layers"] = sum(1 for n, p in model.named_parameters() if "lora_A" in n)
            result["adapter_bytes"] = adapter_bytes(model, tool)
            if tool == "surgeon":
                result["fold_s"], result["fold_check"] = fold_runs(model, args.repeat, label)
        first = next(iter(weights))
        expected = expected_weight(model, tool, first, originals[first]) if k == 0 else None
        gc.collect()
        merged, dt = h.timed(model.merge_and_unload)
        merges.append(dt)
        if k == 0:
            result["merge_check"] = diffs(merged.get_submodule(first).weight, originals[first], expected)
        h.progress(f"{label} merge_and_unload {k + 1}/{args.repeat}: {dt:.3f} s (wrap {wrap_s:.2f} s)")
        del model, merged
    result.update({"merge_s": merges, "wrap_s": wraps})
    result["breakdown"] = breakdown(tool, base, weights, originals, args)
    h.emit(result)
    return 0


def breakdown(tool: str, base, weights: dict, originals: dict, args: argparse.Namespace) -> dict:
    """One more (untimed in the table) merge, and fold for surgeon, with timers around their helpers."""
    import torch

    restore(weights, originals)
    torch.manual_seed(h.SEED + 3)
    model = wrap(tool, base, args.model)
    out = {}
    if tool == "surgeon":
        import surgeon
        from surgeon.capturing import example_inputs

        graph = model.graph_for(**example_inputs(model.base))
        t, undo = surgeon_timers()
        gc.collect()
        _, out["fold_total"] = h.timed(lambda: surgeon.fold(graph))
        out["fold"] = dict(t.seconds)
        if args.profile:
            h.progress(f"---- cProfile of surgeon.fold ({args.worker} {args.model} {args.dtype}) ----")
            h.progress(profile_top(lambda: surgeon.fold(graph)))
        t.seconds.clear()
        if args.profile:
            undo()
            h.progress(f"---- cProfile of merge_and_unload ({args.worker} {args.model} {args.dtype}) ----")
            h.progress(profile_top(model.merge_and_unload))
            return out
        gc.collect()
        _, out["merge_total"] = h.timed(model.merge_and_unload)
        out["merge"] = dict(t.seconds)
        undo()
    else:
        t, undo = peft_timers()
        gc.collect()
        _, out["merge_total"] = h.timed(model.merge_and_unload)
        out["merge"] = dict(t.seconds)
        undo()
    return out


# ---- bandwidth ---------------------------------------------------------------------------------
def bandwidth_worker(args: argparse.Namespace) -> int:
    """(read + written bytes) / s of copy_ on a 1 GiB fp32 tensor, into a touched and into a fresh dst."""
    import torch

    torch.set_num_threads(args.threads)
    n = (1 << 30 if not args.quick else 1 << 26) // 4
    src = torch.randn(n)
    dst = torch.empty(n)
    dst.zero_()
    touched, fresh = [], []
    for _ in range(8):
        t0 = time.perf_counter()
        dst.copy_(src)
        touched.append(time.perf_counter() - t0)
    for _ in range(8):
        t0 = time.perf_counter()
        new = torch.empty(n)
        new.copy_(src)
        fresh.append(time.perf_counter() - t0)
        del new
    nbytes = 2 * n * 4
    h.emit({"bytes": n * 4, "touched_gbs": nbytes / h.median(touched[1:]) / 1e9,
            "fresh_gbs": nbytes / h.median(fresh[1:]) / 1e9, "touched_s": touched, "fresh_s": fresh,
            "threads": torch.get_num_threads()})
    return 0


# ---- parent ------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_tables(args, bw: dict, results: dict, tools: list[str], start: str) -> None:
    bwb, fresh = bw["touched_gbs"] * 1e9, bw["fresh_gbs"] * 1e9
    print(start)
    print(f"end: {h.load_line()}")
    print(f"copy bandwidth (read + written bytes / s, {bw['bytes'] / 2**30:.2g} GiB fp32 copy_, median of 7, "
          f"{bw['threads']} threads): {bw['touched_gbs']:.2f} GB/s into a touched dst (the floor), "
          f"{bw['fresh_gbs']:.2f} GB/s into a freshly allocated dst (page faults; 'x fresh'), "
          f"{bw['thp']['fresh_gbs']:.2f} GB/s fresh with THP_MEM_ALLOC_ENABLE=1 (other processes: "
          f"{100 * bw['foreign_cpu']:.0f}% / {100 * bw['thp']['foreign_cpu']:.0f}% of the CPU)")
    print(f"workload: LoRA r={LORA['r']} alpha={LORA['lora_alpha']} init_lora_weights=False, median of "
          f"{args.repeat} (llama1b: {min(args.repeat, 3)}) per tool{' [--quick: tiny configs]' if args.quick else ''}; "
          "floor = (targeted W read + written + A,B read) bytes / bandwidth; |W'-W|: the merge changed the weight; "
          "err: max |W' - (W + scale*B@A in fp32, cast once)| of the first target; other%: share of the machine's CPU "
          "used by other processes while that worker ran")
    head = (f"{'model':<18} {'dtype':<9} {'tool':<20} {'call':<17} {'median s':>9} {'min s':>8} {'floor s':>8} "
            f"{'x floor':>8} {'x fresh':>8} {'x PEFT':>7} {'|W-W|':>7} {'err':>8} {'other%':>6}")
    print(head)
    print("-" * len(head))
    for (name, dtype), rows in results.items():
        ref = rows["peft"]
        nbytes = 2 * ref["weight_bytes"] + ref["adapter_bytes"]
        floor = nbytes / bwb
        peft_s = h.median(ref["merge_s"])
        model = f"{name} ({ref['params'] / 1e6:.1f}M)"
        lines = []
        for tool in tools:
            r = rows[tool]
            calls = [("merge_and_unload", r["merge_s"], r["merge_check"])]
            calls += [("fold(graph)", r["fold_s"], r["fold_check"])] if "fold_s" in r else []
            for call, xs, check in calls:
                med = h.median(xs)
                print(f"{model:<18} {dtype:<9} {tool:<20} {call:<17} {med:>9.3f} {min(xs):>8.3f} {floor:>8.3f} "
                      f"{med / floor:>8.1f} {med / (nbytes / fresh):>8.1f} {med / peft_s:>7.2f} "
                      f"{check['change']:>7.3f} {check['error']:>8.2g} {100 * r['foreign_cpu']:>6.0f}")
                if tool != "peft":
                    lines.append(f"  {tool} {call}: {med / peft_s:.2f}x PEFT (goal <= {GOAL_VS_PEFT}x: "
                                 f"{verdict(med / peft_s <= GOAL_VS_PEFT)}), {med / floor:.1f}x floor (goal <= "
                                 f"{GOAL_VS_FLOOR:g}x: {verdict(med / floor <= GOAL_VS_FLOOR)})")
        print(f"{'':<18} {ref['targets']} targeted modules, {ref['target_params'] / 1e6:.1f}M weights "
              f"({ref['weight_bytes'] / 1e6:.0f} MB) + A,B {ref['adapter_bytes'] / 1e6:.1f} MB; "
              f"LoRA layers surgeon {rows[tools[0]]['lora_layers']} / PEFT {ref['lora_layers']}")
        for line in lines:
            print(line)
    print()
    print("where the time goes (one extra run with timers; seconds):")
    for (name, dtype), rows in results.items():
        for tool in tools:
            b = rows[tool]["breakdown"]
            parts = []
            for call in ("merge", "fold"):
                if f"{call}_total" in b:
                    inner = ", ".join(f"{k} {v:.3f}" for k, v in sorted(b[call].items(), key=lambda kv: -kv[1]))
                    parts.append(f"{call} {b[f'{call}_total']:.3f} ({inner})")
            print(f"  {name:<8} {dtype:<9} {tool:<26} " + "; ".join(parts))


def parent(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [m for m in models if m not in MODELS] + [d for d in dtypes if d not in ("float32", "bfloat16")]
    if bad:
        print(f"bench_fold: error: unknown {bad}; models: {sorted(MODELS)}, dtypes: float32, bfloat16", file=sys.stderr)
        return 1
    variants = list(VARIANTS) if args.variant == "all" else ["surgeon"] + ([args.variant] if args.variant else [])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"bench_fold: error: --variant {unknown}; choose from {', '.join(VARIANTS)} or all", file=sys.stderr)
        return 1
    tools = variants + ["peft"]
    start = f"{h.machine_line()} (at start)\nstart: {h.load_line()}"
    common = ["--threads", str(args.threads)] + (["--quick"] if args.quick else []) + (["--profile"] if args.profile else [])
    h.progress("== copy bandwidth")
    bw = h.run_worker_load(__file__, ["--worker", "bandwidth", *common])
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    try:
        bw["thp"] = h.run_worker_load(__file__, ["--worker", "bandwidth", *common])
    finally:
        os.environ.pop("THP_MEM_ALLOC_ENABLE")
    results = {}
    for name in models:
        for dtype in dtypes:
            repeat = min(args.repeat, 3) if name == "llama1b" and not args.quick else args.repeat
            rows = {}
            for tool in tools:
                h.progress(f"== {name} {dtype} / {tool}")
                rows[tool] = h.run_worker_load(__file__, ["--worker", tool, "--model", name, "--dtype", dtype,
                                                     "--repeat", str(repeat), *common])
            results[(name, dtype)] = rows
    print_tables(args, bw, results, tools, start)
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bw, "results": [r for rows in results.values()
                                                                            for r in rows.values()]}, indent=1))
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Fold / merge benchmark: surgeon vs PEFT on CPU (see the module docstring).")
    ap.add_argument("--models", default="gpt2,llama1b", help="comma-separated, from: " + ", ".join(MODELS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, help="merge / fold repeats per tool (default 5, the 1B model at most 3; --quick 2)")
    ap.add_argument("--threads", type=int, default=h.threads(), help="torch.set_num_threads (default: cores)")
    ap.add_argument("--variant", default=None, help="add a surgeon row with a prototype lever: " + ", ".join(VARIANTS)
                    + ", or all")
    ap.add_argument("--profile", action="store_true", help="cProfile one surgeon merge and fold (to stderr)")
    ap.add_argument("--json", default=None, help="write every worker's result to this file")
    ap.add_argument("--quick", action="store_true", help="tiny configs, 2 repeats")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker == "bandwidth":
        return bandwidth_worker(args)
    return worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    sys.exit(main())
