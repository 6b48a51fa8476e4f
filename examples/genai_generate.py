"""Serve a `surgeon export --kv-cache` directory with onnxruntime-genai, switching LoRA adapters per request.

Needs only onnxruntime-genai (in its own venv: it requires the `onnxruntime` package, which clashes with
`onnxruntime-gpu`), not surgeon or torch:

    python3 -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai
    .venv-genai/bin/python examples/genai_generate.py runs/demo-onnx --base --adapter demo-adapter

The model is loaded once and every adapter file once (`og.Adapters`); each request is a new `og.Generator` with its
own active adapter, so requests with different adapters share one copy of the base weights. Several `--prompt`
make one padded batch. `--json` prints the token ids (what the tests compare with `AdapterSession.generate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnxruntime_genai as og


def load(export_dir: Path, threads: int | None = None) -> tuple[og.Model, og.Adapters, dict]:
    """The model and every adapter the export's manifest lists (name -> manifest entry), each loaded once."""
    config = og.Config(str(export_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    adapters = og.Adapters(model)
    listed = json.loads((export_dir / "manifest.json").read_text()).get("adapters") or {}
    for name, entry in listed.items():
        adapters.load(str(export_dir / entry["file"]), name)
    return model, adapters, listed


def generate(model: og.Model, adapters: og.Adapters, prompts: list[list[int]], adapter: str | None,
             max_new_tokens: int, pad: int) -> list[list[int]]:
    """Greedy new tokens for each prompt (one batch, padded by genai), with ``adapter`` active (None: the base)."""
    params = og.GeneratorParams(model)
    longest = max(len(p) for p in prompts)
    params.set_search_options(do_sample=False, max_length=longest + max_new_tokens, batch_size=len(prompts))
    generator = og.Generator(model, params)
    if adapter is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens([p + [pad] * (longest - len(p)) for p in prompts])
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)[longest:]] for i in range(len(prompts))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--prompt", action="append", help="repeat for a batch (default: the demo prompt)")
    parser.add_argument("--prompt-ids", help="a JSON list of token-id lists, instead of --prompt")
    parser.add_argument("--adapter", action="append", default=[], help="an adapter of the export; repeat to switch")
    parser.add_argument("--base", action="store_true", help="also run the base model (no adapter)")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=30)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--json", action="store_true", help="print token ids as JSON lines")
    args = parser.parse_args(argv)
    if not (args.export_dir / "genai_config.json").is_file():
        print(f"{args.export_dir}: no genai_config.json; export with `surgeon export MODEL ADAPTER -o OUT --kv-cache`",
              file=sys.stderr)
        return 2
    model, adapters, listed = load(args.export_dir, args.threads)
    pad = json.loads((args.export_dir / "genai_config.json").read_text())["model"]["pad_token_id"]
    tokenizer = None if args.json and args.prompt_ids else og.Tokenizer(model)  # an export may have no tokenizer files
    unknown = [a for a in args.adapter if a not in listed]
    if unknown:
        print(f"no adapter named {unknown[0]!r} in {args.export_dir}; it has: {', '.join(listed) or 'none'}",
              file=sys.stderr)
        return 2
    if args.prompt_ids:
        prompts = json.loads(args.prompt_ids)
    else:
        prompts = [[int(t) for t in tokenizer.encode(p)] for p in (args.prompt or ["Day 12, noon. Wind"])]
    requests = ([None] if args.base or not args.adapter else []) + args.adapter
    for adapter in requests:
        start = time.perf_counter()
        new = generate(model, adapters, prompts, adapter, args.max_new_tokens, pad)
        seconds = time.perf_counter() - start
        if args.json:
            print(json.dumps({"adapter": adapter, "prompts": prompts, "new_tokens": new, "seconds": seconds}))
            continue
        for prompt, tokens in zip(prompts, new):
            print(f"adapter={adapter or '(none)'} | {tokenizer.decode(prompt)} | {tokenizer.decode(tokens)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
