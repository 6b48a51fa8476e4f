"""python tools/bench/profile_train.py

Where a training step's time goes, surgeon vs PEFT: torch.profiler over ``--steps`` steps (after ``--warmup``) of
bench_train.py's workload (batch 4 x 128, LoRA r=8 alpha=16 dropout 0, AdamW, fp32, ``--threads``), each tool in
its own process. Prints, per model, the ops by self CPU time (ms per step) for both tools side by side (the
largest differences first), the total, and each tool's unprofiled median step time. About 4 minutes on 2 cores.
Options: ``--models gpt2,llama``, ``--steps 3``, ``--warmup 2``, ``--threads 2``, ``--top 25``, ``--json``,
``--quick`` (tiny configs).
"""

from __future__ import annotations

import sys

import harness as h


def worker(args) -> int:
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    if args.worker == "peft":
        import peft as lib
    else:
        import surgeon as lib
    base = h.build_base(args.model, args.quick)
    model = lib.get_peft_model(base, lib.LoraConfig(task_type="CAUSAL_LM", **h.lora_kwargs(args.model)))
    model.train()
    batch = h.make_batch(base.config.vocab_size, 4, args.seq)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(args.warmup):
        step()
    wall = h.median([h.timed(step)[1] for _ in range(args.steps)]) * 1000
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    ops = {}
    for event in prof.key_averages():
        ops[event.key] = ops.get(event.key, 0.0) + event.self_cpu_time_total / 1000 / args.steps  # ms per step
    h.emit({"worker": args.worker, "ops": ops, "wall_ms": wall})
    return 0


def report(name: str, ours_run: dict, peft_run: dict, top: int) -> dict:
    ours, peft = ours_run["ops"], peft_run["ops"]
    keys = set(ours) | set(peft)
    rows = sorted(keys, key=lambda k: -abs(ours.get(k, 0) - peft.get(k, 0)))
    total_o, total_p = sum(ours.values()), sum(peft.values())
    print(f"\n{name}: self CPU ms per training step (torch.profiler), largest differences first")
    print(f"{'op':<48} {'surgeon':>9} {'PEFT':>9} {'diff':>8}")
    for key in rows[:top]:
        o, p = ours.get(key, 0.0), peft.get(key, 0.0)
        print(f"{key[:48]:<48} {o:9.1f} {p:9.1f} {o - p:+8.1f}")
    print(f"{'total (all ops)':<48} {total_o:9.1f} {total_p:9.1f} {total_o - total_p:+8.1f}")
    wo, wp = ours_run["wall_ms"], peft_run["wall_ms"]
    print(f"{'step wall time, unprofiled (median)':<48} {wo:9.1f} {wp:9.1f} {wo - wp:+8.1f}  ({wo / wp:.2f}x)")
    return {"surgeon": ours_run, "peft": peft_run}


def main(argv=None) -> int:
    ap = h.bench_parser(__doc__, runs=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    args.seq = 32 if args.quick else 128
    if args.worker:
        return worker(args)
    print(h.machine_line())
    everything = {}
    for name in args.models.split(","):
        common = ["--model", name, "--threads", str(args.threads), "--steps", str(args.steps), "--warmup",
                  str(args.warmup)] + (["--quick"] if args.quick else [])
        h.progress(f"== {name} / surgeon")
        ours = h.run_worker(__file__, ["--worker", "surgeon", *common])
        h.progress(f"== {name} / PEFT")
        peft = h.run_worker(__file__, ["--worker", "peft", *common])
        everything[name] = report(name, ours, peft, args.top)
    return h.finish(args.json, everything)


if __name__ == "__main__":
    sys.exit(main())
