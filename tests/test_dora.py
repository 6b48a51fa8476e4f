"""DoRA (``LoraConfig(use_dora=True)``) against real PEFT on the same base: logits, gradients and a loss curve
(<= 2e-5), PEFT's files both ways (``lora_magnitude_vector``), merges and the fold pass exact (<= 1e-5), the
refusals PEFT has (adapter_names with DoRA) and ours (embeddings, quantized bases, weighted merges). GPT-2 (Conv1D
sites), Llama (Linear) and BERT classification."""

from __future__ import annotations

import peft
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError
from surgeon.names import peft_keys
from tests.conftest import ARCHS, batch, loss_curve, make_base, seeded
from tests.test_fold import inputs
from tests.test_peft_parity import copy_peft_weights

NAMES = ["gpt2", "llama", "bert"]


def twins(name: str, **cfg):
    """A surgeon and a PEFT DoRA model of the same base with identical adapter weights (B nonzero, so the
    magnitude and the direction both matter)."""
    _, targets, task = ARCHS[name]
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, task_type=task, use_dora=True, init_lora_weights=False,
               **cfg)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make_base(name), peft.LoraConfig(**cfg))
    with torch.no_grad():  # a magnitude away from the weight's norm, as after training
        for n, p in theirs.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    ours = surgeon.get_peft_model(make_base(name), surgeon.LoraConfig(**cfg))
    copy_peft_weights(theirs, ours)
    return ours, theirs


def _grads(ours, theirs) -> tuple[dict, dict]:
    """Each trainable tensor's gradient under PEFT's file keys, for both models."""
    from peft.utils import get_peft_model_state_dict

    mine = {k: v.grad for k, v in ours.state_dict(keep_vars=True).items() if v.requires_grad}
    for layer in ours.adapter_state.lora_layers():  # A and B are rank-trimmed views in the state dict: their grads
        adapter = layer.adapters["default"]
        key_a, key_b = peft_keys(layer.path, layer.kind)
        mine[key_a], mine[key_b] = adapter.lora_A.grad, adapter.lora_B.grad
    params = dict(theirs.named_parameters())
    keyed = get_peft_model_state_dict(theirs, state_dict=params)
    return mine, {k: v.grad for k, v in keyed.items() if v.requires_grad}



@pytest.mark.parametrize("name", NAMES)
def test_dora_logits_and_gradients_equal_peft(name):
    ours, theirs = twins(name)
    for model in (ours, theirs):
        model.train()
    b = batch(name, b=3, s=10, seed=4, pad_left=2)
    inputs = {k: v for k, v in b.items() if k != "labels"}  # with labels ours trains on a fast path without logits
    assert (seeded(ours, **inputs).logits - seeded(theirs, **inputs).logits).abs().max() <= 1e-5
    got, want = seeded(ours, **b), seeded(theirs, **b)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5
    got.loss.backward()
    want.loss.backward()
    ours_g, theirs_g = _grads(ours, theirs)
    assert set(ours_g) == set(theirs_g) and any("lora_magnitude_vector" in k for k in ours_g)
    for key, grad in ours_g.items():
        assert (grad - theirs_g[key]).abs().max() <= 1e-5 * max(1.0, theirs_g[key].abs().max()), key


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_loss_curve_equals_peft_with_dropout(name):
    """10 AdamW steps with lora_dropout 0.1: PEFT's training path (x dropped out, the base result recomputed)."""
    ours, theirs = twins(name, lora_dropout=0.1)
    curves = [loss_curve(model, name, lr=1e-2) for model in (ours, theirs)]
    assert curves[0] == pytest.approx(curves[1], abs=2e-5), curves
    assert curves[0][-1] < curves[0][0]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_files_both_ways(name, tmp_path):
    from tests.conftest import files_both_ways

    loaded, back = files_both_ways(twins(name)[1], name, tmp_path, batch(name, seed=7))
    assert loaded.peft_config["default"].use_dora and back.peft_config["default"].use_dora


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_merge_and_fold_are_exact(name):
    ours, theirs = twins(name)
    ours.eval(), theirs.eval()
    b = inputs(name, seed=8)
    with torch.no_grad():
        want = ours(**b).logits
        folded = surgeon.fold(ours.graph_for(**b))
        assert (folded(**b).logits - want).abs().max() <= 1e-5
        assert (surgeon.unfold(folded)(**b).logits - want).abs().max() <= 1e-5
        ours.merge_adapter()
        assert (ours(**b).logits - want).abs().max() <= 1e-5
        ours.unmerge_adapter()
        assert (ours(**b).logits - want).abs().max() <= 1e-5
        peft_merged = theirs.merge_and_unload()(**b).logits
        merged = ours.merge_and_unload()(**b).logits
    assert (merged - want).abs().max() <= 1e-5 and (merged - peft_merged).abs().max() <= 1e-5


