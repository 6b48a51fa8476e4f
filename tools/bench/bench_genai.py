"""python tools/bench/bench_genai.py

onnxruntime-genai vs surgeon's ``AdapterSession.generate`` on the same KV-cache export, with the same adapter:
tokens/s of the whole generate call (prefill included), median over ``--rounds`` interleaved rounds of ``--runs``
each (after one warm-up per round), batch 1 and 8, prompt 32 random tokens, 64 new tokens, greedy, end of sequence
disabled, both at ``--threads`` intra-op threads (inter-op 1), one tool at a time, each in its own process.
``AdapterSession`` runs twice: in the project's venv (onnxruntime-gpu, the version users get) and in genai's venv
(the onnxruntime genai ships with, so both run the same kernels). Prints per model the table, the ratio
``AdapterSession / genai`` (goal >= 1.0), whether the tokens agree, and at batch 1 each tool's distance from the
weight-read floor (weights read per token / bytes read per second; goal <= 1.3x).

Workload: bench_generate.py's models (GPT-2 small 124.4M, LoRA on c_attn; Llama 134.1M, LoRA on q_proj, v_proj),
random-init, seeded, fp32; LoRA r=8 with nonzero B, exported once by ``bench_generate.py --worker export``.
genai runs in .venv-genai (``python3 tools/clients.py ensure genai``: it needs the onnxruntime package, not
onnxruntime-gpu) through tools/bench/genai_worker.py. The read bandwidth is bench_fold.py's copy measurement
(read + written bytes per second, the fastest a weight can be streamed). About 7 minutes on 2 cores.
Options: ``--models gpt2,llama``, ``--batches 1,8``, ``--runs 3``, ``--rounds 2``, ``--threads 2``, ``--keep DIR``,
``--json``, ``--quick`` (tiny configs, a smoke run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import harness as h

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROMPT, NEW = 32, 64
GOALS = {"vs_genai": 1.0, "floor": 1.3}


def prompt_rows(vocab: int, batch: int, length: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(h.SEED + batch)
    return rng.integers(5, vocab - 1, (batch, length)).tolist()  # below GPT-2's end-of-text, which genai pads with


def ort_worker(args) -> int:
    import numpy as np
    import onnxruntime as ort

    from surgeon.onnx.runtime import AdapterSession

    session = AdapterSession(Path(args.dir) / "onnx", providers=["CPUExecutionProvider"], intra_op_threads=args.threads)
    results = {}
    for batch, rows in json.loads(args.prompts).items():
        ids = np.array(rows, dtype=np.int64)

        def call():
            return session.generate(ids, adapter="adapter", max_new_tokens=args.new, eos_token_id=[])

        tokens = call()
        times = []
        for i in range(args.runs):
            _, seconds = h.timed(call)
            times.append(seconds)
            h.progress(f"[ours b{batch}] run {i + 1}/{args.runs}: {seconds:.2f} s")
        results[batch] = {"s": times, "tokens": tokens[:, ids.shape[1]:].tolist()}
    h.emit({"worker": "ort", "ort": ort.__version__, "results": results})
    return 0


def genai_run(python: str, export: Path, args, prompts: str) -> dict:
    proc = subprocess.run([python, str(HERE / "genai_worker.py"), str(export), "--threads", str(args.threads),
                           "--runs", str(args.runs), "--new", str(args.new), "--prompts", prompts],
                          stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"genai worker failed with exit status {proc.returncode}")
    return json.loads(lines[-1])["results"]


def merge(into: dict | None, result: dict) -> dict:
    """Another round's timings added to the earlier rounds' (per batch); tokens must stay the same."""
    if into is None:
        return result
    for batch, row in (result.get("results") or result).items():
        seen = (into.get("results") or into)[batch]
        seen["s"] += row["s"]
        if seen["tokens"] != row["tokens"]:
            raise RuntimeError(f"batch {batch}: the tokens changed between rounds")
    return into


def report(name: str, info: dict, ours: dict, same_ort: dict, genai: dict, read_bw: float, new: int) -> dict:
    floor = read_bw / info["weights_read"]  # tokens/s if every weight were streamed once per token at batch 1
    print(f"\n{name} ({info['params'] / 1e6:.1f}M params, {info['weights_read'] / 1e6:.0f} MB of weights read per "
          f"token; floor at batch 1 {floor:.1f} tokens/s)")
    print(f"ours: onnxruntime {ours['ort']} (the project's); ours@genai and genai: onnxruntime {same_ort['ort']} "
          "(genai's venv)")
    print(f"{'batch':>5} {'genai tok/s':>12} {'ours tok/s':>11} {'ours@genai tok/s':>17} {'ours/genai':>11} "
          f"{'ours@genai/genai':>17} {'tokens equal':>13}")
    rows = {}
    for batch in genai:
        g = int(batch) * new / h.median(genai[batch]["s"])
        o = int(batch) * new / h.median(ours["results"][batch]["s"])
        m = int(batch) * new / h.median(same_ort["results"][batch]["s"])
        same = genai[batch]["tokens"] == ours["results"][batch]["tokens"] == same_ort["results"][batch]["tokens"]
        print(f"{batch:>5} {g:12.1f} {o:11.1f} {m:17.1f} {o / g:11.2f} {m / g:17.2f} {'yes' if same else 'NO':>13}")
        rows[batch] = {"genai": g, "ours": o, "ours_same_ort": m, "ratio": o / g, "ratio_same_ort": m / g,
                       "same": same}
    if "1" in rows:
        r = rows["1"]
        best = max(r["ratio"], r["ratio_same_ort"])
        print(f"goals: ours / genai {r['ratio']:.2f} (same onnxruntime {r['ratio_same_ort']:.2f}) at batch 1 "
              f"(goal >= {GOALS['vs_genai']}: {'met' if best >= GOALS['vs_genai'] else 'MISSED'}); at batch 1 "
              f"floor / ours {floor / r['ours']:.2f}, floor / genai {floor / r['genai']:.2f} (goal <= "
              f"{GOALS['floor']}: {'met' if max(floor / r['ours'], floor / r['genai']) <= GOALS['floor'] else 'MISSED'})")
    return rows


def parent(args) -> int:
    print(h.machine_line())
    print(f"start: {h.load_line()}")
    python = subprocess.run([sys.executable, str(ROOT / "tools" / "clients.py"), "ensure", "genai"],
                            stdout=subprocess.PIPE, text=True, check=True).stdout.strip().splitlines()[-1]
    bw = h.run_worker(str(HERE / "bench_fold.py"), ["--worker", "bandwidth", "--threads", str(args.threads)]
                      + (["--quick"] if args.quick else []))
    print(f"read bandwidth: {bw['touched_gbs']:.2f} GB/s (read + written by copy_ of 1 GiB)")
    print(f"workload: fp32 CPU, {args.threads} intra-op threads each, prompt {args.prompt}, {args.new} new tokens, "
          f"greedy, LoRA r=8 adapter active, median of {args.rounds} interleaved rounds x {args.runs} runs")
    everything = {"bandwidth": bw}
    for name in args.models.split(","):
        root = Path(args.keep) / name if args.keep else Path(tempfile.mkdtemp(prefix=f"bench-genai-{name}-"))
        root.mkdir(parents=True, exist_ok=True)
        try:
            h.progress(f"== {name} / export")
            common = ["--model", name, "--dir", str(root), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
            if not (root / "onnx" / "genai_config.json").is_file() or not (root / "info.json").is_file():
                info = h.run_worker(str(HERE / "bench_generate.py"), ["--worker", "export", *common])
                (root / "info.json").write_text(json.dumps(info))
            info = json.loads((root / "info.json").read_text())
            prompts = json.dumps({str(b): prompt_rows(info["vocab"], b, args.prompt) for b in args.batch_list})
            genai = ours = same_ort = None
            for round_ in range(1, args.rounds + 1):  # interleaved, so a drifting machine load hits all three alike
                h.progress(f"== {name} / genai (round {round_}/{args.rounds})")
                genai = merge(genai, genai_run(python, root / "onnx", args, prompts))
                h.progress(f"== {name} / AdapterSession (round {round_}/{args.rounds})")
                worker = ["--worker", "ort", *common, "--runs", str(args.runs), "--prompts", prompts]
                ours = merge(ours, h.run_worker(__file__, worker))
                h.progress(f"== {name} / AdapterSession on genai's onnxruntime (round {round_}/{args.rounds})")
                same_ort = merge(same_ort, h.run_worker(__file__, worker, python=python,
                                                        env={"PYTHONPATH": str(ROOT)}))  # surgeon.onnx needs no torch
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        rows = report(name, info, ours, same_ort, genai, bw["touched_gbs"] * 1e9, args.new)
        everything[name] = {"info": info, "rows": rows}
    return h.finish(args.json, everything)


def parse(argv=None) -> argparse.Namespace:
    ap = h.bench_parser(__doc__, runs=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of genai, ours, ours@genai, interleaved")
    ap.add_argument("--keep", help="keep the base, adapter and export here (and reuse an export found there)")
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",") if b]
    args.prompt, args.new = (8, 16) if args.quick else (PROMPT, NEW)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker == "ort":
        return ort_worker(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
