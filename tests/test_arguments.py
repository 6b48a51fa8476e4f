"""No argument is dropped: every public ``**kwargs`` is passed on or refused by name (STYLE.md, habit 9).

Also the guards that caught transformers 5.24's ``past_key_values`` -> ``cache`` rename: the decode-graph
forward refuses a cache under a name it does not read, and refuses a step whose mask says there was a
past that the cache it read does not hold. And our own calls raise no deprecation warning.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import transformers

import surgeon
from surgeon.compat import cache_name
from surgeon.errors import UnknownArgumentError
from surgeon.errors import GenerationError
from surgeon.model.generate import graph_forward
from tests.conftest import V, make_base


def lora(**kw):
    return surgeon.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "init_lora_weights": False, **kw})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny GPT-2 with an adapter, and that adapter saved."""
    root = tmp_path_factory.mktemp("args")
    model = surgeon.get_peft_model(make_base("gpt2"), lora()).eval()
    model.save_pretrained(root / "a")
    return model, root / "a"


def ids(b=2, s=5):
    return torch.randint(3, V, (b, s), generator=torch.Generator().manual_seed(0))


# Every public entry point that takes **kwargs, and a call of it with a misspelt keyword.
def _calls(model, adapter_dir):
    base = lambda: make_base("gpt2")  # noqa: E731
    return {
        "get_peft_model": lambda: surgeon.get_peft_model(base(), lora(), adaptor_name="x"),
        "SurgeonModel.save_pretrained": lambda: model.save_pretrained(adapter_dir.parent / "b", selected_adapter=["default"]),
        "SurgeonModel.load_adapter": lambda: model.load_adapter(adapter_dir, adapter_name="c", is_trainabel=True),
        "SurgeonModel.from_pretrained": lambda: surgeon.PeftModel.from_pretrained(base(), adapter_dir, adaptername="x"),
        "AutoPeftModel.from_pretrained": lambda: surgeon.AutoPeftModelForCausalLM.from_pretrained(adapter_dir, torch_dtype="auto"),
        "LoraConfig.replace": lambda: lora().replace(lora_alpah=3),
        "IA3Config.replace": lambda: surgeon.IA3Config().replace(feedforward_module=["c_proj"]),
        "PromptTuningConfig.replace": lambda: surgeon.PromptTuningConfig(num_virtual_tokens=2).replace(num_virtual=3),
        "SurgeonModel.forward": lambda: model(input_ids=ids(), attention_mak=torch.ones(2, 5)),
    }


MISSPELT = {"get_peft_model": ("adaptor_name", "adapter_name"),
            "SurgeonModel.save_pretrained": ("selected_adapter", "selected_adapters"),
            "SurgeonModel.load_adapter": ("is_trainabel", "is_trainable"),
            "SurgeonModel.from_pretrained": ("adaptername", "adapter_name"),
            "AutoPeftModel.from_pretrained": ("torch_dtype", None),
            "LoraConfig.replace": ("lora_alpah", "lora_alpha"),
            "IA3Config.replace": ("feedforward_module", "feedforward_modules"),
            "PromptTuningConfig.replace": ("num_virtual", "num_virtual_tokens"),
            "SurgeonModel.forward": ("attention_mak", "attention_mask")}

# Entry points with **kwargs that hand every keyword to something that checks it (tested below).
PASSED_ON = {"SurgeonModel.forward": "checked against the base's forward keywords (below)",
             "SurgeonModel.graph_for": "the same check as forward",
             "SurgeonModel.generate": "transformers' generate, which checks model kwargs against our forward"}


def public_var_keyword_callables():
    """Every public function or method of surgeon's API that has a ``**kwargs`` parameter."""
    found = set()
    for name in surgeon.__all__:
        obj = getattr(surgeon, name)
        members = [(name, obj)] if inspect.isfunction(obj) else []
        if inspect.isclass(obj):
            members = [(f"{name}.{m}", f) for m, f in inspect.getmembers(obj, callable)
                       if not m.startswith("_") and (getattr(f, "__module__", None) or "").startswith("surgeon")]
        for label, fn in members:
            try:
                params = inspect.signature(fn).parameters.values()
            except (TypeError, ValueError):
                continue
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                found.add(label.replace("PeftModel.", "SurgeonModel.", 1) if label.startswith("PeftModel.") else label)
    return found


def test_every_public_kwargs_entry_point_is_checked_here():
    found = public_var_keyword_callables()
    known = set(MISSPELT) | set(PASSED_ON)
    known |= {"AutoPeftModelForCausalLM.from_pretrained", "AutoPeftModelForSequenceClassification.from_pretrained"}
    assert found - known == set(), f"new **kwargs entry points need a case in this file: {sorted(found - known)}"
    assert {"get_peft_model", "SurgeonModel.save_pretrained", "SurgeonModel.load_adapter"} <= found


