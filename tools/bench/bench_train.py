"""python tools/bench/bench_train.py

Prints the machine line (CPU, cores, load, torch / transformers / peft versions), the workload,
then one table row per model x tool: inject seconds (surgeon: cold capture / warm capture
cache), median (and minimum) train-step seconds, peak RSS MB, RSS growth since the base model
was built, the first loss (equal for both tools: same weights, same batch) and the load average;
under each model the surgeon/PEFT ratios next to the goals (step time <= 0.9x PEFT, peak memory
<= 0.9x PEFT, inject <= 1 s on a warm capture cache); last, the load and any other benchmark or
pytest processes seen at the end. Progress goes to stderr. About 10 minutes on 2 idle cores
(x ``--repeat``); ``--quick`` (tiny configs, 1 thread) takes about a minute.

Training benchmark of surgeon against PEFT on CPU, fp32: a GPT-2-small-sized model (GPT2Config
defaults, 124.4M params, LoRA on c_attn) and a Llama at the same scale (hidden 768, 12 layers,
12 heads, MLP 2048, vocab 32000, untied head: 134.1M params, LoRA on q_proj and v_proj), both
random-init and seeded, LoRA r=8 alpha=16 dropout 0, batch 4 x seq 128 (input_ids, an all-ones
attention_mask, labels = input_ids), AdamW lr 1e-4; a step is forward + loss + backward +
``optimizer.step()`` + ``zero_grad()``. Each model x tool runs in its own subprocess
(``--worker TOOL --model NAME``, which prints one JSON line), so peak RSS (``ru_maxrss``) is one
tool's; where Linux allows, the peak count restarts after the build and after injection, so the
JSON also holds the peak of each phase. Both tools get ``torch.set_num_threads(--threads)``.

On a shared machine the step times swing by 4x with other processes' load (two threads that
wait on each other at every op); read the load column, use ``--repeat 2`` (the table keeps each
tool's run with the fastest median step) or ``--threads 1``. Peak RSS barely moves with load.

Options: ``--models gpt2,llama``, ``--warmup 3``, ``--steps 10``, ``--batch 4``, ``--seq 128``,
``--threads N`` (default: the cores), ``--repeat K`` (K runs per tool, alternating which tool
goes first), ``--json PATH`` (every worker's result), ``--quick``.
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

TOOLS = ("surgeon", "peft")
GOAL_STEP, GOAL_MEM, GOAL_INJECT_S = 0.9, 0.9, 1.0


# ---- worker: one tool, one model, in this process ------------------------------------------
def inject(tool: str, base, name: str):
    """The tool's ``get_peft_model`` (its package is imported already, outside the timing)."""
    lib = sys.modules[tool]
    return lib.get_peft_model(base, lib.LoraConfig(task_type="CAUSAL_LM", **h.lora_kwargs(name)))


def warm_inject_s(name: str, quick: bool) -> float:
    """surgeon.get_peft_model on a model whose capture is cached already (``surgeon.capture`` first)."""
    import surgeon

    base = h.build_base(name, quick)
    surgeon.capture(base)
    _, seconds = h.timed(lambda: inject("surgeon", base, name))
    return seconds


