"""LoraConfig: frozen, validated at construction (all problems at once), PEFT JSON both ways."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
from hypothesis import given
from hypothesis import strategies as st

from surgeon import LoraConfig, TaskType
from surgeon.errors import ConfigError


def test_frozen_and_sequences_become_tuples():
    c = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save={"score", "classifier"})
    assert c.target_modules == ("q_proj", "v_proj") and c.modules_to_save == ("classifier", "score")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.r = 4  # type: ignore[misc]


@pytest.mark.parametrize("field,value,needle", [
    ("r", 0, "r=0"), ("r", -2, "positive integer"), ("lora_dropout", 1.0, "lora_dropout=1.0"),
    ("lora_dropout", -0.1, "[0, 1)"), ("bias", "lora", "did you mean 'lora_only'"),
    ("init_lora_weights", "pissa", "init_lora_weights"), ("lora_alpha", 0, "lora_alpha"),
    ("layers_to_transform", [-1], "layers_to_transform"), ("rank_pattern", {"q": 0}, "rank_pattern"),
])
def test_bad_fields_name_field_value_and_fix(field, value, needle):
    with pytest.raises(ConfigError, match=None) as err:
        LoraConfig(**{field: value})
    assert needle in str(err.value) and isinstance(err.value, ValueError)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        LoraConfig(r=0, lora_dropout=2.0, bias="x")
    assert str(err.value).count("\n  - ") == 3


def test_task_type_from_string_and_typo():
    assert LoraConfig(task_type="CAUSAL_LM").task_type is TaskType.CAUSAL_LM
    with pytest.raises(ConfigError, match="CAUSAL_LM"):
        LoraConfig(task_type="CAUSAL")


def test_peft_reads_our_json_and_we_read_peft_json(tmp_path):
    ours = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], task_type="CAUSAL_LM", rank_pattern={"c_attn": 2})
    (tmp_path / "adapter_config.json").write_text(ours.to_json())
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (theirs.r, theirs.lora_alpha, set(theirs.target_modules), theirs.rank_pattern) == (4, 16, {"c_attn"}, {"c_attn": 2})
    theirs.save_pretrained(str(tmp_path / "p"))
    back = LoraConfig.from_peft_dict(json.loads((tmp_path / "p" / "adapter_config.json").read_text()))
    assert back.replace(inference_mode=False) == ours


def test_unsupported_peft_features_are_errors():
    with pytest.raises(ConfigError, match="use_qalora=True"):
        LoraConfig.from_peft_dict({"peft_type": "LORA", "use_qalora": True})
    assert LoraConfig.from_peft_dict({"peft_type": "LORA", "use_dora": True}).use_dora  # DoRA is supported
    with pytest.raises(ConfigError, match="LoRA, IA3 and prompt-tuning adapters"):
        LoraConfig.from_peft_dict({"peft_type": "PREFIX_TUNING"})


def test_unknown_keys_are_named(recwarn):
    LoraConfig.from_peft_dict({"peft_type": "LORA", "brand_new_field": 1})
    assert "brand_new_field" in str(recwarn.pop(UserWarning).message)


@given(r=st.integers(1, 64), alpha=st.floats(0.5, 128), dropout=st.floats(0, 0.99),
       targets=st.lists(st.sampled_from(["q_proj", "v_proj", "c_attn", "fc1"]), min_size=1, unique=True),
       rslora=st.booleans(), bias=st.sampled_from(["none", "all", "lora_only"]))
def test_json_round_trip(r, alpha, dropout, targets, rslora, bias):
    c = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_rslora=rslora, bias=bias)
    assert LoraConfig.from_peft_dict(json.loads(c.to_json())) == c
