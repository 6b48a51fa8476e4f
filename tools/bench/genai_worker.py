"""Worker of bench_genai.py that runs in .venv-genai (onnxruntime-genai only: no torch, no surgeon).

    .venv-genai/bin/python tools/bench/genai_worker.py EXPORT_DIR --threads 2 --runs 3 --new 64 --prompts JSON

Prints one JSON line: per batch, the seconds of each timed call (after one warm-up) and the new tokens of the
warm-up, greedy with the adapter named "adapter" active and end of sequence disabled (min_length = max_length).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import onnxruntime_genai as og


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompts", required=True, help="JSON: batch size -> list of token-id rows")
    ap.add_argument("--adapter", default="adapter")
    args = ap.parse_args()
    config = og.Config(args.export_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads,
                                                                         "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    adapters = og.Adapters(model)
    adapters.load(f"{args.export_dir}/adapters/{args.adapter}.onnx_adapter", args.adapter)
    results = {}
    for batch, rows in json.loads(args.prompts).items():
        length = len(rows[0]) + args.new

        def call():
            params = og.GeneratorParams(model)
            params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=len(rows))
            generator = og.Generator(model, params)
            generator.set_active_adapter(adapters, args.adapter)
            generator.append_tokens(rows)
            while not generator.is_done():
                generator.generate_next_token()
            return [[int(t) for t in generator.get_sequence(i)[len(rows[0]):]] for i in range(len(rows))]

        tokens = call()
        times = []
        for i in range(args.runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
            print(f"[genai b{batch}] run {i + 1}/{args.runs}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
        results[batch] = {"s": times, "tokens": tokens}
    print(json.dumps({"worker": "genai", "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
