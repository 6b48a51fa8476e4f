"""python tools/bench/bench_train.py

Prints the machine line (CPU, cores, load, torch / transformers / peft versions), the workload,
then one table row per model x variant: get_peft_model seconds (surgeon: on an empty capture cache,
cold, or in a new process on the cache a cold run wrote, warm), first-step seconds (the compiled variants compile there), median (and minimum) train-step
seconds and the ratio to PEFT eager, peak RSS MB and its ratio, the step's peak live tensor MB, the
first loss (equal for every variant: same weights, same batch) and the other processes' CPU share;
under each model the goals: default step <= 0.95x PEFT eager, compile=True step <= 0.85x, peak RSS
<= 0.8x, get_peft_model <= 1.5x PEFT's on a warm capture cache. Progress goes to stderr. About
25 minutes on 2 idle cores (two compiled runs per tool); ``--quick`` (tiny configs, 1 thread) a few.

Variants: ``surgeon`` (defaults: the exact fast paths on), ``surgeon-plain`` (``model.fast_paths =
False``: what the fast paths buy), ``surgeon+compile`` (``get_peft_model(..., compile=True)``),
``surgeon+compile#warm`` (the same in a second process, on the inductor cache the first filled),
``peft`` (eager) and ``peft+compile`` (``torch.compile(peft_model)``). Each model gets a fresh
inductor cache folder, so the first compiled run of each tool is cold.

Training benchmark of surgeon against PEFT on CPU, fp32: a GPT-2-small-sized model (GPT2Config
defaults, 124.4M params, LoRA on c_attn) and a Llama at the same scale (hidden 768, 12 layers,
12 heads, MLP 2048, vocab 32000, untied head: 134.1M params, LoRA on q_proj and v_proj), both
random-init and seeded, LoRA r=8 alpha=16 dropout 0, batch 4 x seq 128 (input_ids, an all-ones
attention_mask, labels = input_ids), AdamW lr 1e-4; a step is forward + loss + backward +
``optimizer.step()`` + ``zero_grad()``. Each model x variant runs in its own subprocess
(``--worker VARIANT --model NAME``, which prints one JSON line), so peak RSS (``ru_maxrss``) is one
tool's; where Linux allows, the peak count restarts after the build and after injection, so the
JSON also holds the peak of each phase. Every worker gets ``torch.set_num_threads(--threads)``.

On a shared machine the step times swing with other processes' load; read the other-CPU column, use
``--repeat 2`` (the table keeps each variant's run with the fastest median step) or ``--threads 1``.
Peak RSS barely moves with load.

Options: ``--models gpt2,llama``, ``--variants`` (comma list), ``--warmup 3``, ``--steps 10``,
``--batch 4``, ``--seq 128``, ``--threads N`` (default: the cores), ``--repeat K``, ``--json PATH``
(every worker's result), ``--fixed-mmap``, ``--quick``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import harness as h

# surgeon: default settings (fast paths on); surgeon-plain: fast paths off (the plain captured graph);
# +compile: surgeon's compile=True / PEFT's torch.compile(model); "#warm": a second process on the same inductor cache
VARIANTS = ("surgeon", "surgeon-plain", "surgeon+compile", "surgeon+compile#warm", "peft", "peft+compile")
GOAL_STEP, GOAL_STEP_COMPILE, GOAL_MEM, GOAL_INJECT_X = 0.95, 0.85, 0.8, 1.5


# ---- worker: one tool, one model, in this process ------------------------------------------
def lib_of(variant: str) -> str:
    return "peft" if variant.startswith("peft") else "surgeon"


def inject(variant: str, base, name: str):
    """The tool's ``get_peft_model`` (its package is imported already, outside the timing)."""
    lib = sys.modules[lib_of(variant)]
    config = lib.LoraConfig(task_type="CAUSAL_LM", **h.lora_kwargs(name))
    if variant.startswith("peft"):
        model = lib.get_peft_model(base, config)
        if "+compile" in variant:
            import torch

            model = torch.compile(model)  # what PEFT's docs recommend
        return model
    model = lib.get_peft_model(base, config, compile="+compile" in variant)
    model.fast_paths = variant != "surgeon-plain"
    return model


def worker(args: argparse.Namespace) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    importlib.import_module(lib_of(args.worker))  # before the base model: imports count in the base RSS
    result = measure(args.worker, args.model, args)
    h.emit(result)
    return 0