def test_a_dora_and_a_lora_adapter_side_by_side_and_switching(tmp_path):
    _, theirs = twins("llama")
    torch.manual_seed(1)
    theirs.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                                task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path)  # default (DoRA) in tmp_path, plain in tmp_path/plain
    ours = surgeon.PeftModel.from_pretrained(make_base("llama"), tmp_path).eval()
    ours.load_adapter(tmp_path / "plain", adapter_name="plain")
    theirs.eval()
    b = inputs("llama", seed=9)
    with torch.no_grad():
        for name in ("plain", "default", "plain"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            assert (ours(**b).logits - theirs(**b).logits).abs().max() <= 1e-5, name


def test_dora_refusals(tmp_path):
    with pytest.raises(AdapterError, match="embedding"):
        surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(target_modules=["embed_tokens"], use_dora=True))
    ours, _ = twins("llama")
    ours.eval()
    with pytest.raises(AdapterError, match="DoRA"):
        ours(**batch("llama", b=2), adapter_names=["default", "__base__"])
    ours.add_adapter("other", surgeon.LoraConfig(r=4, target_modules=ARCHS["llama"][1], use_dora=True))
    with pytest.raises(AdapterError, match="DoRA"):
        ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    plain = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(r=4, target_modules=ARCHS["llama"][1]))
    plain.save_pretrained(tmp_path / "plain")
    ours.save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterError, match="use_dora"):
        plain.load_adapter(tmp_path / "dora", "default", hotswap=True)
    with pytest.raises(surgeon.ConfigError, match="use_dora"):
        surgeon.LoraConfig(use_dora="yes")


# ---- ONNX: g = magnitude / ||W + scale * B @ A|| as a switchable input beside A and B -------------------------------
@pytest.fixture(scope="module")
def dora_exports(tmp_path_factory):
    """Per model: a DoRA adapter and a plain LoRA one saved by PEFT, loaded by surgeon, exported with the KV cache
    (switchable) and DoRA merged; the DoRA adapter with its magnitude altered, for the check to catch."""
    from surgeon.onnx.export import export_onnx

    out = {}
    for name in ("gpt2", "llama"):
        root = tmp_path_factory.mktemp(f"dora-{name}")
        _, theirs = twins(name)
        torch.manual_seed(2)
        theirs.add_adapter("plain", peft.LoraConfig(r=2, target_modules=ARCHS[name][1][:1], init_lora_weights=False,
                                                    task_type="CAUSAL_LM"))
        theirs.save_pretrained(root / "ad")
        ours = surgeon.PeftModel.from_pretrained(make_base(name), root / "ad").eval()
        ours.load_adapter(root / "ad" / "plain", adapter_name="plain")
        make_base(name).save_pretrained(root / "base")
        sources = {"default": str(root / "ad"), "plain": str(root / "ad" / "plain")}
        export_onnx(ours, root / "onnx", kv_cache=True, source=str(root / "base"), adapter_sources=sources)
        export_onnx(ours, root / "merged", ["default"], merged=True, kv_cache=True, source=str(root / "base"),
                    adapter_sources=sources)
        altered = surgeon.PeftModel.from_pretrained(make_base(name), root / "ad")
        with torch.no_grad():
            next(a for layer in altered.adapter_state.lora_layers() for a in layer.adapters.values()).magnitude.mul_(1.1)
        altered.save_pretrained(root / "altered")
        out[name] = (root, ours)
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dora_onnx_export_switches_and_equals_torch(dora_exports, name):
    from tests.conftest import assert_export_matches_torch

    root, ours = dora_exports[name]
    assert_export_matches_torch(root, ours, name, (None, "default", "plain", "default"), ".dora_scale")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_check_passes_on_a_dora_export_and_fails_on_an_altered_magnitude(dora_exports, name):
    from tests.conftest import assert_check_catches

    assert_check_catches(dora_exports[name][0])


