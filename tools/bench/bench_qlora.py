"""python tools/bench/bench_qlora.py

QLoRA on CPU, surgeon vs PEFT + bitsandbytes, each tool in its own process: peak RSS while loading
the 4-bit base (MB), peak RSS while training, the median training-step seconds, the live-tensor
peak of one step (allocator-independent), the last loss, and the goals (peak memory <= 0.9x
PEFT, step time <= 1.0x PEFT). Progress goes to stderr. About 8 minutes on 2 cores for the
~130M Llama; ``--quick`` (tiny config) about a minute.

Workload: the Llama of bench_train.py (768 wide, 12 layers, vocab 32000, untied head: 134.1M
params), random-init, seeded, saved once as fp32 safetensors (537 MB). Both tools load it 4-bit:
nf4, double quantization, fp32 compute, the head float. PEFT: transformers
``from_pretrained(quantization_config=BitsAndBytesConfig(...), device_map="cpu")`` then
``peft.get_peft_model``; surgeon: ``surgeon.quant.load_quantized`` (quantizes tensor by tensor
as it reads) then ``surgeon.get_peft_model``. LoRA r=8 alpha=16 dropout 0 on q_proj and v_proj;
batch 4 x 128, AdamW, ``--steps`` (default 6) timed after 2 warm-up steps. 2 threads.
Options: ``--models llama``, ``--steps``, ``--threads``, ``--keep DIR``, ``--json PATH``, ``--quick``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness as h

GOAL_MEMORY, GOAL_STEP = 0.9, 1.0
BATCH, SEQ = 4, 128


def save_worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    base = h.build_base(args.model, args.quick)
    base.save_pretrained(Path(args.dir) / "base")
    h.emit({"worker": "save", "params": sum(p.numel() for p in base.parameters()),
            "bytes": sum(f.stat().st_size for f in (Path(args.dir) / "base").glob("*.safetensors"))})
    return 0


def tool_worker(args) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    directory = Path(args.dir) / "base"
    rss0 = h.rss_now_mb()
    t0 = time.perf_counter()
    config = dict(h.lora_kwargs(args.model))
    if args.worker == "peft":
        import peft

        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        base = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=bnb, device_map="cpu")
        load_s = time.perf_counter() - t0
        load_peak = h.peak_rss_mb()
        model = peft.get_peft_model(base, peft.LoraConfig(**config))
    else:
        import surgeon
        from surgeon.quant import load_quantized

        base = load_quantized(directory, bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")
        load_s = time.perf_counter() - t0
        load_peak = h.peak_rss_mb()
        model = surgeon.get_peft_model(base, surgeon.LoraConfig(**config))
    model.train()
    after_load = h.rss_now_mb()
    batch = h.make_batch(base.config.vocab_size, BATCH if not args.quick else 2, SEQ if not args.quick else 16)
    h.reset_peak()
    times, _, losses = h.train_steps(model, batch, 2, args.steps, f"[{args.worker} {args.model}]")
    train_peak = h.peak_rss_mb()
    live = h.step_live_mb(model, batch)
    h.emit({"worker": args.worker, "load_s": load_s, "load_peak_mb": load_peak, "rss_start_mb": rss0,
            "rss_after_load_mb": after_load, "train_peak_mb": train_peak, "step_s": times, "step_live_mb": live,
            "last_loss": losses[-1]})
    return 0


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def parent(args) -> int:
    print(h.machine_line())
    print(f"start: {h.load_line()}")
    everything = {}
    for name in args.models.split(","):
        root = Path(args.keep) / name if args.keep else Path(tempfile.mkdtemp(prefix=f"bench-qlora-{name}-"))
        root.mkdir(parents=True, exist_ok=True)
        common = ["--model", name, "--dir", str(root), "--threads", str(args.threads), "--steps", str(args.steps)]
        common += ["--quick"] if args.quick else []
        try:
            h.progress(f"== {name} / save")
            info = h.run_worker(__file__, ["--worker", "save", *common])
            rows = {}
            for tool in ("peft", "surgeon"):
                h.progress(f"== {name} / {tool}")
                rows[tool] = h.run_worker_load(__file__, ["--worker", tool, *common])
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        everything[name] = {"info": info, **rows}
        print(f"\n{name} ({info['params'] / 1e6:.1f}M params, {info['bytes'] / 1e6:.0f} MB fp32 safetensors), 4-bit nf4 "
              f"double-quant, LoRA r=8 on q_proj/v_proj, batch {BATCH} x {SEQ}, {args.threads} threads")
        print(f"{'tool':8} {'load s':>7} {'load peak MB':>13} {'train peak MB':>14} {'step s':>7} {'step live MB':>13} "
              f"{'last loss':>10} {'other CPU':>9}")
        for tool, r in rows.items():
            print(f"{tool:8} {r['load_s']:7.2f} {r['load_peak_mb']:13.0f} {r['train_peak_mb']:14.0f} "
                  f"{h.median(r['step_s']):7.2f} {r['step_live_mb']:13.0f} {r['last_loss']:10.4f} {r['foreign_cpu']:9.0%}")
        p, s = rows["peft"], rows["surgeon"]
        mem = max(s["load_peak_mb"], s["train_peak_mb"]) / max(p["load_peak_mb"], p["train_peak_mb"])
        step = h.median(s["step_s"]) / h.median(p["step_s"])
        print(f"surgeon / PEFT: load peak {s['load_peak_mb'] / p['load_peak_mb']:.2f}x, train peak "
              f"{s['train_peak_mb'] / p['train_peak_mb']:.2f}x, overall peak {mem:.2f}x (goal <= {GOAL_MEMORY}: "
              f"{verdict(mem <= GOAL_MEMORY)}), step {step:.2f}x (goal <= {GOAL_STEP}: {verdict(step <= GOAL_STEP)}), "
              f"step live tensors {s['step_live_mb'] / p['step_live_mb']:.2f}x")
    return h.finish(args.json, everything)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker == "save":
        return save_worker(args)
    if args.worker in ("peft", "surgeon"):
        return tool_worker(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