@pytest.mark.parametrize("entry", list(MISSPELT))
def test_unknown_keyword_is_refused_by_name_with_the_nearest(saved, entry):
    model, adapter_dir = saved
    wrong, right = MISSPELT[entry]
    with pytest.raises(UnknownArgumentError) as err:
        _calls(model, adapter_dir)[entry]()
    assert repr(wrong) in str(err.value)
    if right:
        assert f"did you mean {right!r}" in str(err.value)
    assert isinstance(err.value, TypeError)
    assert "c" not in model.peft_config  # nothing was half done
    assert not (adapter_dir.parent / "b").exists()


def test_peft_arguments_at_values_we_cannot_honour_are_refused(saved, tmp_path):
    model, adapter_dir = saved
    cases = [
        (lambda: surgeon.get_peft_model(make_base("gpt2"), lora(), mixed=True), "mixed=True"),
        (lambda: surgeon.get_peft_model(make_base("gpt2"), lora(), revision="main"), "revision='main'"),
        (lambda: model.save_pretrained(tmp_path / "x", safe_serialization=False), "safe_serialization=False"),
        (lambda: model.load_adapter(adapter_dir, adapter_name="d", low_cpu_mem_usage=True), "low_cpu_mem_usage=True"),
        (lambda: model.load_state_dict(model.state_dict(), assign=True), "assign=True"),
        (lambda: model(input_ids=ids(), bogus_flag=1), "bogus_flag"),
    ]
    for call, needle in cases:
        with pytest.raises(UnknownArgumentError) as err:
            call()
        assert needle in str(err.value), needle
    assert not (tmp_path / "x").exists()


def test_peft_arguments_we_honour(saved, tmp_path):
    model, adapter_dir = saved
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()  # PEFT's meaning: only the main process writes
    model.save_pretrained(tmp_path / "main", is_main_process=True, safe_serialization=True)
    assert (tmp_path / "main" / "adapter_model.safetensors").exists()
    state = model.state_dict(prefix="module.")  # what a wrapper (DDP) asks for
    assert state and all(k.startswith("module.base_model.model.") for k in state)
    into: dict = {}
    assert model.state_dict(destination=into) is into and into
    tuple_out = model(input_ids=ids(), return_dict=False)
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], model(input_ids=ids()).logits)
    config = lora(lora_alpha=8)
    other = surgeon.PeftModel.from_pretrained(make_base("gpt2"), adapter_dir, config=config)
    assert other.peft_config["default"].lora_alpha == 8  # config= replaces the file's, as in PEFT


def test_generate_refuses_unknown_model_kwargs(saved):
    model, _ = saved
    with pytest.raises(ValueError, match="bogus_kw"):  # transformers' own check, reached with our forward in place
        model.generate(input_ids=ids(), max_new_tokens=2, do_sample=False, pad_token_id=0, bogus_kw=1)


def test_decode_forward_refuses_a_cache_it_would_not_read(saved):
    model, _ = saved
    graph, layout = model.decoder_graph()
    forward = graph_forward(model, graph, layout)
    other = "past_key_values" if cache_name(model.base) == "cache" else "cache"
    x = ids(1, 3)
    with pytest.raises(UnknownArgumentError, match=other):
        forward(input_ids=x, **{other: transformers.DynamicCache()})
    with pytest.raises(GenerationError, match="output_attentions=True"):
        forward(input_ids=x, output_attentions=True)
    # a decode step whose mask says 3 positions came before, with a cache that holds none
    with pytest.raises(GenerationError, match="cache"):
        forward(input_ids=x[:, :1], attention_mask=torch.ones(1, 4, dtype=torch.long))
    out = forward(input_ids=x, attention_mask=torch.ones(1, 3, dtype=torch.long), use_cache=True, return_dict=True)
    assert out.logits.shape == (1, 3, V)


def test_our_calls_raise_no_deprecation_warning():
    """Capture, the decode graph and generate use transformers' current names (no FutureWarning, no logged notice)."""
    from transformers.utils import logging as hf_logging

    records = []

    class Keep(hf_logging.logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    hf_logging.warning_once.cache_clear()
    root = hf_logging.get_logger("transformers")
    handler, level = Keep(), root.level
    root.addHandler(handler)
    root.setLevel(hf_logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = surgeon.get_peft_model(make_base("gpt2", seed=5), lora()).eval()
            with torch.no_grad():
                model(input_ids=ids())
                model.generate(input_ids=ids(), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=3,
                               do_sample=False, pad_token_id=0)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    deprecations = [f"{w.filename}: {w.message}" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "deprecat" in str(w.message).lower()
                    and any(part in (w.filename or "") for part in ("/transformers/", "/surgeon/", "/peft/"))]
    deprecations += [m for m in records if "deprecat" in m.lower()]
    assert deprecations == []
