"""python tools/bench/onnx_explore.py --dir DIR --model gpt2

Prints, for the exports that ``bench_onnx.py --keep DIR`` wrote under DIR/<model>/ (``merged/`` and
``switch/``), a table of ONNX Runtime session settings (graph optimization level, spinning) with
the median latency in ms of (a) the merged model, (b) the switchable model without an adapter and
(c) with the adapter "default", and the ratios (c)/(a), (b)/(a); then the operator counts of both
models after ORT's optimizer (``optimized_model_filepath``), the ops that differ, and how many
initializers ORT sees in the graph inputs (the adapter inputs with rank-0 defaults). Progress
goes to stderr. About a minute per model on 2 cores (``--shapes``, ``--runs`` as in bench_onnx).

Each setting's sessions are created, measured and closed one at a time (no idle thread pool of
another session spins meanwhile); plain ``onnxruntime.InferenceSession`` with
``RunOptions.add_active_adapter`` (what ``AdapterSession.run`` does), 2 intra-op threads.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import harness as h

SETTINGS = {
    "ORT_ENABLE_ALL (default)": {},
    "ORT_ENABLE_EXTENDED": {"level": "ORT_ENABLE_EXTENDED"},
    "ORT_ENABLE_BASIC": {"level": "ORT_ENABLE_BASIC"},
    "ENABLE_ALL, no spinning": {"config": {"session.intra_op.allow_spinning": "0"}},
}


def options(setting: dict, threads: int, optimized: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if "level" in setting:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, setting["level"])
    for key, value in setting.get("config", {}).items():
        so.add_session_config_entry(key, value)
    if optimized:
        so.optimized_model_filepath = optimized
    return so


def latency(model: Path, feeds: dict, setting: dict, threads: int, runs: int, adapter: Path | None) -> list[float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), options(setting, threads), providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    if adapter is not None:
        lora = ort.LoraAdapter()
        lora.Load(str(adapter))
        run_options.add_active_adapter(lora)
    for _ in range(3):
        sess.run(["logits"], feeds, run_options)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(["logits"], feeds, run_options)
        out.append((time.perf_counter() - t0) * 1e3)
    del sess
    return out


def op_counts(model: Path, threads: int) -> tuple[collections.Counter, int]:
    """Operator counts after ORT's ENABLE_ALL optimizer, and initializers that are also graph inputs."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(model), options({}, threads, path), providers=["CPUExecutionProvider"])
        proto = onnx.load(path, load_external_data=False)
    inputs = {i.name for i in proto.graph.input}
    overridable = sum(1 for init in proto.graph.initializer if init.name in inputs)
    return collections.Counter(n.op_type for n in proto.graph.node), overridable


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ONNX Runtime settings for the switchable export (see the docstring).")
    ap.add_argument("--dir", required=True, help="the --keep directory of bench_onnx.py")
    ap.add_argument("--model", default="gpt2", choices=sorted(h.MODELS))
    ap.add_argument("--shapes", default="1x128,4x128")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the exports are of --quick configs")
    args = ap.parse_args(argv)
    d = Path(args.dir) / args.model
    merged, switch = d / "merged" / "model.onnx", d / "switch" / "model.onnx"
    adapter = d / "switch" / "adapters" / "default.onnx_adapter"
    _, full, tiny, _ = h.MODELS[args.model]
    vocab = (tiny if args.quick else full).get("vocab_size", 50257)
    print(f"{args.model}: {h.load_line()}")
    head = f"{'setting':<26} {'batch x seq':<11} {'(a) ms':>8} {'(b) ms':>8} {'(c) ms':>8} {'(c)/(a)':>8} {'(b)/(a)':>8}"
    print(head)
    print("-" * len(head))
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        b = h.make_batch(vocab, batch, seq)
        feeds = {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()}
        for name, setting in SETTINGS.items():
            ms = {}
            for key, model, ad in (("a", merged, None), ("b", switch, None), ("c", switch, adapter)):
                ms[key] = h.median(latency(model, feeds, setting, args.threads, args.runs, ad))
            h.progress(f"[explore {args.model} {shape}] {name}: {ms}")
            print(f"{name:<26} {shape:<11} {ms['a']:>8.1f} {ms['b']:>8.1f} {ms['c']:>8.1f} {ms['c'] / ms['a']:>8.3f} "
                  f"{ms['b'] / ms['a']:>8.3f}")
    ops_m, over_m = op_counts(merged, args.threads)
    ops_s, over_s = op_counts(switch, args.threads)
    print(f"ops after ORT's optimizer: merged {sum(ops_m.values())} nodes, switchable {sum(ops_s.values())} nodes; "
          f"initializers that are graph inputs: merged {over_m}, switchable {over_s}")
    diff = {k: (ops_m.get(k, 0), ops_s.get(k, 0)) for k in sorted(set(ops_m) | set(ops_s)) if ops_m.get(k) != ops_s.get(k)}
    print("  differing op counts (merged -> switchable): " + (", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
                                                         or "none"))
    print("  merged ops: " + ", ".join(f"{k} {v}" for k, v in ops_m.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
