"""python examples/deploy_switchable.py [--steps 60] [--out runs/example]

Fine-tunes two LoRA adapters on the embedded tiny GPT-2 (the bundled ship's log, and the bundled
prose), exports the base once with both as switchable inputs, then serves one prompt through
plain ONNX Runtime with each adapter and with none, printing the greedy next words of each:

    adapter=shiplog   -> 'Day 3, dawn. The winds. Windh-way'
    adapter=prose     -> 'Day 3, dawn. The winding is a list of the list of'
    adapter=(none)    -> 'Day 3, dawn. The wind is a single string.<|endoftext|>The "'

(60 steps each; the base model was pretrained on Python docstrings, hence "a single string".)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import surgeon
from surgeon.hub import ASSETS, load_tokenizer
from surgeon.onnx.export import export_onnx
from surgeon.workflows.train import TrainSettings, token_blocks, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/example")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny-gpt2")
    config = surgeon.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    model = surgeon.get_peft_model(surgeon.load_model("tiny-gpt2"), config, adapter_name="shiplog")
    model.add_adapter("prose", config)
    settings = TrainSettings(steps=args.steps, batch_size=4, seq_len=64)
    for name, text in (("shiplog", "finetune.txt"), ("prose", "pretrain_heldout.txt")):
        model.set_adapter(name)
        blocks = token_blocks(tokenizer, ASSETS / "corpus" / text, settings.seq_len)
        result = train(model, blocks, blocks[:8], settings, progress=False)
        print(f"trained {name}: loss {result['heldout_loss_before']:.2f} -> {result['heldout_loss_after']:.2f}")
    out = Path(args.out)
    export_onnx(model, out, force=True, source="tiny-gpt2")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # adapter inputs with rank-0 defaults are by design: skip ORT's warning
    session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])
    prompt = "Day 3, dawn. The wind"
    for name in ("shiplog", "prose", None):
        options = ort.RunOptions()
        if name:
            adapter = ort.LoraAdapter()
            adapter.Load(str(out / "adapters" / f"{name}.onnx_adapter"))
            options.add_active_adapter(adapter)
        ids = tokenizer(prompt)["input_ids"]
        for _ in range(8):  # greedy, no cache: enough for a demonstration
            feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
            ids.append(int(session.run(["logits"], feeds, options)[0][0, -1].argmax()))
        print(f"adapter={name or '(none)':9} -> {tokenizer.decode(ids)!r}")


if __name__ == "__main__":
    main()
