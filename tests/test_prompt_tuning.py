"""Prompt tuning (``PromptTuningConfig``) against real PEFT on the same base: logits, loss and the prompt's gradient
(<= 1e-5, with left padding), a 10-step loss curve, the parameter line, PEFT's files both ways
(``prompt_embeddings``), TEXT initialisation, greedy generation, and named refusals. GPT-2 and Llama."""

from __future__ import annotations

import peft
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError, ConfigError
from tests.conftest import batch, make_base

NAMES = ["gpt2", "llama"]


def twins(name: str, n: int = 4, **cfg):
    """A surgeon and a PEFT prompt-tuned model of the same base with the same virtual tokens."""
    from peft.utils import get_peft_model_state_dict

    cfg = {"task_type": "CAUSAL_LM", "num_virtual_tokens": n, **cfg}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make_base(name), peft.PromptTuningConfig(**cfg))
    ours = surgeon.get_peft_model(make_base(name), surgeon.PromptTuningConfig(**cfg))
    ours.load_state_dict(get_peft_model_state_dict(theirs))
    return ours, theirs


def _seeded(model, **kw):
    torch.manual_seed(5)  # the base's own dropout (GPT-2's) draws the same masks in both tools
    return model(**kw)


@pytest.mark.parametrize("name", NAMES)
def test_prompt_tuning_logits_loss_and_gradient_equal_peft(name, capsys):
    ours, theirs = twins(name)
    ours.train(), theirs.train()
    b = batch(name, b=3, s=8, seed=4, pad_left=2)
    x = {k: v for k, v in b.items() if k != "labels"}
    got_logits = _seeded(ours, **x).logits
    assert got_logits.shape[1] == 4 + 8  # the virtual positions are in the output, as in PEFT
    assert (got_logits - _seeded(theirs, **x).logits).abs().max() <= 1e-5
    got, want = _seeded(ours, **b), _seeded(theirs, **b)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5
    got.loss.backward()
    want.loss.backward()
    mine = ours.adapter_state.prompts().adapters["default"].grad
    their = theirs.prompt_encoder["default"].embedding.weight.grad
    assert mine is not None and (mine - their).abs().max() <= 1e-5 * max(1.0, their.abs().max())
    with torch.no_grad(), ours.disable_adapter():
        base = make_base(name).eval()
        assert (ours.eval()(**x).logits - base(**x).logits).abs().max() <= 1e-5  # no prompt: the base model
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trainable params")]
    assert len(lines) == 2 and lines[0] == lines[1]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_tuning_loss_curve_equals_peft(name):
    ours, theirs = twins(name)
    curves = []
    for model in (ours, theirs):
        torch.manual_seed(0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        model.train()
        curve = []
        for step in range(10):
            loss = model(**batch(name, b=3, s=10, seed=step)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        curves.append(curve)
    assert curves[0] == pytest.approx(curves[1], abs=2e-5), curves
    assert curves[0][-1] < curves[0][0]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_tuning_files_both_ways(name, tmp_path):
    ours, theirs = twins(name)
    ours.eval(), theirs.eval()
    x = {k: v for k, v in batch(name, seed=7).items() if k != "labels"}
    with torch.no_grad():
        want = theirs(**x).logits
    theirs.save_pretrained(tmp_path / "peft")
    loaded = surgeon.PeftModel.from_pretrained(make_base(name), tmp_path / "peft").eval()
    assert isinstance(loaded.peft_config["default"], surgeon.PromptTuningConfig)
    with torch.no_grad():
        assert (loaded(**x).logits - want).abs().max() <= 1e-5
    loaded.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make_base(name), tmp_path / "ours").eval()
    saved = back.peft_config["default"]
    assert (saved.num_virtual_tokens, saved.token_dim, saved.num_transformer_submodules) == (4, 32, 1)
    with torch.no_grad():
        assert (back(**x).logits - want).abs().max() <= 1e-5


def test_text_initialisation_equals_peft():
    from surgeon.hub import load_model, model_dir

    cfg = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 7, "prompt_tuning_init": "TEXT",
           "prompt_tuning_init_text": "Classify the weather:", "tokenizer_name_or_path": str(model_dir("tiny-gpt2"))}
    theirs = peft.get_peft_model(load_model("tiny-gpt2"), peft.PromptTuningConfig(**cfg))
    ours = surgeon.get_peft_model(load_model("tiny-gpt2"), surgeon.PromptTuningConfig(**cfg))
    want = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(ours.adapter_state.prompts().adapters["default"], want)


@pytest.mark.parametrize("name", NAMES)
def test_prompt_tuning_generates_the_greedy_tokens_of_its_forward(name):
    """Greedy tokens equal a no-cache greedy loop over PEFT's own forward; GPT-2's also equal PEFT's generate.
    (Llama's PEFT 0.21 generate drifts from its own forward after a few tokens under transformers 5.24: we follow
    the forward.)"""
    ours, theirs = twins(name)
    ours.eval(), theirs.eval()
    ids = batch(name, b=2, s=6, seed=2)["input_ids"]
    with torch.no_grad():
        got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        seq = ids
        for _ in range(6):
            step = theirs(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, step], dim=1)
        assert got.tolist() == seq.tolist()
        if name == "gpt2":
            want = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False)
            assert got.tolist() == want.tolist()


def test_prompt_tuning_refusals(tmp_path):
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        surgeon.PromptTuningConfig(task_type="CAUSAL_LM")
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        surgeon.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ConfigError, match="RANDOM"):
        surgeon.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="RANDOMLY")
    ours, _ = twins("llama")
    x = batch("llama", b=2)
    with pytest.raises(AdapterError, match="position_ids"):
        ours(input_ids=x["input_ids"], position_ids=torch.arange(x["input_ids"].shape[1])[None])
    with pytest.raises(AdapterError, match="adapter_names"):
        ours.eval()(input_ids=x["input_ids"], adapter_names=["default", "__base__"])
    with pytest.raises(AdapterError, match="no weights to merge"):
        ours.merge_and_unload()
    with pytest.raises(AdapterError, match="one method per model"):
        ours.add_adapter("lora", surgeon.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="not supported yet"):
        surgeon.export_onnx(ours, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_cli_trains_and_inspects_prompt_tuning_and_refuses_lora_options(tmp_path):
    from tests.conftest import run_cli

    trained = run_cli("train", "--method", "prompt", "--virtual-tokens", "4", "--init-text", "Day 1, dawn.",
                      "--steps", "3", "--batch-size", "2", "--seq-len", "32", "-o", tmp_path / "ad")
    assert trained.returncode == 0, trained.stderr
    shown = run_cli("inspect", tmp_path / "ad").stdout
    assert "num_virtual_tokens=4" in shown and "init=TEXT" in shown
    loaded = surgeon.PeftModel.from_pretrained(surgeon.load_model("tiny-gpt2"), tmp_path / "ad")
    assert loaded.adapter_state.prompts().adapters["default"].shape == (4, 128)
    wrong = run_cli("inject", "tiny-gpt2", "--method", "prompt", "-r", "4", "--dry-run")
    assert wrong.returncode == 2 and "--rank: not an option of --method prompt" in wrong.stderr
    export = run_cli("export", "tiny-gpt2", tmp_path / "ad", "-o", tmp_path / "onnx")
    assert export.returncode == 2 and "not supported yet" in export.stderr and not (tmp_path / "onnx").exists()
