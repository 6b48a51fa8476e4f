"""Adapter files in PEFT's format both ways, several adapters on one base, hotswap, bad input."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError, AdapterFileError, ConfigError
from tests.conftest import ARCHS, batch, make_base

CASES = {  # name -> extra config: classification keeps its head through modules_to_save
    "gpt2": dict(modules_to_save=["wpe"]),
    "llama": dict(rank_pattern={"down_proj": 2}),
    "bert": dict(),  # SEQ_CLS: the classifier head is saved automatically, as in PEFT
}


def inputs(name, **kw):
    return {k: v for k, v in batch(name, **kw).items() if k != "labels"}


def peft_config(name, **extra):
    _, targets, task = ARCHS[name]
    return dict(r=4, lora_alpha=8, target_modules=targets, task_type=task, init_lora_weights=False, **CASES[name], **extra)


@pytest.fixture(scope="module", params=list(CASES))
def peft_dir(request, tmp_path_factory):
    """An adapter directory written by real PEFT (random A and B), and PEFT's logits with it."""
    name = request.param
    torch.manual_seed(3)
    model = peft.get_peft_model(make_base(name), peft.LoraConfig(**peft_config(name)))
    with torch.no_grad():  # make the saved head copies differ from the base
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.01)
    out = tmp_path_factory.mktemp(f"peft-{name}")
    model.save_pretrained(str(out))
    model.eval()
    with torch.no_grad():
        logits = model(**inputs(name, b=3, s=11, pad_left=3)).logits
    return name, out, logits


def test_peft_file_loads_with_equal_logits(peft_dir):
    name, directory, expected = peft_dir
    ours = surgeon.PeftModel.from_pretrained(make_base(name), str(directory))
    with torch.no_grad():
        got = ours(**inputs(name, b=3, s=11, pad_left=3)).logits
    assert (got - expected).abs().max() <= 1e-5
    assert not any(p.requires_grad for p in ours.parameters())  # is_trainable=False


def test_our_file_loads_in_peft_with_equal_logits(peft_dir, tmp_path):
    name, directory, expected = peft_dir
    ours = surgeon.PeftModel.from_pretrained(make_base(name), str(directory))
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(make_base(name), str(tmp_path)).eval()
    with torch.no_grad():
        got = theirs(**inputs(name, b=3, s=11, pad_left=3)).logits
    assert (got - expected).abs().max() <= 1e-5


def test_save_load_save_is_byte_identical(peft_dir, tmp_path):
    name, directory, _ = peft_dir
    first = surgeon.PeftModel.from_pretrained(make_base(name), str(directory))
    first.save_pretrained(str(tmp_path / "a"))
    second = surgeon.PeftModel.from_pretrained(make_base(name), str(tmp_path / "a"))
    second.save_pretrained(str(tmp_path / "b"))
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == ARCHS[name][2]


def test_auto_peft_model_loads_base_from_config(tmp_path):
    base = make_base("bert")
    base.save_pretrained(tmp_path / "base")
    model = surgeon.get_peft_model(base, surgeon.LoraConfig(target_modules=["query"], task_type="SEQ_CLS",
                                                            base_model_name_or_path=str(tmp_path / "base")))
    model.save_pretrained(tmp_path / "adapter")
    loaded = surgeon.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
    assert type(loaded.get_base_model()).__name__ == "BertForSequenceClassification"
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs("bert")).logits, model(**inputs("bert")).logits)


# ---- several adapters ---------------------------------------------------------------------
@pytest.fixture()
def two_adapters():
    reference = make_base("llama").eval()
    model = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", surgeon.LoraConfig(r=2, target_modules=["v_proj", "down_proj"], init_lora_weights=False))
    return reference, model.eval()