def measure(tool: str, name: str, args: argparse.Namespace) -> dict:
    """Build, inject, train; peak RSS per phase where the kernel lets us restart the count."""
    import torch

    label = f"[{tool} {name}]"
    h.progress(f"{label} building the base model")
    base = h.build_base(name, args.quick)
    n_params = sum(p.numel() for p in base.parameters())  # before PEFT adds its adapters to ``base``
    rss_base, peak_build = h.rss_now_mb(), h.peak_rss_mb()
    cache = os.environ.get("SURGEON_CACHE_DIR")
    warm = lib_of(tool) == "surgeon" and bool(cache) and any(Path(cache).glob("capture/*.json"))
    phases = h.reset_peak()
    model, inject_s = h.timed(lambda: inject(tool, base, name))
    peak_inject = h.peak_rss_mb()
    h.progress(f"{label} injected in {inject_s:.2f} s")
    batch = h.make_batch(base.config.vocab_size, args.batch, args.seq)
    h.reset_peak()
    first_step_s = first_step(model.train(), batch, label)
    (busy0, total0), own0 = h.cpu_seconds(), time.process_time()
    times, cpu_times, losses = h.train_steps(model.train(), batch, args.warmup, args.steps, label)
    (busy1, total1), own1 = h.cpu_seconds(), time.process_time()
    other_cpu = max(0.0, (busy1 - busy0 - (own1 - own0)) / max(total1 - total0, 1e-9))
    peak_train, load = h.peak_rss_mb(), os.getloadavg()[0]
    peak = max(peak_build, peak_inject, peak_train) if phases else peak_train
    live = h.step_live_mb(model, batch)  # after the RSS readings: the profiler allocates too
    return {
        "tool": tool, "model": name, "params": n_params,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "threads": torch.get_num_threads(),
        "inject_s": inject_s, "step_s": h.median(times), "step_cpu_s": h.median(cpu_times), "steps_s": times,
        "losses": losses, "peak_rss_mb": peak, "rss_base_mb": rss_base, "rss_growth_mb": peak - rss_base,
        "peak_phases_mb": {"build": peak_build, "inject": peak_inject, "train": peak_train} if phases else None,
        "load_1m": load, "other_cpu": other_cpu, "step_live_mb": live, "first_step_s": first_step_s,
        "capture_cache": ("warm" if warm else "cold") if lib_of(tool) == "surgeon" else None,
    }


def first_step(model, batch: dict, label: str) -> float:
    """Seconds of the first forward + backward (compilation, for the compiled variants); gradients dropped after,
    so the timed steps start from the same weights and the same first loss."""
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    seconds = time.perf_counter() - t0
    for p in model.parameters():
        p.grad = None
    h.progress(f"{label} first step {seconds:.2f} s")
    return seconds


# ---- parent: spawn workers, print the table -----------------------------------------------
def worker_args(args: argparse.Namespace, tool: str, name: str) -> list[str]:
    out = ["--worker", tool, "--model", name, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    return out + (["--quick"] if args.quick else [])


def best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["step_s"])


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_table(args: argparse.Namespace, results: dict[tuple[str, str], list[dict]], models: list[str],
                variants: list[str], machine: str) -> None:
    print(machine + " (at start)")
    malloc = "; MALLOC_MMAP_THRESHOLD_=131072" if args.fixed_mmap else ""
    print(f"workload{malloc}: fp32 CPU, batch {args.batch} x seq {args.seq}, LoRA r={h.LORA['r']} alpha={h.LORA['lora_alpha']} "
          f"dropout={h.LORA['lora_dropout']}, AdamW lr {h.LR}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.repeat} run(s) per variant{' [--quick: tiny configs]' if args.quick else ''}")
    head = (f"{'model':<16} {'variant':<22} {'get_peft_model s':>20} {'first step s':>12} {'step s median (min)':>20} "
            f"{'x PEFT':>7} {'peak RSS MB':>12} {'x PEFT':>7} {'step live MB':>13} {'loss0':>8} {'other CPU':>10}")
    print(head)
    print("-" * len(head))
    for name in models:
        rows = {v: best(results[(name, v)]) for v in variants}
        peft = rows.get("peft")
        for v in variants:
            print(table_row(name, v, rows[v], peft))
        if peft is not None:
            print(goals_line(rows, peft))
    print("get_peft_model: seconds of the call; surgeon's '(cold)' run captures with torch.export, '(warm)' ones are "
          "new processes that load the capture cache the cold one wrote")
    print("first step: forward + backward of the first batch (the compiled variants compile then; '#warm' is a second "
          "process on the inductor cache the first one filled); other CPU: share of the machine's CPU time other processes "
          "used during the timed steps; step live: peak MB of tensors alive in one step above its start (profiler "
          "allocation events; unlike RSS, free of the C allocator's retention)")


