"""Prompt tuning (``PromptTuningConfig``) against real PEFT on the same base: logits, loss and the prompt's gradient
(<= 1e-5, with left padding), a 10-step loss curve, the parameter line, PEFT's files both ways
(``prompt_embeddings``), TEXT initialisation, greedy generation, and named refusals; the ONNX export with the
virtual tokens as a switchable input (ORT vs torch <= 1e-4, generation equal, check catches an altered prompt).
GPT-2 and Llama."""

from __future__ import annotations

import peft
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError, ConfigError
from tests.conftest import batch, loss_curve, make_base, seeded

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



@pytest.mark.parametrize("name", NAMES)
def test_prompt_tuning_logits_loss_and_gradient_equal_peft(name, capsys):
    ours, theirs = twins(name)
    ours.train(), theirs.train()
    b = batch(name, b=3, s=8, seed=4, pad_left=2)
    x = {k: v for k, v in b.items() if k != "labels"}
    got_logits = seeded(ours, **x).logits
    assert got_logits.shape[1] == 4 + 8  # the virtual positions are in the output, as in PEFT
    assert (got_logits - seeded(theirs, **x).logits).abs().max() <= 1e-5
    got, want = seeded(ours, **b), seeded(theirs, **b)
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
    curves = [loss_curve(model, name, lr=5e-2) for model in (ours, theirs)]
    assert curves[0] == pytest.approx(curves[1], abs=2e-5), curves
    assert curves[0][-1] < curves[0][0]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_tuning_files_both_ways(name, tmp_path):
    from tests.conftest import files_both_ways

    x = {k: v for k, v in batch(name, seed=7).items() if k != "labels"}
    loaded, back = files_both_ways(twins(name)[1], name, tmp_path, x)
    assert isinstance(loaded.peft_config["default"], surgeon.PromptTuningConfig)
    saved = back.peft_config["default"]
    assert (saved.num_virtual_tokens, saved.token_dim, saved.num_transformer_submodules) == (4, 32, 1)


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
    with pytest.raises(ConfigError, match="CAUSAL_LM"):
        surgeon.PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS")
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
    with pytest.raises(AdapterError, match="export switchable only"):
        surgeon.export_onnx(ours, tmp_path / "onnx", merged=True)
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
    export = run_cli("export", "tiny-gpt2", tmp_path / "ad", "-o", tmp_path / "m", "--merged")
    assert export.returncode == 2 and "switchable only" in export.stderr and not (tmp_path / "m").exists()


# ---- ONNX: the virtual tokens as a switchable input, fed on the prefill only -----------------------------------------
@pytest.fixture(scope="module")
def prompt_exports(tmp_path_factory):
    from surgeon.onnx.export import export_onnx

    out = {}
    for name in NAMES:
        root = tmp_path_factory.mktemp(f"prompt-{name}")
        ours, _ = twins(name)
        make_base(name).save_pretrained(root / "base")
        ours.save_pretrained(root / "ad")
        with torch.no_grad():
            ours.adapter_state.prompts().adapters["default"].mul_(1.2)
        ours.save_pretrained(root / "altered")
        ours = surgeon.PeftModel.from_pretrained(make_base(name), root / "ad").eval()
        export_onnx(ours, root / "onnx", kv_cache=True, source=str(root / "base"),
                    adapter_sources={"default": str(root / "ad")})
        out[name] = (root, ours)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_prompt_onnx_export_equals_torch_and_generates_its_tokens(prompt_exports, name):
    import json

    import numpy as np

    from surgeon.onnx.decoding import empty_past
    from surgeon.onnx.runtime import AdapterSession

    root, ours = prompt_exports[name]
    manifest = json.loads((root / "onnx" / "manifest.json").read_text())
    assert manifest["prompt"] == {"input": "prompt_embeddings", "tokens": {"default": 4}}
    assert manifest["genai"]["config"] is None and "prompt tuning" in manifest["genai"]["why"]
    session = AdapterSession(root / "onnx")
    for b, s in ((1, 5), (2, 9)):
        ids = batch(name, b=b, s=s, seed=b + s)["input_ids"]
        mask = np.ones((b, 4 + s), np.int64)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask, "position_ids": np.tile(np.arange(4 + s), (b, 1)),
                 **empty_past(session.generation, b)}
        got = session.run(feeds, adapter="default")["logits"]
        with torch.no_grad():
            want = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
        plain = {**feeds, "attention_mask": mask[:, 4:], "position_ids": feeds["position_ids"][:, :s]}
        with torch.no_grad(), ours.disable_adapter():
            base = ours(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
        assert np.abs(session.run(plain)["logits"] - base).max() <= 1e-4  # nothing fed: the base model
    x = batch(name, b=2, s=6, seed=2, pad_left=2)  # left padding: positions from the mask, as transformers'
    with torch.no_grad():
        want = ours.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=6,
                             do_sample=False)
    got = session.generate(x["input_ids"].numpy(), x["attention_mask"].numpy(), adapter="default", max_new_tokens=6,
                           eos_token_id=[])
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_check_passes_on_a_prompt_export_and_fails_on_an_altered_prompt(prompt_exports, name):
    from tests.conftest import run_cli

    root, _ = prompt_exports[name]
    ok = run_cli("check", root / "onnx")
    assert ok.returncode == 0 and "PASS  adapter[default]_decode_vs_torch" in ok.stdout, ok.stdout
    bad = run_cli("check", root / "onnx", "--adapter", f"default={root / 'altered'}")
    assert bad.returncode == 1 and "FAIL  adapter[default]_vs_torch" in bad.stdout, bad.stdout