def test_switch_disable_and_delete(two_adapters):
    reference, model = two_adapters
    x = inputs("llama")
    with torch.no_grad():
        base = reference(**x).logits
        a = model(**x).logits
        assert model.active_adapter == "default"
        model.set_adapter("b")
        b = model(**x).logits
        with model.disable_adapter():
            off = model(**x).logits
        model.delete_adapter("b")
        back = model(**x).logits
    assert not torch.allclose(a, b) and not torch.allclose(a, base)
    assert torch.equal(off, base)
    assert model.active_adapter == "default" and torch.equal(back, a)


def test_training_one_adapter_leaves_the_other(two_adapters):
    _, model = two_adapters
    before = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    model.set_adapter("b")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".b." in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**batch("llama")).loss.backward()
    opt.step()
    after = model.adapter_state_dict("default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_and_duplicate_adapter_names(two_adapters):
    _, model = two_adapters
    with pytest.raises(AdapterError, match="did you mean 'b'"):
        model.set_adapter("bb")
    with pytest.raises(AdapterError, match="exists already"):
        model.add_adapter("b", surgeon.LoraConfig(target_modules=["q_proj"]))


def test_new_signature_with_two_adapters_on_the_same_modules():
    model = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("b", surgeon.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    model.eval()
    x = inputs("llama")
    with torch.no_grad():
        with_mask = model(**x).logits
        without = model(input_ids=x["input_ids"]).logits  # replays both adapters onto a new capture
        model.set_adapter("b")
        b_without = model(input_ids=x["input_ids"]).logits
    assert torch.allclose(with_mask, without, atol=1e-6) and not torch.allclose(without, b_without)


def test_second_signature_shares_adapters(two_adapters):
    reference, model = two_adapters
    x = inputs("llama")
    with torch.no_grad():
        with_mask = model(**x).logits
        without = model(input_ids=x["input_ids"]).logits  # a new signature, captured on first use
    assert len(model.graphs) == 2 and torch.allclose(with_mask, without, atol=1e-6)


# ---- hotswap ------------------------------------------------------------------------------
def _write_adapter(tmp_path, tag, r, alpha, targets=("q_proj", "v_proj"), seed=0):
    torch.manual_seed(seed)
    m = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                                      init_lora_weights=False))
    m.save_pretrained(tmp_path / tag)
    m.eval()
    with torch.no_grad():
        return tmp_path / tag, m(**inputs("llama")).logits


def test_hotswap_under_compile_does_not_recompile(tmp_path):
    import torch._dynamo

    dir_a, logits_a = _write_adapter(tmp_path, "a", r=4, alpha=8, seed=1)
    dir_b, logits_b = _write_adapter(tmp_path, "b", r=2, alpha=16, seed=2)
    dir_c, logits_c = _write_adapter(tmp_path, "c", r=8, alpha=4, targets=("q_proj",), seed=3)
    model = surgeon.PeftModel.from_pretrained(make_base("llama"), str(dir_a))
    model.prepare_for_hotswap(target_rank=8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    x = inputs("llama")
    with torch.no_grad():
        assert (compiled(**x).logits - logits_a).abs().max() <= 1e-5
        with torch._dynamo.config.patch(error_on_recompile=True):
            model.load_adapter(str(dir_b), adapter_name="default", hotswap=True)
            assert (compiled(**x).logits - logits_b).abs().max() <= 1e-5
            model.load_adapter(str(dir_c), adapter_name="default", hotswap=True)  # fewer targets: v_proj zeroed
            assert (compiled(**x).logits - logits_c).abs().max() <= 1e-5


def test_hotswap_errors(tmp_path):
    dir_a, _ = _write_adapter(tmp_path, "a", r=2, alpha=8, targets=("q_proj",))
    dir_big, _ = _write_adapter(tmp_path, "big", r=8, alpha=8, targets=("q_proj",))
    dir_more, _ = _write_adapter(tmp_path, "more", r=2, alpha=8, targets=("q_proj", "k_proj"))
    model = surgeon.PeftModel.from_pretrained(make_base("llama"), str(dir_a))
    with pytest.raises(AdapterError, match=r"prepare_for_hotswap.*|capacity"):
        model.load_adapter(str(dir_big), hotswap=True)
    with pytest.raises(AdapterError, match="k_proj"):
        model.load_adapter(str(dir_more), hotswap=True)


# ---- bad input ----------------------------------------------------------------------------
@pytest.fixture()
def good_dir(tmp_path):
    m = surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(target_modules=["c_attn"]))
    m.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def _edit(src, dst, config=None, weights=None):
    shutil.copytree(src, dst)
    if config is not None:
        (dst / "adapter_config.json").write_text(config)
    if weights is not None:
        (dst / "adapter_model.safetensors").write_bytes(weights)
    return dst