def table_row(name: str, variant: str, r: dict, peft: dict | None) -> str:
    inj = f"{r['inject_s']:.2f}" + (f" ({r['capture_cache']})" if r.get("capture_cache") else "")
    model = f"{name} ({r['params'] / 1e6:.1f}M)"
    step = f"{r['step_s']:.2f} ({min(r['steps_s']):.2f})"
    step_x = f"{r['step_s'] / peft['step_s']:.2f}" if peft else "-"
    mem_x = f"{r['peak_rss_mb'] / peft['peak_rss_mb']:.2f}" if peft else "-"
    return (f"{model:<16} {variant:<22} {inj:>20} {r['first_step_s']:>12.2f} {step:>20} {step_x:>7} {r['peak_rss_mb']:>12.0f} "
            f"{mem_x:>7} {r['step_live_mb']:>13.0f} {r['losses'][0]:>8.4f} {r['other_cpu']:>10.0%}")


def goals_line(rows: dict[str, dict], peft: dict) -> str:
    parts = []
    if "surgeon" in rows:
        s = rows["surgeon"]
        step, mem = s["step_s"] / peft["step_s"], s["peak_rss_mb"] / peft["peak_rss_mb"]
        parts.append(f"step {step:.2f}x PEFT (goal <= {GOAL_STEP}x: {verdict(step <= GOAL_STEP)})")
        parts.append(f"peak RSS {mem:.2f}x (goal <= {GOAL_MEM}x: {verdict(mem <= GOAL_MEM)})")
    warm = [r["inject_s"] for r in rows.values() if r.get("capture_cache") == "warm"]
    if warm:
        inj = min(warm) / peft["inject_s"]
        parts.append(f"get_peft_model on a warm capture cache {min(warm):.2f} s = {inj:.1f}x PEFT's "
                     f"(goal <= {GOAL_INJECT_X}x: {verdict(inj <= GOAL_INJECT_X)})")
    if "surgeon+compile" in rows:
        c = rows["surgeon+compile"]["step_s"] / peft["step_s"]
        parts.append(f"compile=True step {c:.2f}x PEFT eager (goal <= {GOAL_STEP_COMPILE}x: {verdict(c <= GOAL_STEP_COMPILE)})")
    return f"{'':<16} goals: " + "; ".join(parts)


def parent(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [m for m in models if m not in h.MODELS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"bench_train: error: unknown {unknown}; --models from {sorted(h.MODELS)}, --variants from {list(VARIANTS)}",
              file=sys.stderr)
        return 1
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if args.fixed_mmap else {}  # glibc: big blocks mmapped, returned on free
    machine = h.machine_line()
    results: dict[tuple[str, str], list[dict]] = {(m, v): [] for m in models for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        for name in models:
            for k in range(args.repeat):
                for v in (variants if k % 2 == 0 else variants[::-1]):  # alternate who goes first
                    h.progress(f"== {name} / {v} (run {k + 1}/{args.repeat})")
                    # a fresh inductor cache per model: the first compiled run is cold, '#warm' reuses it
                    # and a fresh capture cache: the first surgeon run captures (cold), the later ones load (warm)
                    run_env = {**env, "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, f"{name}-{k}"),
                               "SURGEON_CACHE_DIR": os.path.join(cache, f"surgeon-{name}-{k}")}
                    results[(name, v)].append(h.run_worker(__file__, worker_args(args, v.split("#")[0], name), env=run_env))
    print_table(args, results, models, variants, machine)
    print(h.load_line() + " (at end)")
    if args.json:
        Path(args.json).write_text(json.dumps([r for runs in results.values() for r in runs], indent=1))
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Training benchmark: surgeon vs PEFT on CPU (see the module docstring).")
    ap.add_argument("--models", default="gpt2,llama", help="comma-separated, from: " + ", ".join(h.MODELS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, help="timed steps (default 10; --quick 2)")
    ap.add_argument("--batch", type=int, help="default 4; --quick 2")
    ap.add_argument("--seq", type=int, help="default 128; --quick 16")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for both tools (default: cores; --quick 1)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--fixed-mmap", action="store_true",
                    help="run the workers with MALLOC_MMAP_THRESHOLD_=131072 (peak RSS without glibc's heap retention)")
    ap.add_argument("--json", default=None, help="write every worker's result to this file")
    ap.add_argument("--quick", action="store_true", help="tiny configs, batch 2 x seq 16, 1 warm-up + 2 steps")
    ap.add_argument("--worker", choices=[v for v in VARIANTS if "#" not in v], help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(h.MODELS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    defaults = ({"warmup": 1, "steps": 2, "batch": 2, "seq": 16, "threads": 1} if args.quick
                else {"warmup": 3, "steps": 10, "batch": 4, "seq": 128, "threads": h.threads()})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    sys.exit(main())