def test_cli_trains_inspects_and_exports_dora_and_refuses_what_it_cannot(tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    trained = run_cli("train", "--dora", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "-o", tmp_path / "ad")
    assert trained.returncode == 0, trained.stderr
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert "dora=True" in run_cli("inspect", tmp_path / "ad").stdout
    bank = run_cli("export", "tiny-gpt2", tmp_path / "ad", "-o", tmp_path / "b", "--bank")
    assert bank.returncode == 0, bank.stderr  # a DoRA bank: g per slot (test_dora_bank_rows_equal_...)
    int4 = run_cli("export", "tiny-gpt2", tmp_path / "ad", "-o", tmp_path / "q", "--int4")
    assert int4.returncode == 2 and "--merged --int4" in int4.stderr
    merged = run_cli("export", "tiny-gpt2", tmp_path / "ad", "-o", tmp_path / "m", "--merged", "--int4")
    assert merged.returncode == 0, merged.stderr


def test_dora_hotswap_equals_a_fresh_load(tmp_path):
    first, _ = twins("llama")
    torch.manual_seed(3)
    second = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(
        r=4, lora_alpha=8, target_modules=ARCHS["llama"][1], use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for layer in second.adapter_state.lora_layers():
            layer.adapters["default"].magnitude.mul_(0.9)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    model = surgeon.PeftModel.from_pretrained(make_base("llama"), tmp_path / "first").eval()
    b = inputs("llama", seed=11)
    with torch.no_grad():
        model(**b)
        model.load_adapter(tmp_path / "second", adapter_name="default", hotswap=True)
        assert (model(**b).logits - second.eval()(**b).logits).abs().max() <= 1e-5


def test_genai_runs_the_dora_export_as_written(dora_exports, genai):
    """onnxruntime-genai (its own onnxruntime) feeds the .onnx_adapter files, g included: greedy tokens equal ours."""
    from tests.conftest import genai_equals_session

    want = genai_equals_session(genai, dora_exports["llama"][0] / "onnx", (None, "default", "plain"))
    assert want["default"] != want[None]


def test_dora_bank_rows_equal_each_adapter_alone(dora_exports, tmp_path):
    """A bank holding the DoRA adapter and a plain LoRA one (g ones in its slot): each row equals its adapter's own
    export run alone; `bank add` of a DoRA adapter is refused (its g needs the base weights)."""
    import numpy as np

    from surgeon.onnx.decoding import empty_past
    from surgeon.onnx.export import export_onnx
    from surgeon.onnx.runtime import AdapterSession
    from surgeon.workflows.checks import run_checks
    from tests.conftest import run_cli

    root, ours = dora_exports["gpt2"]
    bank = export_onnx(ours, tmp_path / "bank", ["default", "plain"], kv_cache=True, bank=True)
    ids = inputs("gpt2", b=3, s=7, seed=12)["input_ids"].numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(7), (3, 1)),
             **empty_past(AdapterSession(bank).generation, 3)}
    rows = ["plain", None, "default"]
    got = AdapterSession(bank).run(feeds, adapters=rows)["logits"]
    single = AdapterSession(root / "onnx")
    for i, name in enumerate(rows):
        want = single.run({k: v[i:i + 1] for k, v in feeds.items()}, adapter=name)["logits"]
        assert np.abs(got[i:i + 1] - want).max() <= 1e-4, name
    assert run_checks(bank).passed
    refused = run_cli("bank", "add", bank, root / "ad", "--name", "again")
    assert refused.returncode == 2 and "DoRA" in refused.stderr
