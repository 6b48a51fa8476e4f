"""python tools/bench/bench_int4.py

int4 against fp32 in ONNX Runtime, CPU, per model: the KV-cache export in fp32 and with ``--int4`` (rtn, blocks of
32, accuracy level 4 unless ``--block-size`` / ``--accuracy-level``), the same LoRA adapter (r=8, nonzero B) active.
Prints the model file sizes; decode tokens/s (median of ``--runs`` after a warm-up, 64 new tokens after a 32-token
prompt, greedy, no end of sequence) at batch 1 and 8 with the adapter, and at batch 1 without it; prefill latency
1 x 128; the int4 weight-read floor at batch 1 (bytes of the MatMulNBits weights, scales and the float weights read
per token / copy bandwidth, from ``bench_fold.py --worker bandwidth``); accuracy against the fp32 export (max and
mean |logit| difference over 8 prompts x 32 tokens, relative to max |logit|, and greedy agreement over 64 tokens
for 8 prompts); and the goals: int4 batch-1 decode >= 2.5x fp32's, within 1.5x of its floor, the adapter costs
<= 10% over int4 without it.

Models: ``gpt2`` (GPT2Config defaults, 124.4M) and ``llama`` (GPT-2-small scale, 134.1M) from bench_train.py,
random-init and seeded (so greedy agreement is a lower bound: a trained model's distribution is sharper). Each
export and each measured session runs in its own subprocess. Options: ``--models gpt2,llama``, ``--runs 3``,
``--threads 2``, ``--block-size 32``, ``--accuracy-level 4``, ``--method rtn``, ``--json PATH``, ``--quick``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import bench_generate as g
import harness as h

PROMPT, NEW, PREFILL = 32, 64, 128


def export_worker(args) -> int:
    import torch
    import transformers

    import surgeon
    from surgeon.onnx.export import export_onnx
    from surgeon.onnx.int4 import Int4Spec

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    out = Path(args.dir)
    base = h.build_base(args.model, args.quick).eval()
    torch.manual_seed(h.SEED + 3)
    model = surgeon.get_peft_model(base, surgeon.LoraConfig(target_modules=list(h.MODELS[args.model][3]), **g.LORA))
    spec = Int4Spec(args.method, args.block_size, args.accuracy_level)
    seconds = {}
    for key, int4 in (("fp32", None), ("int4", spec)):
        _, seconds[key] = h.timed(lambda: export_onnx(model.eval(), out / key, ["default"], kv_cache=True, int4=int4))
        h.progress(f"[export {args.model}] {key} {seconds[key]:.1f} s")
    h.emit({"worker": "export", "export_s": seconds, "vocab": base.config.vocab_size,
            "bytes": {k: sum(f.stat().st_size for f in (out / k).glob("model.onnx*")) for k in seconds},
            "read_int4": int4_read_bytes(out / "int4" / "model.onnx")})
    return 0


def int4_read_bytes(path: Path) -> int:
    """Bytes of initializers read for one token at batch 1: all but the embedding tables (one row each is read)."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    return sum(numpy_helper.to_array(i).nbytes for i in proto.graph.initializer if i.name not in gathered)


def ort_worker(args) -> int:
    import numpy as np

    from surgeon.onnx.decoding import empty_past
    from surgeon.onnx.runtime import AdapterSession

    root = Path(args.dir)
    sessions = {k: AdapterSession(root / k, providers=["CPUExecutionProvider"], intra_op_threads=args.threads)
                for k in ("fp32", "int4")}
    vocab = sessions["fp32"].manifest["generation"]["vocab_size"]
    prompt, new, prefill = (8, 16, 32) if args.quick else (PROMPT, NEW, PREFILL)
    results: dict = {}
    for key, session in sessions.items():
        for batch, adapter in ((1, "default"), (8, "default"), (1, None)):
            ids = g.prompts(vocab, batch, prompt)
            call = lambda: session.generate(ids, adapter=adapter, max_new_tokens=new, eos_token_id=[])  # noqa: E731
            times, tokens = g.timed_runs(call, args.runs, f"[{key} {args.model} b{batch} {adapter}]")
            results[f"{key}/{batch}/{adapter}"] = {"s": times, "tokens": tokens[:, prompt:].tolist()}
        ids = g.prompts(vocab, 1, prefill)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(prefill)[None],
                 **empty_past(session.generation, 1)}
        times, _ = g.timed_runs(lambda: session.run(feeds, adapter="default"), args.runs, f"[{key} prefill]")  # noqa: B023
        results[f"{key}/prefill"] = {"s": times}
    ids = g.prompts(vocab, 8, prompt)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(prompt), (8, 1)),
             **empty_past(sessions["fp32"].generation, 8)}
    want, got = (sessions[k].run(feeds, adapter="default")["logits"] for k in ("fp32", "int4"))
    diff, scale = np.abs(got - want), float(np.abs(want).max())
    a, b = (np.array(results[f"{k}/8/default"]["tokens"]) for k in ("fp32", "int4"))
    h.emit({"worker": "ort", "results": {k: v["s"] for k, v in results.items()},
            "accuracy": {"max": float(diff.max()) / scale, "mean": float(diff.mean()) / scale,
                         "greedy": float((a == b).mean())}, "new": new, "prefill": prefill})
    return 0


