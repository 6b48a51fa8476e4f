"""python tools/bench/bench_methods.py

The adapter methods beyond plain LoRA against PEFT, CPU, fp32: for each method (``--methods dora``), a training step
(forward + loss + backward + AdamW, batch 4 x 128, median of ``--steps`` after ``--warmup``) in surgeon and in PEFT,
each tool in its own subprocess, with peak RSS and the step's peak live tensors; then ONNX Runtime (``--ort``):
the switchable KV-cache export with the adapter active against the merged export (prefill 1 x 128 and batch-1
decode of 64 new tokens after a 32-token prompt, median of ``--runs``). Goals: step <= 1.0x PEFT; DoRA's switchable
ORT run <= 1.15x the merged one (the same bound is printed for IA3).

Model: ``gpt2`` (GPT2Config defaults, 124.4M, random-init, seeded) with r=8 alpha=16 on c_attn (bench_train.py's
workload), B nonzero so the adapter's work is real; IA3 with PEFT's GPT-2 defaults. Options: ``--models gpt2``,
``--methods dora,ia3``, ``--steps 5``,
``--warmup 2``, ``--runs 3``, ``--threads 2``, ``--json PATH``, ``--quick``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_generate as g
import harness as h

BATCH, SEQ = 4, 128
PROMPT, NEW, PREFILL = 32, 64, 128
METHODS = {"dora": {"use_dora": True}, "ia3": {}}
GOALS = {"step": 1.0, "ort": 1.15}


def make_config(lib, method: str, model: str):
    """The same config in either tool: DoRA on bench_train's LoRA workload; IA3 with PEFT's defaults for the
    architecture (GPT-2: c_attn on the output, mlp.c_proj on the input)."""
    if method == "ia3":
        return lib.IA3Config(task_type="CAUSAL_LM")
    return lib.LoraConfig(**{**h.lora_kwargs(model), **METHODS[method], "task_type": "CAUSAL_LM"})


def train_worker(args) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    lib = __import__(args.tool)
    label = f"[{args.tool} {args.method} {args.model}]"
    base = h.build_base(args.model, args.quick)
    torch.manual_seed(h.SEED + 3)
    model, inject_s = h.timed(lambda: lib.get_peft_model(base, make_config(lib, args.method, args.model)))
    batch, seq = (2, 16) if args.quick else (BATCH, SEQ)
    data = h.make_batch(base.config.vocab_size, batch, seq)
    h.reset_peak()
    times, _, losses = h.train_steps(model.train(), data, args.warmup, args.steps, label)
    peak = h.peak_rss_mb()
    h.emit({"worker": "train", "tool": args.tool, "step_s": h.median(times), "steps_s": times, "losses": losses,
            "peak_rss_mb": peak, "step_live_mb": h.step_live_mb(model, data), "inject_s": inject_s,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    return 0


def ort_worker(args) -> int:
    import numpy as np
    import torch
    import transformers

    import surgeon
    from surgeon.onnx.decoding import empty_past
    from surgeon.onnx.export import export_onnx
    from surgeon.onnx.runtime import AdapterSession

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    base = h.build_base(args.model, args.quick).eval()
    torch.manual_seed(h.SEED + 3)
    model = surgeon.get_peft_model(base, make_config(surgeon, args.method, args.model)).eval()
    with torch.no_grad():  # trained-looking values: DoRA's magnitude off the norm, IA3's vectors off ones
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
    for key, merged in (("switchable", False), ("merged", True)):
        _, seconds = h.timed(lambda: export_onnx(model, root / key, ["default"], merged=merged, kv_cache=True))  # noqa: B023
        h.progress(f"[export {args.method}] {key} {seconds:.1f} s")
    prompt, new, prefill = (8, 16, 32) if args.quick else (PROMPT, NEW, PREFILL)
    results, tokens = {}, {}
    for key in ("switchable", "merged"):
        session = AdapterSession(root / key, providers=["CPUExecutionProvider"], intra_op_threads=args.threads)
        adapter = "default" if key == "switchable" else None
        vocab = session.manifest["generation"]["vocab_size"]
        ids = g.prompts(vocab, 1, prompt)
        times, out = g.timed_runs(lambda: session.generate(ids, adapter=adapter, max_new_tokens=new,  # noqa: B023
                                                           eos_token_id=[]), args.runs, f"[{key} decode]")
        results[f"{key}/decode"], tokens[key] = times, out
        ids = g.prompts(vocab, 1, prefill)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(prefill)[None],
                 **empty_past(session.generation, 1)}
        results[f"{key}/prefill"], _ = g.timed_runs(lambda: session.run(feeds, adapter=adapter),  # noqa: B023
                                                    args.runs, f"[{key} prefill]")
    h.emit({"worker": "ort", "results": results, "new": new, "prefill": prefill,
            "same_tokens": bool((tokens["switchable"] == tokens["merged"]).all())})
    return 0


def report(method: str, model: str, train: dict, ort: dict | None) -> None:
    ours, peft = train["surgeon"], train["peft"]
    ratio = ours["step_s"] / peft["step_s"]
    print(f"\n{method} on {model} ({ours['trainable']:,d} trainable), train step {BATCH}x{SEQ}:")
    print(f"{'':<9} {'step s':>8} {'peak RSS MB':>12} {'live MB':>9} {'first loss':>11}")
    for tool, r in (("surgeon", ours), ("peft", peft)):
        print(f"{tool:<9} {r['step_s']:>8.3f} {r['peak_rss_mb']:>12.0f} {r['step_live_mb']:>9.0f} {r['losses'][0]:>11.4f}")
    print(f"ratio     {ratio:>8.2f}x {ours['peak_rss_mb'] / peft['peak_rss_mb']:>11.2f}x "
          f"{ours['step_live_mb'] / peft['step_live_mb']:>8.2f}x")
    print(f"goal step <= {GOALS['step']}x PEFT: {ratio:.2f}x {g.verdict(ratio <= GOALS['step'])}")
    if ort is None:
        return
    r, new = ort["results"], ort["new"]
    decode = {k: new / h.median(r[f"{k}/decode"]) for k in ("switchable", "merged")}
    prefill = {k: 1000 * h.median(r[f"{k}/prefill"]) for k in ("switchable", "merged")}
    slow = max(decode["merged"] / decode["switchable"], prefill["switchable"] / prefill["merged"])
    print(f"ONNX Runtime: b1 decode {decode['switchable']:.1f} tok/s switchable vs {decode['merged']:.1f} merged; "
          f"prefill 1x{ort['prefill']} {prefill['switchable']:.1f} vs {prefill['merged']:.1f} ms; same greedy tokens: "
          f"{ort['same_tokens']}")
    print(f"goal switchable <= {GOALS['ort']}x merged: {slow:.2f}x {g.verdict(slow <= GOALS['ort'])}")


def main() -> int:
    ap = h.bench_parser(__doc__, runs=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tool", choices=["surgeon", "peft"])
    ap.add_argument("--method", choices=sorted(METHODS))
    ap.add_argument("--no-ort", action="store_true", help="training only")
    ap.set_defaults(models="gpt2")
    args = ap.parse_args()
    if args.worker == "train":
        return train_worker(args)
    if args.worker == "ort":
        return ort_worker(args)
    print(h.machine_line())
    everything: dict = {}
    for model in args.models.split(","):
        for method in args.methods.split(","):
            common = ["--model", model, "--method", method, "--threads", str(args.threads), "--steps",
                      str(args.steps), "--warmup", str(args.warmup), "--runs", str(args.runs)]
            common += ["--quick"] if args.quick else []
            train = {}
            for tool in ("surgeon", "peft"):
                h.progress(f"== {method} {model} / {tool}")
                train[tool] = h.run_worker(__file__, ["--worker", "train", "--tool", tool, *common])
            ort = None
            if not args.no_ort:
                root = Path(tempfile.mkdtemp(prefix=f"bench-{method}-"))
                try:
                    h.progress(f"== {method} {model} / ONNX Runtime")
                    ort = h.run_worker(__file__, ["--worker", "ort", "--dir", str(root), *common])
                finally:
                    shutil.rmtree(root, ignore_errors=True)
            report(method, model, train, ort)
            everything[f"{method}/{model}"] = {"train": train, "ort": ort, "at": time.time()}
    return h.finish(args.json, everything)


if __name__ == "__main__":
    sys.exit(main())