def worker(args: argparse.Namespace) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    importlib.import_module(args.worker)  # before the base model: imports count in the base RSS
    result = measure(args.worker, args.model, args)
    if args.worker == "surgeon":
        gc.collect()
        result["inject_warm_s"] = warm_inject_s(args.model, args.quick)
        h.progress(f"[surgeon {args.model}] warm inject {result['inject_warm_s']:.2f} s")
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
    phases = h.reset_peak()
    model, inject_s = h.timed(lambda: inject(tool, base, name))
    peak_inject = h.peak_rss_mb()
    h.progress(f"{label} injected in {inject_s:.2f} s")
    batch = h.make_batch(base.config.vocab_size, args.batch, args.seq)
    h.reset_peak()
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
        "load_1m": load, "other_cpu": other_cpu, "step_live_mb": live,
    }


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
                machine: str) -> None:
    print(machine + " (at start)")
    malloc = "; MALLOC_MMAP_THRESHOLD_=131072" if args.fixed_mmap else ""
    print(f"workload{malloc}: fp32 CPU, batch {args.batch} x seq {args.seq}, LoRA r={h.LORA['r']} alpha={h.LORA['lora_alpha']} "
          f"dropout={h.LORA['lora_dropout']}, AdamW lr {h.LR}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.repeat} run(s) per tool{' [--quick: tiny configs]' if args.quick else ''}")
    head = (f"{'model':<16} {'tool':<8} {'inject s (cold/warm)':>20} {'step s median (min)':>20} {'peak RSS MB':>12} "
            f"{'RSS growth MB':>14} {'step live MB':>13} {'loss0':>8} {'other CPU':>10}")
    print(head)
    print("-" * len(head))
    for name in models:
        rows = {tool: best(results[(name, tool)]) for tool in TOOLS}
        for tool in TOOLS:
            print(table_row(name, tool, rows[tool]))
        print(ratio_line(rows["surgeon"], rows["peft"]))
    print("other CPU: share of the machine's CPU time that other processes used during the timed steps (step times "
          "are trustworthy only near 0%); step live: peak MB of tensors alive in one step above its start "
          "(profiler allocation events; unlike RSS, free of the C allocator's retention)")


def table_row(name: str, tool: str, r: dict) -> str:
    inj = f"{r['inject_s']:.2f}" + (f" / {r['inject_warm_s']:.2f}" if "inject_warm_s" in r else "")
    model = f"{name} ({r['params'] / 1e6:.1f}M)"
    step = f"{r['step_s']:.2f} ({min(r['steps_s']):.2f})"
    return (f"{model:<16} {tool:<8} {inj:>20} {step:>20} {r['peak_rss_mb']:>12.0f} {r['rss_growth_mb']:>14.0f} "
            f"{r['step_live_mb']:>13.0f} {r['losses'][0]:>8.4f} {r['other_cpu']:>10.0%}")


def ratio_line(s: dict, p: dict) -> str:
    step_ratio, min_ratio = s["step_s"] / p["step_s"], min(s["steps_s"]) / min(p["steps_s"])
    mem_ratio = s["peak_rss_mb"] / p["peak_rss_mb"]
    growth_ratio = s["rss_growth_mb"] / max(p["rss_growth_mb"], 1e-9)
    live_ratio = s["step_live_mb"] / max(p["step_live_mb"], 1e-9)
    return (f"{'':<16} surgeon/peft: step {step_ratio:.2f}x, min {min_ratio:.2f}x "
            f"(goal <= {GOAL_STEP}x: {verdict(step_ratio <= GOAL_STEP)}); "
            f"peak RSS {mem_ratio:.2f}x (goal <= {GOAL_MEM}x: {verdict(mem_ratio <= GOAL_MEM)}), growth {growth_ratio:.2f}x, "
            f"step live {live_ratio:.2f}x; "
            f"warm inject {s['inject_warm_s']:.2f} s (goal <= {GOAL_INJECT_S:g} s: {verdict(s['inject_warm_s'] <= GOAL_INJECT_S)})")


def parent(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in h.MODELS]
    if unknown:
        print(f"bench_train: error: --models: unknown {unknown}; choose from {sorted(h.MODELS)}", file=sys.stderr)
        return 1
    if args.fixed_mmap:  # glibc: big blocks always mmapped, returned on free; RSS then tracks live memory
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    machine = h.machine_line()
    results: dict[tuple[str, str], list[dict]] = {(m, t): [] for m in models for t in TOOLS}
    for name in models:
        for k in range(args.repeat):
            for tool in (TOOLS if k % 2 == 0 else TOOLS[::-1]):  # alternate who goes first
                h.progress(f"== {name} / {tool} (run {k + 1}/{args.repeat})")
                results[(name, tool)].append(h.run_worker(__file__, worker_args(args, tool, name)))
    print_table(args, results, models, machine)
    print(h.load_line() + " (at end)")
    if args.json:
        Path(args.json).write_text(json.dumps([r for runs in results.values() for r in runs], indent=1))
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Training benchmark: surgeon vs PEFT on CPU (see the module docstring).")
    ap.add_argument("--models", default="gpt2,llama", help="comma-separated, from: " + ", ".join(h.MODELS))
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
    ap.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
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
