"""python tools/bench/bench_bank.py

Many adapters in one batch. Four LoRA adapters (r=8, 16, 8, 16, nonzero B) on one base, a batch of 8 rows with two
rows per adapter, fp32 CPU, ``--threads`` threads for every tool:

  (a) the ONNX adapter bank (``export --bank``), mixed rows in one run (``AdapterSession.run(adapters=[...])``)
  (b) the same batch with one adapter for every row (the switchable export, one adapter active)
  (c) what users do today: one ONNX Runtime run per adapter over its rows (the switchable export)
  (d) PEFT eager with ``adapter_names``

Prefill: 8 x 128 tokens, full logits. Decode: one step at batch 8 after a 128-token cache (the cache is built once
per variant, untimed). Median of ``--runs`` after one warm-up; ONNX Runtime variants in one process, PEFT in
another. Goals: (a) <= 1.15x (b) in prefill and decode; decode (a) <= 0.5x (c) and <= 0.4x (d); prefill
(a) <= 1.0x (c) and <= 0.85x (d). Also prints the bank file's size against the adapters' own files.
Models: bench_generate.py's GPT-2 small (124.4M, LoRA on c_attn) and Llama 134.1M (q_proj, v_proj).
About 6 minutes on 2 cores. Options: ``--models gpt2,llama``, ``--runs 5``, ``--threads 2``, ``--json``,
``--quick`` (tiny configs, a smoke run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import harness as h

RANKS = (8, 16, 8, 16)
NAMES = tuple(f"a{i}" for i in range(len(RANKS)))
ROWS = [NAMES[i // 2] for i in range(8)]  # two rows per adapter
GOALS = {"a/b": 1.15, "decode a/c": 0.5, "decode a/d": 0.4, "prefill a/c": 1.0, "prefill a/d": 0.85}


def export_worker(args) -> int:
    import peft
    import torch
    import transformers

    import surgeon
    from surgeon.onnx.export import export_onnx

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    out = Path(args.dir)
    base = h.build_base(args.model, args.quick).eval()
    targets = list(h.MODELS[args.model][3])
    for seed, (name, r) in enumerate(zip(NAMES, RANKS)):
        torch.manual_seed(h.SEED + 10 + seed)
        ref = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                       init_lora_weights=False))
        ref.save_pretrained(out / name)
        base = ref.unload()
    base.save_pretrained(out / "base")
    model = surgeon.PeftModel.from_pretrained(base, out / NAMES[0], adapter_name=NAMES[0]).eval()
    for name in NAMES[1:]:
        model.load_adapter(out / name, adapter_name=name)
    _, bank_s = h.timed(lambda: export_onnx(model, out / "bank", kv_cache=True, bank=True))
    _, plain_s = h.timed(lambda: export_onnx(model, out / "switchable", kv_cache=True))
    h.progress(f"[export {args.model}] bank {bank_s:.1f} s, switchable {plain_s:.1f} s")
    sizes = {"bank": (out / "bank" / "adapters" / "bank.onnx_adapter").stat().st_size,
             "files": sum((out / "switchable" / "adapters" / f"{n}.onnx_adapter").stat().st_size for n in NAMES)}
    h.emit({"worker": "export", "vocab": base.config.vocab_size, "sizes": sizes,
            "params": sum(p.numel() for p in base.parameters())})
    return 0


def ort_worker(args) -> int:
    import numpy as np

    from surgeon.names import past_of_present
    from surgeon.onnx.decoding import empty_past
    from surgeon.onnx.runtime import AdapterSession

    out = Path(args.dir)
    bank = AdapterSession(out / "bank", providers=["CPUExecutionProvider"], intra_op_threads=args.threads)
    plain = AdapterSession(out / "switchable", providers=["CPUExecutionProvider"], intra_op_threads=args.threads)
    ids = np.random.default_rng(h.SEED).integers(5, args.vocab - 1, (8, args.seq))

    def feeds(session, rows, step: bool, past=None):
        n = len(rows)
        if not step:
            return {"input_ids": ids[rows], "attention_mask": np.ones((n, args.seq), np.int64),
                    "position_ids": np.tile(np.arange(args.seq), (n, 1)), **empty_past(session.generation, n)}
        return {"input_ids": ids[rows, -1:], "attention_mask": np.ones((n, args.seq + 1), np.int64),
                "position_ids": np.full((n, 1), args.seq), **past}

    def cache(session, rows, **kw):
        present = session.run(feeds(session, rows, False), **kw)
        mapping = past_of_present(session.generation["layers"])
        return {mapping[k]: v for k, v in present.items() if k in mapping}

    everything = list(range(8))
    groups = {name: [i for i, r in enumerate(ROWS) if r == name] for name in NAMES}
    past_a = cache(bank, everything, adapters=ROWS)
    past_b = cache(plain, everything, adapter=NAMES[0])
    past_c = {name: cache(plain, rows, adapter=name) for name, rows in groups.items()}
    variants = {
        "prefill a": lambda: bank.run(feeds(bank, everything, False), adapters=ROWS),
        "prefill b": lambda: plain.run(feeds(plain, everything, False), NAMES[0]),
        "prefill c": lambda: [plain.run(feeds(plain, rows, False), name) for name, rows in groups.items()],
        "decode a": lambda: bank.run(feeds(bank, everything, True, past_a), adapters=ROWS),
        "decode b": lambda: plain.run(feeds(plain, everything, True, past_b), NAMES[0]),
        "decode c": lambda: [plain.run(feeds(plain, rows, True, past_c[name]), name) for name, rows in groups.items()],
    }
    results = {}
    for label, call in variants.items():
        call()
        times = [h.timed(call)[1] for _ in range(args.runs)]
        h.progress(f"[{label}] median {h.median(times) * 1000:.1f} ms")
        results[label] = times
    h.emit({"worker": "ort", "results": results})
    return 0


def peft_worker(args) -> int:
    import copy

    import peft
    import torch
    import transformers

    from surgeon.compat import cache_field, cache_name

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    out = Path(args.dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base").eval()
    model = peft.PeftModel.from_pretrained(base, out / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(out / name, adapter_name=name)
    model.eval()
    g = torch.Generator().manual_seed(h.SEED)
    ids = torch.randint(5, args.vocab - 1, (8, args.seq), generator=g)
    name = cache_name(base)  # transformers 5.24 renamed past_key_values to cache
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=ROWS, use_cache=True)
        cache = getattr(out, cache_field(type(out)))

    def prefill():
        return model(input_ids=ids, adapter_names=ROWS, use_cache=False).logits

    def decode(past):  # the step appends to the cache: each run gets its own copy of the 128-token one, untimed
        return lambda: model(input_ids=ids[:, -1:], adapter_names=ROWS, use_cache=True, **{name: past}).logits

    results = {"prefill d": [], "decode d": []}
    with torch.no_grad():
        for i in range(args.runs + 1):  # the first is the warm-up
            for label, call in (("prefill d", prefill), ("decode d", decode(copy.deepcopy(cache)))):
                _, seconds = h.timed(call)
                if i:
                    results[label].append(seconds)
    for label, times in results.items():
        h.progress(f"[{label}] median {h.median(times) * 1000:.1f} ms")
    h.emit({"worker": "peft", "results": results})
    return 0


def report(name: str, info: dict, times: dict) -> dict:
    med = {k: h.median(v) * 1000 for k, v in times.items()}
    print(f"\n{name} ({info['params'] / 1e6:.1f}M params; 4 adapters r={'/'.join(map(str, RANKS))}, 2 rows each)")
    print(f"{'ms':>8} {'(a) bank':>10} {'(b) one adapter':>16} {'(c) run per adapter':>20} {'(d) PEFT':>10} "
          f"{'a/b':>6} {'a/c':>6} {'a/d':>6}")
    ratios = {}
    for phase in ("prefill", "decode"):
        a, b, c, d = (med[f"{phase} {v}"] for v in "abcd")
        ratios[phase] = {"a/b": a / b, "a/c": a / c, "a/d": a / d}
        print(f"{phase:>8} {a:10.1f} {b:16.1f} {c:20.1f} {d:10.1f} {a / b:6.2f} {a / c:6.2f} {a / d:6.2f}")
    verdicts = []
    for key, goal in GOALS.items():
        phases = ("prefill", "decode") if key == "a/b" else (key.split()[0],)
        for phase in phases:
            value = ratios[phase][key.split()[-1]]
            verdicts.append(f"{phase} {key.split()[-1]} {value:.2f} (<= {goal}: {'met' if value <= goal else 'MISSED'})")
    print("goals: " + "; ".join(verdicts))
    sizes = info["sizes"]
    print(f"bank file {sizes['bank'] / 1e6:.2f} MB vs the 4 adapter files {sizes['files'] / 1e6:.2f} MB "
          f"({sizes['bank'] / sizes['files']:.2f}x: ranks padded to 16 and a zero slot for the base)")
    return {"ms": med, "ratios": ratios, "sizes": sizes}


def parent(args) -> int:
    print(h.machine_line())
    print(f"start: {h.load_line()}")
    print(f"workload: fp32 CPU, {args.threads} threads, batch 8 x {args.seq} prefill and one decode step at batch 8 "
          f"after {args.seq} tokens, median of {args.runs} after 1 warm-up")
    everything = {}
    for name in args.models.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"bench-bank-{name}-"))
        try:
            common = ["--model", name, "--dir", str(root), "--threads", str(args.threads), "--runs", str(args.runs)]
            common += ["--quick"] if args.quick else []
            h.progress(f"== {name} / export")
            info = h.run_worker(__file__, ["--worker", "export", *common])
            common += ["--vocab", str(info["vocab"])]
            h.progress(f"== {name} / ONNX Runtime (a, b, c)")
            times = h.run_worker(__file__, ["--worker", "ort", *common])["results"]
            h.progress(f"== {name} / PEFT (d)")
            times.update(h.run_worker(__file__, ["--worker", "peft", *common])["results"])
        finally:
            shutil.rmtree(root, ignore_errors=True)
        everything[name] = report(name, info, times)
    return h.finish(args.json, everything)


def main(argv=None) -> int:
    ap = h.bench_parser(__doc__, runs=5)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.seq = 16 if args.quick else 128
    workers = {"export": export_worker, "ort": ort_worker, "peft": peft_worker}
    return workers[args.worker](args) if args.worker else parent(args)


if __name__ == "__main__":
    sys.exit(main())
