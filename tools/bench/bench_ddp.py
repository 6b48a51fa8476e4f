"""python tools/bench/bench_ddp.py

Training on several processes, surgeon against PEFT, CPU, fp32, gloo: one table row per model x variant with
the processes x threads, rows per rank, the seconds to wrap the model (DDP's broadcast, FSDP's sharding), the
median step seconds, the global rows per second and its ratio to the same tool in one process; per rank (the
largest): the tensor storage held between steps (each storage once; a DTensor its shard), the peak of tensors
alive during one more step above that (profiler allocation events: what a GPU would need on top), RSS between
steps and peak RSS while training with its ratio to one process; and the first loss averaged over ranks (same
weights and global batch in every row; the dropout masks depend on how the rows are split, so the loss matches
at the same number of processes). Progress goes to stderr.

Variants (the global batch is the same in all: ``--batch`` rows x ``--seq`` tokens, split over the ranks):
``surgeon`` / ``peft`` (one process, ``--threads`` threads), ``surgeon-ddp`` / ``peft-ddp`` (``torchrun
--nproc-per-node 2``, one thread each, DistributedDataParallel), ``surgeon-fsdp`` (``fully_shard(model)``: the
whole model is one FSDP unit, so each rank gathers the whole base for every forward and backward) and
``peft-fsdp`` (``fully_shard`` on each decoder layer, then the model: one layer gathered at a time).

Models: ``gpt2`` (GPT2Config defaults, 124.4M, LoRA on c_attn; batch 4 x 128) and ``llama1b`` (940.6M, LoRA on
q_proj, v_proj; FSDP rows only by default, batch 2 x 64: the per-rank memory question). Each variant runs in its
own process tree, so the RSS figures are one tool's. On 2 cores, 2 processes x 1 thread cannot beat 1 process x 2
threads: the table says what the extra process costs, not what a second machine would buy.

Options: ``--models gpt2,llama1b``, ``--variants`` (comma list; default per model as above), ``--warmup 2``,
``--steps 5``, ``--threads 2``, ``--no-live`` (skip the profiled step), ``--json PATH``, ``--quick`` (tiny configs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import harness as h

DEFAULTS = {"gpt2": ("surgeon", "surgeon-ddp", "surgeon-fsdp", "peft", "peft-ddp", "peft-fsdp"),
            "llama1b": ("surgeon", "surgeon-fsdp", "peft-fsdp")}
SHAPES = {"gpt2": (4, 128), "llama1b": (2, 64)}


# ---- worker: one rank ----------------------------------------------------------------------
def wrap(variant: str, model):
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if variant.endswith("-ddp"):
        return DistributedDataParallel(model)
    if variant == "peft-fsdp":  # PEFT's model calls the base's layers: shard each, as Accelerate's auto-wrap does
        for m in model.modules():
            if type(m).__name__.endswith(("DecoderLayer", "Block")) and isinstance(m, torch.nn.Module):
                fully_shard(m)
    if variant.endswith("-fsdp"):
        return fully_shard(model)
    return model


def held_mb() -> float:
    """MB of tensor storage alive in this process (each storage once; a DTensor counts its local shard)."""
    import torch
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            t = obj._local_tensor if isinstance(obj, DTensor) else obj
            with contextlib.suppress(RuntimeError):  # tensors without storage (e.g. functional wrappers)
                storage = t.untyped_storage()
                seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values()) / 2**20


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist
    import transformers

    from surgeon.workflows.processes import settle_and_destroy

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tool = args.worker.split("-")[0]
    lib = __import__(tool)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    label = f"[{args.worker} {args.model} rank {rank}]"
    base = h.build_base(args.model, args.quick)
    config = lib.LoraConfig(task_type="CAUSAL_LM", **h.lora_kwargs(args.model))
    model = lib.get_peft_model(base, config).train()
    batch = h.make_batch(base.config.vocab_size, args.batch, args.seq)
    share = args.batch // world
    mine = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    wrapped, wrap_s = h.timed(lambda: wrap(args.worker, model))
    h.reset_peak()
    h.progress(f"{label} wrapped in {wrap_s:.2f} s, RSS {h.rss_now_mb():.0f} MB")
    times, _, losses = h.train_steps(wrapped, mine, args.warmup, args.steps, label)
    peak = h.peak_rss_mb()
    gc.collect()
    rest, held = h.rss_now_mb(), held_mb()  # between steps
    live = h.step_live_mb(wrapped, mine) if not args.no_live else float("nan")
    first = torch.tensor(losses[0])
    if world > 1:
        dist.all_reduce(first)
        settle_and_destroy()
    (Path(args.dir) / f"rank{rank}.json").write_text(json.dumps({
        "wrap_s": wrap_s, "step_s": h.median(times), "rest_rss_mb": rest, "peak_rss_mb": peak, "held_mb": held,
        "step_live_mb": live,
        "first_loss": first.item() / world, "rows": share, "threads": torch.get_num_threads()}))
    return 0


# ---- parent ----------------------------------------------------------------------------------
def run(variant: str, name: str, args: argparse.Namespace) -> dict:
    processes = 1 if variant in ("surgeon", "peft") else 2
    threads = args.threads if processes == 1 else max(1, args.threads // 2)
    batch, seq = (4, 16) if args.quick else SHAPES[name]
    with tempfile.TemporaryDirectory() as d:
        launcher = ([] if processes == 1 else
                    ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)])
        cmd = [sys.executable, *launcher, __file__, "--worker", variant, "--model", name, "--dir", d,
               "--batch", str(batch), "--seq", str(seq), "--threads", str(threads),
               "--warmup", str(args.warmup), "--steps", str(args.steps), *(["--quick"] if args.quick else []),
               *(["--no-live"] if args.no_live else [])]
        proc = subprocess.run(cmd, check=False, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} {name} failed with exit status {proc.returncode}")
        ranks = [json.loads((Path(d) / f"rank{r}.json").read_text()) for r in range(processes)]
    return {"variant": variant, "model": name, "processes": processes, "threads": threads, "ranks": ranks,
            "batch": batch, "seq": seq, "step_s": max(r["step_s"] for r in ranks),
            "wrap_s": max(r["wrap_s"] for r in ranks), "rest_rss_mb": max(r["rest_rss_mb"] for r in ranks),
            "held_mb": max(r["held_mb"] for r in ranks), "step_live_mb": max(r["step_live_mb"] for r in ranks),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "first_loss": ranks[0]["first_loss"]}


def table(results: list[dict]) -> None:
    print(f"{'variant':<13} {'procs x thr':>11} {'rows/rank':>9} {'wrap s':>7} {'step s':>7} {'rows/s':>7} "
          f"{'vs 1 proc':>9} {'held MB':>8} {'step MB':>8} {'RSS MB':>7} {'peak RSS':>8} {'vs 1 proc':>9} {'loss 1':>8}")
    alone = {r["variant"].split("-")[0]: r for r in results if r["processes"] == 1}
    for r in results:
        one = alone.get(r["variant"].split("-")[0])
        speed = r["batch"] / r["step_s"]
        x_speed = f"{speed / (one['batch'] / one['step_s']):.2f}x" if one else "-"
        x_mem = f"{r['peak_rss_mb'] / one['peak_rss_mb']:.2f}x" if one else "-"
        print(f"{r['variant']:<13} {r['processes']:>5} x {r['threads']:<3} {r['batch'] // r['processes']:>9} "
              f"{r['wrap_s']:>7.2f} {r['step_s']:>7.2f} {speed:>7.1f} {x_speed:>9} {r['held_mb']:>8.0f} "
              f"{r['step_live_mb']:>8.0f} {r['rest_rss_mb']:>7.0f} {r['peak_rss_mb']:>8.0f} {x_mem:>9} {r['first_loss']:>8.4f}")


def main() -> int:
    ap = h.bench_parser(__doc__)
    ap.set_defaults(models="gpt2,llama1b")
    ap.add_argument("--variants", help="comma list (default: per model, see the docstring)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-live", action="store_true", help="skip the profiled step (it needs memory of its own)")
    ap.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=128, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(h.machine_line())
    everything = []
    for name in args.models.split(","):
        results = []
        for variant in (args.variants.split(",") if args.variants else DEFAULTS[name]):
            h.progress(f"== {name} {variant}")
            results.append(run(variant, name, args))
        b, s = results[0]["batch"], results[0]["seq"]
        print(f"\n{name}: global batch {b} x {s}, LoRA r={h.LORA['r']} on {', '.join(h.MODELS[name][3])}, "
              f"{args.steps} timed steps after {args.warmup}")
        table(results)
        everything += results
    return h.finish(args.json, {"results": everything})


if __name__ == "__main__":
    sys.exit(main())