def report(name: str, info: dict, got: dict, bandwidth: float) -> None:
    r, new, acc = got["results"], got["new"], got["accuracy"]

    def tps(key: str, batch: int) -> float:
        return batch * new / h.median(r[key])

    floor = bandwidth / info["read_int4"]  # tokens/s at batch 1 if reading the weights were all it cost
    print(f"\n{name}: model.onnx fp32 {info['bytes']['fp32'] / 2**20:.1f} MB, int4 {info['bytes']['int4'] / 2**20:.1f} MB "
          f"({info['bytes']['int4'] / info['bytes']['fp32']:.2f}x); int4 weights read per token "
          f"{info['read_int4'] / 2**20:.1f} MB; export {info['export_s']['fp32']:.1f} s / {info['export_s']['int4']:.1f} s")
    print(f"{'':<8} {'b1 tok/s':>9} {'b8 tok/s':>9} {'b1 no adapter':>14} {'prefill 1x' + str(got['prefill']):>14}")
    for key in ("fp32", "int4"):
        print(f"{key:<8} {tps(key + '/1/default', 1):>9.1f} {tps(key + '/8/default', 8):>9.1f} "
              f"{tps(key + '/1/None', 1):>14.1f} {1000 * h.median(r[key + '/prefill']):>11.1f} ms")
    speed = tps("int4/1/default", 1) / tps("fp32/1/default", 1)
    to_floor = floor / tps("int4/1/default", 1)
    overhead = tps("int4/1/None", 1) / tps("int4/1/default", 1) - 1
    print(f"accuracy vs fp32 (adapter on): max |logit diff| {acc['max']:.3f} and mean {acc['mean']:.4f} of max |logit|, "
          f"greedy tokens equal {100 * acc['greedy']:.0f}% (8 prompts x {new})")
    print(f"goal int4 b1 >= 2.5x fp32: {speed:.2f}x {g.verdict(speed >= 2.5)}; within 1.5x of the floor "
          f"({floor:.0f} tok/s): {to_floor:.2f}x {g.verdict(to_floor <= 1.5)}; adapter overhead <= 10%: "
          f"{100 * overhead:+.1f}% {g.verdict(overhead <= 0.10)}")


def main() -> int:
    ap = h.bench_parser(__doc__, runs=3)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--method", default="rtn")
    args = ap.parse_args()
    if args.worker == "export":
        return export_worker(args)
    if args.worker == "ort":
        return ort_worker(args)
    print(h.machine_line())
    bw = h.run_worker(str(Path(__file__).with_name("bench_fold.py")), ["--worker", "bandwidth", "--threads",
                                                                       str(args.threads)] + (["--quick"] if args.quick else []))
    print(f"copy bandwidth {bw['touched_gbs'] / 2:.2f} GB/s; int4 {args.method}, blocks of {args.block_size}, accuracy "
          f"level {args.accuracy_level}; {args.threads} threads, median of {args.runs} runs")
    everything = {"bandwidth": bw}
    for name in args.models.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"bench-int4-{name}-"))
        common = ["--model", name, "--dir", str(root), "--threads", str(args.threads), "--runs", str(args.runs),
                  "--block-size", str(args.block_size), "--accuracy-level", str(args.accuracy_level),
                  "--method", args.method] + (["--quick"] if args.quick else [])
        try:
            h.progress(f"== {name} / export")
            info = h.run_worker(__file__, ["--worker", "export", *common])
            h.progress(f"== {name} / ort")
            got = h.run_worker(__file__, ["--worker", "ort", *common])
        finally:
            shutil.rmtree(root, ignore_errors=True)
        report(name, info, got, bw["touched_gbs"] / 2 * 1e9)
        everything[name] = {"info": info, **got}
    return h.finish(args.json, everything)


if __name__ == "__main__":
    sys.exit(main())
