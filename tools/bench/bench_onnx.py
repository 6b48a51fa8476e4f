"""python tools/bench/bench_onnx.py

Prints the machine line and the load, then per model and batch x seq a table of CPU inference
latency (median ms and the ratio to the merged ONNX model) for (a) the merged ONNX model, (b) the
switchable ONNX model with no adapter, (c) the switchable model with an r=8 adapter through
``AdapterSession.run(feeds, adapter=...)``, (d) PEFT's eager unmerged forward and (e) the
transformers eager merged forward; then per model the adapter switch cost, the export and
session-load seconds, the numeric checks (ONNX vs torch) and the goals: (c) <= 1.05x (a),
(c) <= 0.85x (d), switch < 1 ms. Progress goes to stderr. About 10 minutes on 2 cores;
``--quick`` (tiny configs, seq 16) takes about a minute.

Workload: the two models of bench_train.py (GPT2Config defaults, 124.4M params, LoRA on c_attn;
a Llama at GPT-2-small scale, 134.1M params, LoRA on q_proj and v_proj), random-init, seeded,
fp32, eval; LoRA r=8 alpha=16 ``init_lora_weights=False`` (nonzero B); input_ids + an all-ones
attention_mask, no KV cache, full logits out. 2 threads everywhere (``torch.set_num_threads``,
``AdapterSession(intra_op_threads=2)``). Each piece runs in its own subprocess: ``export``
(surgeon ``export_onnx`` of the switchable model with adapters "default" and "other", and of the
merged model; it also saves torch reference logits), ``ort-merged`` (a), ``ort-switch`` (b, c and
the switch, one session, runs interleaved b, c, b, c, ...), ``eager`` (d and e interleaved), so
that no thread pool of one measurement spins while another runs. Latency: median of ``--runs``
(default 20) after 3 warm-up runs.

Switch cost, measured two ways on the switchable session: (1) ``RunOptions()`` +
``add_active_adapter`` alone (what ``AdapterSession.run`` adds per call; median of 2000), and (2)
at batch 1 x seq 1 (small compute, small noise), runs in the order default, default, other: the
median over rounds of (first default run, which follows an "other" run) minus (second default
run, which follows a default run), and of (other) minus (second default). Also the first-use
load of an adapter file (``AdapterSession.adapter(name)``).

Options: ``--models gpt2,llama``, ``--shapes 1x128,4x128``, ``--runs 20``, ``--threads 2``,
``--keep DIR`` (keep the exports there), ``--explore`` (then print onnx_explore.py's table per model:
ORT optimization levels and spinning, op counts after ORT's optimizer), ``--json PATH``, ``--quick``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness as h

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "init_lora_weights": False}
GOAL_VS_MERGED, GOAL_VS_PEFT, GOAL_SWITCH_MS = 1.05, 0.85, 1.0
WARMUP = 3
CONFIGS = {"a": "ONNX merged", "b": "ONNX switchable, no adapter", "c": "ONNX switchable + adapter",
           "d": "PEFT eager unmerged", "e": "transformers eager merged"}


def feeds_for(vocab: int, batch: int, seq: int) -> dict:
    b = h.make_batch(vocab, batch, seq)
    return {"input_ids": b["input_ids"].numpy(), "attention_mask": b["attention_mask"].numpy()}


def shapes_of(args) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]


def vocab_of(name: str, quick: bool) -> int:
    _, full, tiny, _ = h.MODELS[name]
    cfg = tiny if quick else full
    return cfg.get("vocab_size", 50257)


# ---- worker: export (torch + surgeon) -----------------------------------------------------------
def export_worker(args) -> int:
    import numpy as np
    import torch
    import transformers

    import surgeon
    from surgeon.onnx.export import export_onnx

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    out = Path(args.dir)
    base = h.build_base(args.model, args.quick).eval()
    config = dict(LORA, target_modules=list(h.MODELS[args.model][3]))
    torch.manual_seed(h.SEED + 3)
    model, inject_s = h.timed(lambda: surgeon.get_peft_model(base, surgeon.LoraConfig(**config)))
    torch.manual_seed(h.SEED + 4)
    model.add_adapter("other", surgeon.LoraConfig(**config))
    _, switch_s = h.timed(lambda: export_onnx(model, out / "switch", ["default", "other"]))
    h.progress(f"[export {args.model}] switchable export {switch_s:.1f} s")
    _, merged_s = h.timed(lambda: export_onnx(model, out / "merged", ["default"], merged=True))
    h.progress(f"[export {args.model}] merged export {merged_s:.1f} s")
    batch, seq = shapes_of(args)[0]
    feeds = {k: torch.from_numpy(v) for k, v in feeds_for(base.config.vocab_size, batch, seq).items()}
    with torch.no_grad():
        model.set_adapter("default")
        np.save(out / "ref_default.npy", model(**feeds).logits.numpy())
        model.set_adapter("other")
        np.save(out / "ref_other.npy", model(**feeds).logits.numpy())
        with model.disable_adapter():
            np.save(out / "ref_base.npy", model(**feeds).logits.numpy())
    size = {d: sum(f.stat().st_size for f in (out / d).rglob("*") if f.is_file()) for d in ("switch", "merged")}
    h.emit({"worker": "export", "model": args.model, "params": sum(p.numel() for p in base.parameters()),
            "inject_s": inject_s, "export_switch_s": switch_s, "export_merged_s": merged_s, "bytes": size,
            "ref_shape": [batch, seq]})
    return 0


# ---- workers: ONNX Runtime (no torch imported) ----------------------------------------------------
def session(path: Path, threads: int):
    from surgeon.onnx.runtime import AdapterSession

    return h.timed(lambda: AdapterSession(path, providers=["CPUExecutionProvider"], intra_op_threads=threads))


def run_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(calls: dict, runs: int) -> dict[str, list[float]]:
    """Warm-up then ``runs`` rounds of every call in turn; ms per call."""
    for fn in calls.values():
        for _ in range(WARMUP):
            fn()
    out = {k: [] for k in calls}
    for _ in range(runs):
        for k, fn in calls.items():
            out[k].append(run_ms(fn))
    return out


def max_diff(a, b) -> float:
    import numpy as np

    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def ort_merged_worker(args) -> int:
    import numpy as np

    sess, load_s = session(Path(args.dir) / "merged", args.threads)
    vocab = vocab_of(args.model, args.quick)
    result = {"worker": "ort-merged", "model": args.model, "load_s": load_s, "latency_ms": {}}
    for k, (batch, seq) in enumerate(shapes_of(args)):
        feeds = feeds_for(vocab, batch, seq)
        if k == 0:
            result["diff_vs_torch"] = max_diff(sess.run(feeds)["logits"], np.load(Path(args.dir) / "ref_default.npy"))
        ms = interleaved({"a": lambda: sess.run(feeds)}, args.runs)
        result["latency_ms"][f"{batch}x{seq}"] = ms
        h.progress(f"[ort-merged {args.model} {batch}x{seq}] a {h.median(ms['a']):.1f} ms")
    h.emit(result)
    return 0


def ort_switch_worker(args) -> int:
    import numpy as np

    d = Path(args.dir)
    sess, load_s = session(d / "switch", args.threads)
    first_load = {}
    for name in ("default", "other"):
        _, first_load[name] = h.timed(lambda: sess.adapter(name))
    vocab = vocab_of(args.model, args.quick)
    result = {"worker": "ort-switch", "model": args.model, "load_s": load_s, "adapter_load_s": first_load,
              "latency_ms": {}, "lora_inputs": len(sess.lora_inputs)}
    for k, (batch, seq) in enumerate(shapes_of(args)):
        feeds = feeds_for(vocab, batch, seq)
        if k == 0:
            result["diff_vs_torch"] = {
                "base": max_diff(sess.run(feeds)["logits"], np.load(d / "ref_base.npy")),
                "default": max_diff(sess.run(feeds, adapter="default")["logits"], np.load(d / "ref_default.npy")),
                "other": max_diff(sess.run(feeds, adapter="other")["logits"], np.load(d / "ref_other.npy"))}
        ms = interleaved({"b": lambda: sess.run(feeds), "c": lambda: sess.run(feeds, adapter="default")}, args.runs)
        result["latency_ms"][f"{batch}x{seq}"] = ms
        h.progress(f"[ort-switch {args.model} {batch}x{seq}] b {h.median(ms['b']):.1f} ms, c {h.median(ms['c']):.1f} ms")
    result["switch"] = switch_cost(sess, vocab, args)
    h.emit(result)
    return 0


def switch_cost(sess, vocab: int, args) -> dict:
    """Per-call RunOptions + add_active_adapter cost, and run-time differences after a switch (ms)."""
    import onnxruntime as ort

    adapter = sess.adapter("default")
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        ort.RunOptions().add_active_adapter(adapter)
    options_ms = (time.perf_counter() - t0) / n * 1e3
    feeds = feeds_for(vocab, 1, 1)
    run = {name: (lambda name=name: sess.run(feeds, adapter=name)) for name in ("default", "other")}
    for _ in range(WARMUP):
        run["default"](), run["other"]()
    after_switch, same, other = [], [], []
    rounds = max(50, 5 * args.runs)
    for _ in range(rounds):
        after_switch.append(run_ms(run["default"]))  # the previous call ran "other"
        same.append(run_ms(run["default"]))
        other.append(run_ms(run["other"]))
    return {"options_ms": options_ms, "rounds": rounds, "same_ms": h.median(same),
            "switch_default_ms": h.median([a - b for a, b in zip(after_switch, same)]),
            "switch_other_ms": h.median([a - b for a, b in zip(other, same)])}


# ---- worker: eager torch ------------------------------------------------------------------------
def eager_worker(args) -> int:
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    config = dict(LORA, target_modules=list(h.MODELS[args.model][3]))
    torch.manual_seed(h.SEED + 3)
    unmerged = peft.get_peft_model(h.build_base(args.model, args.quick).eval(), peft.LoraConfig(**config)).eval()
    torch.manual_seed(h.SEED + 3)
    merged = peft.get_peft_model(h.build_base(args.model, args.quick).eval(), peft.LoraConfig(**config))
    merged = merged.merge_and_unload().eval()
    vocab = merged.config.vocab_size
    result = {"worker": "eager", "model": args.model, "latency_ms": {}}
    with torch.no_grad():
        for k, (batch, seq) in enumerate(shapes_of(args)):
            feeds = {k2: torch.from_numpy(v) for k2, v in feeds_for(vocab, batch, seq).items()}
            if k == 0:
                result["diff_merged_vs_unmerged"] = (unmerged(**feeds, use_cache=False).logits
                                                     - merged(**feeds, use_cache=False).logits).abs().max().item()
            ms = interleaved({"d": lambda: unmerged(**feeds, use_cache=False),
                              "e": lambda: merged(**feeds, use_cache=False)}, args.runs)
            result["latency_ms"][f"{batch}x{seq}"] = ms
            h.progress(f"[eager {args.model} {batch}x{seq}] d {h.median(ms['d']):.1f} ms, e {h.median(ms['e']):.1f} ms")
    h.emit(result)
    return 0


# ---- parent ----------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_tables(args, results: dict, start: str) -> None:
    print(start)
    print(f"end: {h.load_line()}")
    print(f"workload: fp32 CPU, {args.threads} threads, LoRA r={LORA['r']} alpha={LORA['lora_alpha']} (nonzero B), "
          f"median of {args.runs} runs after {WARMUP} warm-up{' [--quick: tiny configs]' if args.quick else ''}")
    head = f"{'model':<16} {'batch x seq':<11} {'config':<34} {'median ms':>10} {'min ms':>8} {'x (a)':>7} {'x (d)':>7}"
    for name, r in results.items():
        print()
        print(head)
        print("-" * len(head))
        ex, sw = r["export"], r["ort-switch"]
        model = f"{name} ({ex['params'] / 1e6:.1f}M)"
        goals = []
        for shape in r["ort-merged"]["latency_ms"]:
            lat = {**r["ort-merged"]["latency_ms"][shape], **sw["latency_ms"][shape], **r["eager"]["latency_ms"][shape]}
            med = {k: h.median(v) for k, v in lat.items()}
            for key in "abcde":
                label = f"({key}) {CONFIGS[key]}"
                print(f"{model:<16} {shape:<11} {label:<34} {med[key]:>10.1f} {min(lat[key]):>8.1f} "
                      f"{med[key] / med['a']:>7.2f} {med[key] / med['d']:>7.2f}")
            ca, cd = med["c"] / med["a"], med["c"] / med["d"]
            goals.append(f"  {shape}: (c)/(a) {ca:.3f} (goal <= {GOAL_VS_MERGED}: {verdict(ca <= GOAL_VS_MERGED)}), "
                         f"(c)/(d) {cd:.3f} (goal <= {GOAL_VS_PEFT}: {verdict(cd <= GOAL_VS_PEFT)}), "
                         f"(b)/(a) {med['b'] / med['a']:.3f}")
        s = sw["switch"]
        worst = max(s["options_ms"], s["switch_default_ms"], s["switch_other_ms"])
        print(f"switch: RunOptions + add_active_adapter {s['options_ms'] * 1e3:.1f} us/call; at 1x1 ({s['same_ms']:.2f} ms "
              f"a run) a run after a switch costs {s['switch_default_ms']:+.3f} ms (back to default) / "
              f"{s['switch_other_ms']:+.3f} ms (to other) vs a same-adapter run, median of {s['rounds']} rounds "
              f"(goal < {GOAL_SWITCH_MS:g} ms: {verdict(worst < GOAL_SWITCH_MS)}); first-use adapter file load "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sw["adapter_load_s"].items()))
        mb = {k: v / 1e6 for k, v in ex["bytes"].items()}
        print(f"export: switchable (2 adapters, {sw['lora_inputs']} LoRA inputs) {ex['export_switch_s']:.1f} s "
              f"({mb['switch']:.0f} MB), merged {ex['export_merged_s']:.1f} s ({mb['merged']:.0f} MB); session load: "
              f"switchable {sw['load_s']:.2f} s, merged {r['ort-merged']['load_s']:.2f} s")
        dv = sw["diff_vs_torch"]
        print(f"checks (max |diff| of logits, {'x'.join(map(str, ex['ref_shape']))}): ONNX vs torch base {dv['base']:.2g}, "
              f"default {dv['default']:.2g}, other {dv['other']:.2g}, merged {r['ort-merged']['diff_vs_torch']:.2g}; "
              f"eager merged vs unmerged {r['eager']['diff_merged_vs_unmerged']:.2g}")
        print("CPU share used by other processes while each worker ran: "
              + ", ".join(f"{k} {100 * r[k]['foreign_cpu']:.0f}%" for k in ("export", "ort-merged", "ort-switch", "eager")))
        print("goals:")
        for line in goals:
            print(line)


def parent(args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in h.MODELS]
    if unknown:
        print(f"bench_onnx: error: --models: unknown {unknown}; choose from {sorted(h.MODELS)}", file=sys.stderr)
        return 1
    start = f"{h.machine_line()} (at start)\nstart: {h.load_line()}"
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    common = ["--threads", str(args.threads), "--runs", str(args.runs), "--shapes", args.shapes] + (
        ["--quick"] if args.quick else [])
    results = {}
    try:
        for name in models:
            d = root / name
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            results[name] = {}
            for kind in ("export", "ort-merged", "ort-switch", "eager"):
                h.progress(f"== {name} / {kind}")
                results[name][kind] = h.run_worker_load(__file__, ["--worker", kind, "--model", name, "--dir", str(d), *common])
                gc.collect()
        explored = [explore(root, name, common) for name in models] if args.explore else []
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_tables(args, results, start)
    for text in explored:
        print()
        print(text, end="")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def explore(root: Path, name: str, common: list[str]) -> str:
    """The table of ``onnx_explore.py`` (ORT session settings, op counts) for one model's exports."""
    h.progress(f"== {name} / explore")
    script = str(Path(__file__).with_name("onnx_explore.py"))
    proc = subprocess.run([sys.executable, script, "--dir", str(root), "--model", name, *common],
                          stdout=subprocess.PIPE, text=True, check=False)
    return proc.stdout if proc.returncode == 0 else f"onnx_explore.py failed for {name} (exit {proc.returncode})\n"


WORKERS = {"export": export_worker, "ort-merged": ort_merged_worker, "ort-switch": ort_switch_worker,
           "eager": eager_worker}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="ONNX inference benchmark (see the module docstring).")
    ap.add_argument("--models", default="gpt2,llama", help="comma-separated, from: " + ", ".join(h.MODELS))
    ap.add_argument("--shapes", help="batch x seq list (default 1x128,4x128; --quick 1x16,2x16)")
    ap.add_argument("--runs", type=int, help="timed runs per config (default 20; --quick 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--keep", default=None, help="write the exports under this directory and keep them")
    ap.add_argument("--explore", action="store_true", help="also run onnx_explore.py (ORT settings, op counts) per model")
    ap.add_argument("--json", default=None, help="write every worker's result to this file")
    ap.add_argument("--quick", action="store_true", help="tiny configs, shapes 1x16,2x16, 5 runs")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(h.MODELS), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.shapes is None:
        args.shapes = "1x16,2x16" if args.quick else "1x128,4x128"
    if args.runs is None:
        args.runs = 5 if args.quick else 20
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return WORKERS[args.worker](args) if args.worker else parent(args)


if __name__ == "__main__":
    sys.exit(main())
