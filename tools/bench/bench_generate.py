"""python tools/bench/bench_generate.py

Prints the machine line and the load, the copy bandwidth, then per model a table of generation
throughput (tokens/s, median, and the ratio to PEFT eager) at batch 1 and batch 8 for:
(1) PEFT eager ``generate`` with the adapter unmerged, (2) transformers ``generate`` on the merged
model (PEFT ``merge_and_unload``), (3) surgeon ``SurgeonModel.generate`` (unmerged, decode graph),
(4) surgeon ``AdapterSession.generate`` in ONNX Runtime with the adapter, (5) the same session with
no adapter; the memory-bandwidth floor at batch 1; whether the greedy tokens agree; and the goals:
at batch 1, (4) >= 1.25x (1), (4) within 1.2x of the floor, (4) within 10% of (5); at batch 8,
(4) >= 2x (1). Progress goes to stderr. About 12 minutes on 2 cores; ``--quick`` (tiny configs)
about a minute.

Workload: the models of bench_train.py (GPT2Config defaults, 124.4M params, LoRA on c_attn; a
Llama at GPT-2-small scale, 134.1M, LoRA on q_proj and v_proj), random-init, seeded, fp32, eval;
LoRA r=8 alpha=16 with ``init_lora_weights=False`` (nonzero B), saved once in PEFT's format and
loaded by every tool. Prompt: 32 random tokens per row, no padding; 64 new tokens, greedy, end of
sequence disabled (``min_new_tokens``/``eos_token_id=[]``) so every run makes exactly 64. Tokens/s =
batch x 64 / seconds of the whole call (prefill included); median of ``--runs`` (default 3) after
one warm-up call. 2 threads everywhere. Each tool runs in its own subprocess (``--worker
export|peft|surgeon|ort``), one after the other, so no two thread pools share the cores.

Floor: bytes of weights read per generated token at batch 1 (every parameter except the input
embedding table when it is not also the output layer, and the position table: one row of each is
read) / copy bandwidth, the bytes copied per second by ``copy_`` of a 1 GiB fp32 tensor (measured by
``bench_fold.py --worker bandwidth``, which reports read + written bytes: twice this). A second
floor line divides by read + written bytes per second instead (the stricter bound). Options: ``--models gpt2,llama``, ``--batches 1,8``,
``--runs 3``, ``--threads 2``, ``--keep DIR``, ``--json PATH``, ``--quick``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness as h

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "init_lora_weights": False}
PROMPT, NEW = 32, 64
GOALS = {"vs_peft_b1": 1.25, "floor": 1.2, "vs_base": 1.10, "vs_peft_b8": 2.0}
TOOLS = {"peft": "(1) PEFT eager, unmerged", "merged": "(2) transformers eager, merged",
         "surgeon": "(3) surgeon torch, unmerged", "ort": "(4) surgeon ONNX Runtime + adapter",
         "ort_base": "(5) surgeon ONNX Runtime, no adapter"}


def prompts(vocab: int, batch: int, length: int):
    import numpy as np

    rng = np.random.default_rng(h.SEED + batch)
    return rng.integers(5, vocab, (batch, length), dtype=np.int64)


def timed_runs(fn, runs: int, label: str) -> tuple[list[float], object]:
    out = fn()  # warm-up (and the tokens we compare)
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        h.progress(f"{label} run {i + 1}/{runs}: {times[-1]:.2f} s")
    return times, out


def weights_read_bytes(model) -> int:
    """Bytes of weights read for one token at batch 1 (see the module docstring)."""
    seen, total = set(), 0
    head = model.get_output_embeddings()
    skip = set()
    embed = model.get_input_embeddings()
    if head is None or embed.weight.data_ptr() != head.weight.data_ptr():
        skip.add(embed.weight.data_ptr())
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or p.data_ptr() in skip or name.endswith(("wpe.weight", "embed_positions.weight")):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


# ---- workers ------------------------------------------------------------------------------------
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
    torch.manual_seed(h.SEED + 3)
    ref = peft.get_peft_model(base, peft.LoraConfig(target_modules=list(h.MODELS[args.model][3]), **LORA))
    ref.save_pretrained(out / "adapter")
    weights = weights_read_bytes(base)
    base = ref.unload()
    model = surgeon.PeftModel.from_pretrained(base, out / "adapter", adapter_name="adapter").eval()
    _, export_s = h.timed(lambda: export_onnx(model, out / "onnx", kv_cache=True))
    h.progress(f"[export {args.model}] KV-cache export {export_s:.1f} s")
    base.save_pretrained(out / "base")  # every worker loads the same weights
    h.emit({"worker": "export", "params": sum(p.numel() for p in base.parameters()), "weights_read": weights,
            "vocab": base.config.vocab_size, "export_s": export_s})
    return 0


def torch_worker(args) -> int:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    out = Path(args.dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base").eval()
    if args.worker == "peft":
        import peft

        model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    else:
        import surgeon

        model = surgeon.PeftModel.from_pretrained(base, out / "adapter").eval()
    results = {}

    def measure(m, tool):
        for batch in args.batch_list:
            ids = torch.from_numpy(prompts(base.config.vocab_size, batch, args.prompt))
            call = lambda: m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,  # noqa: E731
                                      min_new_tokens=args.new, do_sample=False, pad_token_id=0)
            with torch.no_grad():
                times, tokens = timed_runs(call, args.runs, f"[{tool} {args.model} b{batch}]")
            results[f"{tool}/{batch}"] = {"s": times, "tokens": tokens[:, args.prompt:].tolist()}

    measure(model, args.worker)
    if args.worker == "peft":
        measure(model.merge_and_unload().eval(), "merged")
    h.emit({"worker": args.worker, "results": results})
    return 0


def ort_worker(args) -> int:
    from surgeon.onnx.runtime import AdapterSession

    session = AdapterSession(Path(args.dir) / "onnx", providers=["CPUExecutionProvider"], intra_op_threads=args.threads)
    vocab = session.manifest["generation"]["vocab_size"]
    results = {}
    for batch in args.batch_list:
        ids = prompts(vocab, batch, args.prompt)
        for tool, adapter in (("ort", "adapter"), ("ort_base", None)):
            call = lambda: session.generate(ids, adapter=adapter, max_new_tokens=args.new, eos_token_id=[])  # noqa: E731
            times, tokens = timed_runs(call, args.runs, f"[{tool} {args.model} b{batch}]")
            results[f"{tool}/{batch}"] = {"s": times, "tokens": tokens[:, args.prompt:].tolist()}
    h.emit({"worker": "ort", "results": results})
    return 0


# ---- parent ------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(name: str, info: dict, results: dict, bandwidth: float, batches: list[int], new: int) -> None:
    tps = {key: int(key.split("/")[1]) * new / h.median(r["s"]) for key, r in results.items()}
    floor = bandwidth / 2 / info["weights_read"]  # bytes copied per second (read once, written once)
    floor_rw = bandwidth / info["weights_read"]
    print(f"\n{name} ({info['params'] / 1e6:.1f}M params, {info['weights_read'] / 1e6:.0f} MB of weights read per token; "
          f"KV-cache export {info['export_s']:.1f} s)")
    print(f"{'batch':>5}  {'configuration':40} {'tokens/s':>9} {'x PEFT':>7}")
    for batch in batches:
        for tool, label in TOOLS.items():
            key = f"{tool}/{batch}"
            if key in tps:
                print(f"{batch:>5}  {label:40} {tps[key]:9.1f} {tps[key] / tps[f'peft/{batch}']:7.2f}")
        if batch == 1:
            print(f"{batch:>5}  {'floor (weights / bytes copied per s)':40} {floor:9.1f} {floor / tps['peft/1']:7.2f}")
            print(f"{batch:>5}  {'floor (weights / bytes read+written per s)':40} {floor_rw:9.1f} "
                  f"{floor_rw / tps['peft/1']:7.2f}")
    same = {tool: all(results[f"{tool}/{b}"]["tokens"] == results[f"peft/{b}"]["tokens"] for b in batches)
            for tool in ("merged", "surgeon", "ort")}
    print("greedy tokens equal to PEFT's: " + ", ".join(f"{t} {'yes' if ok else 'NO'}" for t, ok in same.items()))
    if 1 in batches:
        r1, f1, b1 = tps["ort/1"] / tps["peft/1"], floor / tps["ort/1"], tps["ort_base/1"] / tps["ort/1"]
        print(f"goals at batch 1: ONNX Runtime + adapter {r1:.2f}x PEFT eager (goal >= {GOALS['vs_peft_b1']}: "
              f"{verdict(r1 >= GOALS['vs_peft_b1'])}); floor / it {f1:.2f} (goal <= {GOALS['floor']}: "
              f"{verdict(f1 <= GOALS['floor'])}); no adapter / adapter {b1:.2f} (goal <= {GOALS['vs_base']}: "
              f"{verdict(b1 <= GOALS['vs_base'])})")
    if 8 in batches:
        r8 = tps["ort/8"] / tps["peft/8"]
        print(f"goal at batch 8: ONNX Runtime + adapter {r8:.2f}x PEFT eager (goal >= {GOALS['vs_peft_b8']}: "
              f"{verdict(r8 >= GOALS['vs_peft_b8'])})")


def parent(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    print(h.machine_line())
    print(f"start: {h.load_line()}")
    fold_script = str(Path(__file__).with_name("bench_fold.py"))
    h.progress("== copy bandwidth")
    bw = h.run_worker(fold_script, ["--worker", "bandwidth", "--threads", str(args.threads)] + (["--quick"] if args.quick else []))
    print(f"copy bandwidth: {bw['touched_gbs'] / 2:.2f} GB/s copied ({bw['touched_gbs']:.2f} GB/s read + written; "
          "fp32 copy_ of 1 GiB into a touched tensor)")
    print(f"workload: fp32 CPU, {args.threads} threads, prompt {args.prompt} tokens, {args.new} new tokens, greedy, "
          f"LoRA r=8 (nonzero B), median of {args.runs} runs after 1 warm-up")
    everything = {"bandwidth": bw}
    for name in args.models.split(","):
        root = Path(args.keep) / name if args.keep else Path(tempfile.mkdtemp(prefix=f"bench-gen-{name}-"))
        root.mkdir(parents=True, exist_ok=True)
        common = ["--model", name, "--dir", str(root), "--threads", str(args.threads), "--runs", str(args.runs),
                  "--batches", args.batches] + (["--quick"] if args.quick else [])
        try:
            h.progress(f"== {name} / export")
            info = h.run_worker(__file__, ["--worker", "export", *common])
            results = {}
            for worker in ("peft", "surgeon", "ort"):
                h.progress(f"== {name} / {worker}")
                results.update(h.run_worker(__file__, ["--worker", worker, *common])["results"])
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        report(name, info, results, bw["touched_gbs"] * 1e9, args.batch_list, args.new)
        everything[name] = {"info": info, "results": {k: v["s"] for k, v in results.items()}}
    return h.finish(args.json, everything)


def parse(argv=None) -> argparse.Namespace:
    ap = h.bench_parser(__doc__, runs=3, json_help="write the raw seconds here")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--keep", help="keep the base, adapter and export here")
    args = ap.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",") if b]
    args.prompt, args.new = (8, 16) if args.quick else (PROMPT, NEW)  # the quick configs have 64 positions
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker == "export":
        return export_worker(args)
    if args.worker in ("peft", "surgeon"):
        return torch_worker(args)
    if args.worker == "ort":
        return ort_worker(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