def _unchanged_base_loads(directory, error, match):
    base = make_base("gpt2")
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(error, match=match):
        surgeon.PeftModel.from_pretrained(base, str(directory))
    assert [p.requires_grad for p in base.parameters()] == flags


def test_missing_directory_and_files(tmp_path, good_dir):
    _unchanged_base_loads(tmp_path / "nope", AdapterFileError, "no such adapter directory")
    d = _edit(good_dir, tmp_path / "noconfig")
    (d / "adapter_config.json").unlink()
    _unchanged_base_loads(d, AdapterFileError, "adapter_config.json: missing")
    d = _edit(good_dir, tmp_path / "bin")
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    _unchanged_base_loads(d, AdapterFileError, "pickle.*safe_serialization=True")


def test_bad_json_and_peft_type(tmp_path, good_dir):
    _unchanged_base_loads(_edit(good_dir, tmp_path / "j", config="{not json"), AdapterFileError, "not valid JSON")
    _unchanged_base_loads(_edit(good_dir, tmp_path / "t", config='{"r": 8}'), AdapterFileError, "peft_type")
    _unchanged_base_loads(_edit(good_dir, tmp_path / "p", config='{"peft_type": "PREFIX_TUNING"}'), ConfigError,
                          "LoRA, IA3 and prompt-tuning adapters")


def test_truncated_safetensors(tmp_path, good_dir):
    blob = (good_dir / "adapter_model.safetensors").read_bytes()
    _unchanged_base_loads(_edit(good_dir, tmp_path / "trunc", weights=blob[: len(blob) // 2]), AdapterFileError,
                          "truncated or corrupt")


def test_adapter_for_another_base_lists_every_mismatch(good_dir):
    base = make_base("gpt2")
    other = type(base)(type(base.config)(**{**base.config.to_dict(), "n_embd": 64}))
    with pytest.raises(AdapterError) as err:
        surgeon.PeftModel.from_pretrained(other, str(good_dir))
    message = str(err.value)
    assert "4 shape mismatches" in message and "h.0.attn.c_attn.lora_A" in message and "h.1.attn.c_attn.lora_A" in message


def test_unexpected_and_missing_keys_are_listed(tmp_path, good_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(good_dir / "adapter_model.safetensors")
    tensors["base_model.model.transformer.h.0.attn.c_proj.lora_A.weight"] = torch.zeros(8, 32)
    del tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    d = _edit(good_dir, tmp_path / "keys")
    save_file(tensors, d / "adapter_model.safetensors")
    _unchanged_base_loads(d, AdapterError, r"(?s)1 missing keys:.*h\.1\.attn\.c_attn\.lora_B.*1 unexpected keys:.*c_proj")


def test_two_adapters_each_with_modules_to_save():
    model = surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(target_modules=["c_attn"], modules_to_save=["wpe"]))
    model.add_adapter("b", surgeon.LoraConfig(target_modules=["c_fc"], modules_to_save=["wpe"]))
    state = model.adapter_state_dict("b")
    assert "base_model.model.transformer.wpe.weight" in state
    with torch.no_grad():
        state["base_model.model.transformer.wpe.weight"].add_(1.0)
    x = inputs("gpt2")
    model.eval()
    with torch.no_grad():
        a = model(**x).logits
        model.set_adapter("b")
        b = model(**x).logits
    assert not torch.allclose(a, b)  # each adapter reads its own copy
