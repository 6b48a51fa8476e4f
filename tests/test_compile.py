"""``get_peft_model(..., compile=True)`` / ``surgeon train --compile``: the injected graphs run through
``torch.compile`` (inductor, real compilation on CPU). The compiled model's loss is within 1e-5 and its
adapter gradients within 1e-6 of the eager model's (fp32), eval logits within 1e-5; toggling
train/eval compiles once per mode and then reuses both."""

from __future__ import annotations

import torch
import torch._dynamo

import surgeon

from conftest import batch, make_base
from test_cli import run

CONFIG = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_compiled_graphs_equal_eager_and_compile_once_per_mode():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(**CONFIG))
    torch.manual_seed(0)
    compiled = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(**CONFIG), compile=True)
    assert compiled.compile_graphs and not eager.compile_graphs
    b = batch("llama", b=2, s=9)
    for model in (eager, compiled):
        model.train()
        model(**b).loss.backward()
    assert abs(eager(**b).loss.item() - compiled(**b).loss.item()) <= 1e-5
    assert max((g - h).abs().max().item() for g, h in zip(_grads(eager), _grads(compiled))) <= 1e-6
    assert len(compiled.graphs._compiled) == 1  # the causal, headless variant: the one graph training ran
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for _ in range(2):  # train -> eval -> train -> eval: each mode compiled once, then reused
            compiled.eval()
            logits = compiled(**b).logits
            compiled.train()
            compiled(**b)
    assert (logits - eager.eval()(**b).logits).abs().max().item() <= 1e-5
    after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():
        compiled.eval()
        compiled(**b)
        compiled.train()
        compiled(**b)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == after_first > frames


def test_cli_train_compile(tmp_path):
    code, out = run("train", "--compile", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-blocks", "2",
                    "-o", tmp_path / "adapter")
    assert code == 0, out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
