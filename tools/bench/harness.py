"""python tools/bench/harness.py

Prints the machine line and, per benchmark model, its size, e.g.
``gpt2: GPT2LMHeadModel 124.4M params, LoRA on c_attn``.

Shared by the benchmarks in tools/bench/: the seeded random-init models (built from configs,
nothing downloaded), the LoRA recipe, the timed training loop, memory readings, and running one
measurement in its own subprocess so that peak RSS belongs to one tool.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

SEED = 0
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
LR = 1e-4

# name -> (transformers config class, full-size kwargs, --quick kwargs, LoRA targets)
MODELS: dict[str, tuple[str, dict, dict, list[str]]] = {
    # GPT2Config defaults: 12 layers, 768 wide, 12 heads, vocab 50257, 1024 positions (124.4M)
    "gpt2": ("GPT2Config", {}, {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 64,
                     "bos_token_id": 999, "eos_token_id": 999},  # ids inside the small vocabulary (genai checks)
             ["c_attn"]),
    # Llama at GPT-2-small scale: 768 wide, 12 layers, 12 heads, MLP 2048, vocab 32000, untied head (134.1M)
    "llama": ("LlamaConfig",
              {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
               "intermediate_size": 2048, "vocab_size": 32000, "max_position_embeddings": 2048},
              {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 64},
              ["q_proj", "v_proj"]),
    # Llama at about 1B: 2048 wide, 16 layers, 32 heads, MLP 5504, vocab 32000, untied head (940.6M)
    "llama1b": ("LlamaConfig",
                {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 32,
                 "intermediate_size": 5504, "vocab_size": 32000, "max_position_embeddings": 2048},
                None, ["q_proj", "v_proj"]),  # --quick: the tiny Llama above
}
MODELS["llama1b"] = (*MODELS["llama1b"][:2], MODELS["llama"][2], MODELS["llama1b"][3])


def threads() -> int:
    """The cores this process may run on (what both tools get via torch.set_num_threads)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_line() -> str:
    import torch
    import transformers

    from importlib import metadata

    try:
        peft_version = metadata.version("peft")
    except metadata.PackageNotFoundError:
        peft_version = "not installed"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {threads()} cores ({cpu_name()}), load average {load}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {peft_version}, "
            f"Python {platform.python_version()}")


def build_base(name: str, quick: bool = False):
    """The seeded random-init causal LM for ``name`` in train mode (dropouts as in its config)."""
    import torch
    import transformers

    cls_name, full, tiny, _ = MODELS[name]
    config = getattr(transformers, cls_name)(**(tiny if quick else full))
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.train()


def build_from_config(cls_name: str, kwargs: dict[str, Any], dtype: str = "float32"):
    """A seeded random-init causal LM from ``transformers.<cls_name>(**kwargs)`` in eval mode, in ``dtype``.

    Built in fp32 (so both dtypes share the same values up to rounding), then cast.
    """
    import torch
    import transformers

    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(getattr(torch, dtype)).eval()


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark / pytest processes (not this one, its parent or children)."""
    mine = {os.getpid(), os.getppid()}
    try:
        out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], stdout=subprocess.PIPE, text=True, check=False).stdout
    except OSError:
        return []
    found = []
    for line in out.splitlines():
        pid, ppid, cmd = (line.split(None, 2) + ["", "", ""])[:3]
        if not pid.isdigit() or int(pid) in mine or int(ppid) in mine or cmd.startswith(("ps ", "sh -c", "/bin/sh")):
            continue
        if any(k in cmd for k in ("bench_", "pytest", "train_tiny")):
            found.append(cmd[:120])
    return found


def load_line() -> str:
    """Load average and the other benchmark / pytest processes running now."""
    others = other_benchmarks()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"load average {load}; other benchmark/pytest processes: " + ("; ".join(others) if others else "none")


def lora_kwargs(name: str) -> dict[str, Any]:
    """Fields shared by ``surgeon.LoraConfig`` and ``peft.LoraConfig``."""
    return {**LORA, "target_modules": list(MODELS[name][3])}


def make_batch(vocab: int, batch: int, seq: int) -> dict[str, Any]:
    """A fixed seeded batch as a tokenizer / Trainer would give it; labels = input_ids."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def rss_now_mb() -> float:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, or since ``reset_peak`` (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Restart the peak RSS count (Linux: ``echo 5 > /proc/self/clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def train_steps(model, batch: dict, warmup: int, steps: int, label: str = "") -> tuple[list[float], list[float], list[float]]:
    """AdamW on the trainable parameters; returns wall and CPU seconds of each timed step, and every loss.

    A step is forward + loss + backward + ``optimizer.step()`` + ``zero_grad()``.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    torch.manual_seed(SEED + 2)  # same dropout masks for every tool
    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(loss.item())
        if i >= warmup:
            times.append(dt)
            cpu_times.append(dc)
        phase = "warm-up" if i < warmup else "step"
        n = i + 1 if i < warmup else i - warmup + 1
        progress(f"{label} {phase} {n}/{warmup if i < warmup else steps}: {dt:.2f} s, loss {losses[-1]:.4f}")
    return times, cpu_times, losses


def step_live_mb(model, batch: dict) -> float:
    """Peak MB of tensors alive during one more training step, above what was alive when it began.

    Counted from the profiler's allocation events, so unlike RSS it does not depend on how much
    freed memory the C allocator keeps (which moves peak RSS by hundreds of MB from run to run).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def emit(result: dict[str, Any]) -> None:
    """A worker's answer: one JSON line on stdout (progress goes to stderr)."""
    print(json.dumps(result), flush=True)


def bench_parser(doc: str, runs: int = 3, json_help: str = "write the results here") -> argparse.ArgumentParser:
    """The options the side-by-side benchmarks share (models, runs, threads, json, quick), and the hidden ones a
    parent passes its workers (worker, model, dir)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--runs", type=int, default=runs)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help=json_help)
    ap.add_argument("--quick", action="store_true", help="tiny configs: a smoke run")
    for hidden in ("--worker", "--model", "--dir"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    return ap


def run_worker(script: str, args: Sequence[str], python: str | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python script args...`` in a fresh process (this interpreter unless ``python``, with ``env`` added to the
    environment); return the last JSON line it printed."""
    proc = subprocess.run([python or sys.executable, script, *args], stdout=subprocess.PIPE, text=True, check=False,
                          env={**os.environ, **env} if env else None)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(args)} failed with exit status {proc.returncode}")
    return json.loads(lines[-1])


def finish(json_path: str | None, everything: dict[str, Any]) -> int:
    """Print the end load line and write every result as JSON when asked; the exit status of a parent."""
    print(f"end: {load_line()}")
    if json_path:
        from pathlib import Path

        Path(json_path).write_text(json.dumps(everything, indent=2))
    return 0


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (from /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz


def run_worker_load(script: str, args: Sequence[str]) -> dict[str, Any]:
    """``run_worker``, plus ``foreign_cpu``: the share of the machine's CPU time used by other processes meanwhile
    (0: the worker had the machine to itself; 0.5 on 2 cores: another process kept one core busy)."""
    (busy0, total0), kids0 = cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_worker(script, args)
    (busy1, total1), kids1 = cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
    result["foreign_cpu"] = max(0.0, (busy1 - busy0 - mine) / max(total1 - total0, 1e-9))
    return result


def main() -> int:
    import torch

    torch.set_num_threads(threads())
    print(machine_line())
    for name, (cls_name, _, _, targets) in MODELS.items():
        model = build_base(name)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {type(model).__name__} {n / 1e6:.1f}M params ({cls_name}), LoRA on {', '.join(targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
