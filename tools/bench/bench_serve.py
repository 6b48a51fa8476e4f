"""python tools/bench/bench_serve.py

Load test of ``surgeon serve`` on loopback. Four LoRA adapters (r=8 on c_attn and c_fc, nonzero B) on one base,
exported as a bank with a KV cache (one batch mixes adapters) and as a switchable export (for one server per
adapter). N concurrent clients (``--clients``, default 1, 4, 16, 64), each sending its share of the requests one
after another, streamed through the ``openai`` client (``AsyncOpenAI``). Each request draws one of the four
adapters, a prompt from the bundled corpus, greedy or seeded sampling (half each), 0.5x to 1.5x ``--max-tokens`` new
tokens (``ignore_eos``: known lengths, and closed-loop clients do not march in step). Every response is checked
against ``AdapterSession.generate`` on that request alone (same tokens, so the same text).

Reported per level: throughput (generated tokens/s over the level's wall time), p50/p99 latency and time to first
token (all requests, and after the opening wave: each client's requests but its first, which all arrive at
once), the share of the level's time the batcher was busy and its mean rows per decode step (from the server's
/metrics), errors, mismatches. Each level sends 4 requests per client (2 at 64 clients). The 1-client level is the same kind of requests sent one at a time; "per-adapter servers"
sends the 16-client load to four servers of the switchable export (one per adapter, ``--threads`` split between
them). Goals at 16 clients: >= 3x the one-at-a-time throughput; p99 time to first token under 2x a lone request's
prefill plus one decode step at the batch size (both measured on the export with ONNX Runtime alone); 0 errors,
0 mismatches at 64 clients. The load generator runs on the same cores as the server. Models: the embedded tiny
GPT-2 (``tiny``, trained) and GPT-2 small's body (12 x 768, random init) with the embedded tokenizer's 1536-token
vocabulary (86.7M), so that every token it makes has text. A control counts how many requests ``AdapterSession.
generate`` itself answers differently in a left-padded batch of 8 than alone: on a random-init model whose
next-token scores are nearly tied, float rounding that depends on the batch shape can flip a token.
About 5 minutes on 2 cores. Options: ``--models tiny,gpt2``, ``--clients 1,4,16,64``, ``--max-batch 16``,
``--max-tokens 32``, ``--threads 2``, ``--json``, ``--quick`` (the tiny model, up to 16 clients).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness as h

ADAPTERS = ("a0", "a1", "a2", "a3")
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "surgeon" / "assets" / "tiny-gpt2"
CORPUS = ROOT / "surgeon" / "assets" / "corpus" / "finetune_heldout.txt"
POOL = 32  # distinct requests; a level sends them round-robin


def export_worker(args) -> int:
    import peft
    import torch
    import transformers

    import surgeon
    from surgeon.onnx.export import export_onnx

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    out = Path(args.dir)
    if args.model == "tiny":
        base = transformers.AutoModelForCausalLM.from_pretrained(TINY).eval()
    else:  # GPT-2 small's body with the embedded tokenizer's vocabulary, so that every id it makes has text
        base = h.build_from_config("GPT2Config", {"vocab_size": 1536, "bos_token_id": 0, "eos_token_id": 0})
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(h.SEED + 10 + seed)
        ref = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                                       init_lora_weights=False))
        ref.save_pretrained(out / name)
        base = ref.unload()
    model = surgeon.PeftModel.from_pretrained(base, out / ADAPTERS[0], adapter_name=ADAPTERS[0]).eval()
    for name in ADAPTERS[1:]:
        model.load_adapter(out / name, adapter_name=name)
    for kind in ("bank", "switchable"):
        _, seconds = h.timed(lambda: export_onnx(model, out / kind, kv_cache=True, bank=kind == "bank"))
        shutil.copy(TINY / "tokenizer.json", out / kind / "tokenizer.json")  # the server's tokenizer
        h.progress(f"[export {args.model}] {kind} {seconds:.1f} s")
    h.emit({"worker": "export", "params": sum(p.numel() for p in base.parameters())})
    return 0


def pool(max_tokens: int, quick: bool) -> list[dict]:
    """The distinct requests: a corpus line's first 8-24 words, an adapter, greedy or seeded sampling."""
    import numpy as np

    rng = np.random.default_rng(h.SEED)
    lines = [line for line in CORPUS.read_text().splitlines() if len(line.split()) > 24]
    requests = []
    for i in range(POOL // (4 if quick else 1)):
        words = lines[i % len(lines)].split()[: int(rng.integers(8, 25))]
        sampled = i % 2 == 1
        requests.append({"prompt": " ".join(words), "model": ADAPTERS[int(rng.integers(0, 4))],
                         "max_tokens": int(rng.integers(max_tokens // 2, max_tokens * 3 // 2 + 1)), "temperature": 0.8 if sampled else 0.0,
                         "top_p": 0.95 if sampled else 1.0, "seed": 100 + i})
    return requests


def expected(export: Path, tokenizer, requests: list[dict], threads: int) -> tuple[list[str], dict]:
    """Each request's text from AdapterSession.generate alone, and the lone prefill / one decode step times."""
    import numpy as np

    from surgeon.names import past_of_present
    from surgeon.onnx.decoding import empty_past
    from surgeon.onnx.runtime import AdapterSession

    session = AdapterSession(export, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    texts = []
    for r in requests:
        ids = np.array([tokenizer.encode(r["prompt"]).ids])
        sampling = {"do_sample": True, "temperature": r["temperature"], "top_p": r["top_p"]} \
            if r["temperature"] > 0 else {}
        out = session.generate(ids, adapters=[r["model"]], max_new_tokens=r["max_tokens"], eos_token_id=[],
                               seed=r["seed"], **sampling)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
    control = 0  # the same requests through AdapterSession.generate in left-padded batches of 8
    for start in range(0, len(requests), 8):
        group = [r for r in requests[start:start + 8] if r["temperature"] == 0]  # greedy: one generator per batch
        if not group:
            continue
        encoded = [tokenizer.encode(r["prompt"]).ids for r in group]
        width = max(map(len, encoded))
        ids = np.array([[0] * (width - len(e)) + e for e in encoded])
        mask = np.array([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        out = session.generate(ids, mask, adapters=[r["model"] for r in group],
                               max_new_tokens=max(r["max_tokens"] for r in group), eos_token_id=[])
        for row, r in zip(out, group):
            text = tokenizer.decode(row[width:width + r["max_tokens"]].tolist(), skip_special_tokens=True)
            control += text != texts[requests.index(r)]
    lengths = sorted(len(tokenizer.encode(r["prompt"]).ids) for r in requests)
    n = lengths[len(lengths) // 2]
    feeds = {"input_ids": np.full((1, n), 5, np.int64), "attention_mask": np.ones((1, n), np.int64),
             "position_ids": np.arange(n)[None], **empty_past(session.generation, 1)}
    prefill = [h.timed(lambda: session.run(feeds, adapters=[ADAPTERS[0]]))[1] for _ in range(5)]
    greedy = sum(r["temperature"] == 0 for r in requests)
    return texts, {"prompt_tokens": n, "prefill_s": h.median(prefill), "session": session,
                   "control": f"{control} of {greedy} greedy requests"}


def step_time(timing: dict, batch: int, cache: int) -> float:
    """One decode step at ``batch`` rows over a ``cache``-token past (ONNX Runtime alone)."""
    import numpy as np

    from surgeon.onnx.decoding import empty_past

    session = timing["session"]
    past = {k: np.zeros((batch, v.shape[1], cache, v.shape[3]), v.dtype)
            for k, v in empty_past(session.generation, batch).items()}
    feeds = {"input_ids": np.full((batch, 1), 5, np.int64), "attention_mask": np.ones((batch, cache + 1), np.int64),
             "position_ids": np.full((batch, 1), cache), **past}
    rows = [ADAPTERS[i % 4] for i in range(batch)]
    session.run(feeds, adapters=rows)
    return h.median([h.timed(lambda: session.run(feeds, adapters=rows))[1] for _ in range(5)])


def engine_counters(url: str) -> dict[str, float]:
    """The server's busy seconds and decode-step rows so far (from its /metrics)."""
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=60) as answer:
        text = answer.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    return {"busy": values.get("surgeon_engine_busy_seconds_total", 0.0),
            "rows": values.get("surgeon_batch_rows_sum", 0.0), "steps": values.get("surgeon_batch_rows_count", 0.0)}


class Served:
    def __init__(self, export: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "surgeon", "serve", str(export), "--port", "0", *args],
                                     stderr=subprocess.PIPE, text=True)
        banner = self.proc.stderr.readline()
        if "serving" not in banner:
            raise RuntimeError(banner + self.proc.stderr.read())
        self.url = banner.split(" at ")[1].split()[0]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=120)


async def load(urls: dict[str, str], requests: list[dict], texts: list[str], clients: int, count: int) -> dict:
    """``clients`` concurrent clients send ``count`` requests (the pool round-robin), each streamed."""
    import openai

    sessions = {url: openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
                for url in set(urls.values())}
    results = []

    async def one(i: int):
        r = requests[i % len(requests)]
        client = sessions[urls[r["model"]]]
        t0 = time.perf_counter()
        first, pieces = None, []
        try:
            stream = await client.completions.create(**r, stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter() - t0
                pieces.append(chunk.choices[0].text)
            results.append({"ok": "".join(pieces) == texts[i % len(requests)], "error": False, "ttft": first,
                            "latency": time.perf_counter() - t0, "tokens": r["max_tokens"], "wave": i < clients})
        except Exception as err:  # counted, not raised: the level reports its errors
            results.append({"ok": False, "error": True, "message": f"{type(err).__name__}: {err}"})

    async def client(c: int):
        for i in range(c, count, clients):
            await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    for s in sessions.values():
        await s.close()
    good = [r for r in results if not r["error"]]

    def pct(key, q, rows=good):
        xs = sorted(r[key] for r in rows)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"clients": clients, "requests": count, "wall_s": wall, "tok_s": sum(r["tokens"] for r in good) / wall,
            "p50_s": pct("latency", 0.5), "p99_s": pct("latency", 0.99), "ttft_p50_s": pct("ttft", 0.5),
            "ttft_p99_s": pct("ttft", 0.99), "ttft_p99_later_s": pct("ttft", 0.99, [r for r in good if not r["wave"]]),
            "errors": sum(r["error"] for r in results),
            "mismatches": sum(not r["ok"] and not r["error"] for r in results),
            "messages": sorted({r["message"] for r in results if r["error"]})[:3]}


def bench_model(args, name: str, work: Path) -> dict:
    from tokenizers import Tokenizer

    out = work / name
    out.mkdir()
    made = h.run_worker(__file__, ["--worker", "export", "--model", name, "--dir", str(out), "--threads",
                                   str(args.threads), *(["--quick"] if args.quick else [])])
    tokenizer = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    requests = pool(args.max_tokens, args.quick)
    texts, timing = expected(out / "bank", tokenizer, requests, args.threads)
    step = step_time(timing, args.max_batch, timing["prompt_tokens"] + args.max_tokens // 2)
    h.progress(f"[{name}] lone prefill ({timing['prompt_tokens']} tokens) {timing['prefill_s'] * 1000:.1f} ms, decode "
               f"step at {args.max_batch} rows {step * 1000:.1f} ms")
    rows = []
    server = Served(out / "bank", "--max-batch", str(args.max_batch), "--max-queue", "1024", "--threads",
                    str(args.threads))
    try:
        for clients in args.clients:
            count = max(4 * clients if clients <= 16 else 2 * clients, len(requests) // 2)
            before = engine_counters(server.url)
            result = asyncio.run(load(dict.fromkeys(ADAPTERS, server.url), requests, texts, clients, count))
            after = engine_counters(server.url)
            result["busy"] = (after["busy"] - before["busy"]) / result["wall_s"]
            result["rows"] = (after["rows"] - before["rows"]) / max(after["steps"] - before["steps"], 1)
            h.progress(f"[{name} {clients} clients] {result['tok_s']:.1f} tok/s, ttft p99 {result['ttft_p99_s']:.3f} s,"
                       f" errors {result['errors']}, mismatches {result['mismatches']}; engine busy "
                       f"{result['busy']:.0%}, {result['rows']:.1f} rows per decode step")
            rows.append({"setup": "one server, bank", **result})
    finally:
        server.stop()
    per = max(1, args.threads // len(ADAPTERS))
    servers = [Served(out / "switchable", "--max-batch", str(args.max_batch), "--max-queue", "1024", "--threads",
                      str(per)) for _ in ADAPTERS]
    try:
        clients = 16 if 16 in args.clients else max(args.clients)
        count = 4 * clients if clients <= 16 else 2 * clients
        result = asyncio.run(load({a: s.url for a, s in zip(ADAPTERS, servers)}, requests, texts, clients, count))
        rows.append({"setup": f"4 servers, one per adapter ({per} thread each)", **result})
    finally:
        for s in servers:
            s.stop()
    return {"model": name, "params": made["params"], "prefill_s": timing["prefill_s"], "step_s": step, "rows": rows,
            "control": timing["control"]}


def report(result: dict, max_batch: int) -> None:
    rows = result["rows"]
    alone = next((r for r in rows if r["clients"] == 1 and r["setup"].startswith("one")), None)
    print(f"\n{result['model']} ({result['params'] / 1e6:.1f}M): lone prefill {result['prefill_s'] * 1000:.1f} ms, "
          f"decode step at {max_batch} rows {result['step_s'] * 1000:.1f} ms; control: AdapterSession.generate in "
          f"batches of 8 differs from alone on {result['control']}")
    print("| setup | clients | requests | tok/s | vs one at a time | latency p50 / p99 | first token p50 / p99 | "
          "first token p99 after the opening wave | engine busy, rows per step | errors | mismatches |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tok_s'] / alone['tok_s']:.2f}x" if alone else "-"
        print(f"| {r['setup']} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {ratio} | {r['p50_s']:.2f} / "
              f"{r['p99_s']:.2f} s | {r['ttft_p50_s'] * 1000:.0f} / {r['ttft_p99_s'] * 1000:.0f} ms | "
              f"{r['ttft_p99_later_s'] * 1000:.0f} ms | {_engine(r)} | {r['errors']} | "
              f"{r['mismatches']} |")
        for message in r["messages"]:
            print(f"  error: {message}")
    at16 = next((r for r in rows if r["clients"] == 16 and r["setup"].startswith("one")), None)
    at64 = next((r for r in rows if r["clients"] == 64 and r["setup"].startswith("one")), None)
    if at16 and alone:
        bound = 2 * (result["prefill_s"] + result["step_s"])
        print(f"goal: 16 clients >= 3x one at a time: {at16['tok_s'] / alone['tok_s']:.2f}x "
              f"({'met' if at16['tok_s'] >= 3 * alone['tok_s'] else 'MISSED'})")
        for label, key in (("all requests", "ttft_p99_s"), ("after the opening wave", "ttft_p99_later_s")):
            print(f"goal: p99 first token at 16 clients < {bound * 1000:.0f} ms (2 x (prefill + step)), {label}: "
                  f"{at16[key] * 1000:.0f} ms ({'met' if at16[key] < bound else 'MISSED'})")
    if at64:
        print(f"goal: 0 errors, 0 mismatches at 64 clients: {at64['errors']} / {at64['mismatches']} "
              f"({'met' if at64['errors'] == at64['mismatches'] == 0 else 'MISSED'})")


def _engine(row: dict) -> str:
    return f"{row['busy']:.0%}, {row['rows']:.1f}" if "busy" in row else "-"


def main() -> int:
    ap = h.bench_parser(__doc__)
    ap.set_defaults(models="tiny,gpt2")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.worker == "export":
        return export_worker(args)
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.quick:  # the embedded model only (GPT-2's tiny config has fewer ids than the tokenizer), fewer clients
        args.clients, args.models = [c for c in args.clients if c <= 16], "tiny"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(h.machine_line())
    print(f"start: {h.load_line()}")
    everything = {}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        for name in args.models.split(","):
            everything[name] = bench_model(args, name, Path(work))
            report(everything[name], args.max_batch)
    return h.finish(args.json, everything)


if __name__ == "__main__":
    sys.exit(main())
