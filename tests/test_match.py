"""Matching: PEFT's semantics, strict errors that name what is wrong and suggest the fix."""

from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.errors import CaptureError, TargetNotFoundError, UnsupportedModuleError
from tests.conftest import make_base


@pytest.fixture(scope="module")
def gpt2_graph():
    return surgeon.capture(make_base("gpt2"))


@pytest.fixture(scope="module")
def llama_graph():
    return surgeon.capture(make_base("llama"))


def paths(found):
    return sorted(t.path for t in found.targets)


def test_suffix_list(gpt2_graph):
    found = surgeon.match(gpt2_graph, surgeon.LoraConfig(target_modules=["c_attn"]))
    assert paths(found) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert {t.kind for t in found.targets} == {"conv1d"}
    assert found.targets[0].in_features == 32 and found.targets[0].out_features == 96


def test_regex_is_fullmatch(llama_graph):
    found = surgeon.match(llama_graph, surgeon.LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"))
    assert paths(found) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(TargetNotFoundError, match="regex"):
        surgeon.match(llama_graph, surgeon.LoraConfig(target_modules="q_proj"))  # fullmatch, not search


def test_exclude_and_layers_to_transform(llama_graph):
    found = surgeon.match(llama_graph, surgeon.LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                                          exclude_modules=["model.layers.1.self_attn.v_proj"]))
    assert paths(found) == ["model.layers.1.self_attn.q_proj"]
    reasons = {s.path: s.reason for s in found.skipped}
    assert reasons["model.layers.1.self_attn.v_proj"] == "excluded by exclude_modules"
    assert "layers_to_transform" in reasons["model.layers.0.self_attn.q_proj"]


def test_all_linear_skips_output_layer(llama_graph):
    found = surgeon.match(llama_graph, surgeon.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in paths(found) and len(found.targets) == 14
    assert any(s.path == "lm_head" and "output layer" in s.reason for s in found.skipped)


def test_rank_and_alpha_patterns(llama_graph):
    config = surgeon.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                rank_pattern={"v_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 32}, use_rslora=True)
    found = {t.path: t for t in surgeon.match(llama_graph, config).targets}
    assert found["model.layers.0.self_attn.v_proj"].r == 2
    assert found["model.layers.0.self_attn.q_proj"].scale == pytest.approx(32 / 2)  # rslora: alpha / sqrt(r)
    assert found["model.layers.1.self_attn.q_proj"].scale == pytest.approx(8 / 2)


def test_embedding_target(gpt2_graph):
    found = surgeon.match(gpt2_graph, surgeon.LoraConfig(target_modules=["wte"]))
    assert [(t.path, t.kind, t.in_features, t.out_features) for t in found.targets] == [("transformer.wte", "embedding", 96, 32)]


def test_tutorial_misspelling_names_the_missing_and_the_nearest(gpt2_graph):
    # The GPT-2 tutorial users follow writes q_attn / v_attn: GPT-2 has c_attn.
    with pytest.raises(TargetNotFoundError) as err:
        surgeon.match(gpt2_graph, surgeon.LoraConfig(target_modules=["q_attn", "v_attn"]))
    message = str(err.value)
    assert "'q_attn'" in message and "'v_attn'" in message and "c_attn" in message
    assert isinstance(err.value, ValueError)


def test_one_of_several_misspelled_is_an_error(llama_graph):
    with pytest.raises(TargetNotFoundError, match=r"1 of 2 names.*'v_prj' \(nearest: v_proj"):
        surgeon.match(llama_graph, surgeon.LoraConfig(target_modules=["q_proj", "v_prj"]))


def test_unsupported_module_type_is_named(gpt2_graph):
    with pytest.raises(UnsupportedModuleError, match=r"GPT2Attention.*supported: torch.nn.Linear.*'c_attn'"):
        surgeon.match(gpt2_graph, surgeon.LoraConfig(target_modules=["attn"]))


def test_modules_to_save_must_exist(gpt2_graph):
    with pytest.raises(TargetNotFoundError, match="modules_to_save: 'wtee'.*wte"):
        surgeon.match(gpt2_graph, surgeon.LoraConfig(target_modules=["c_attn"], modules_to_save=["wtee"]))


def test_default_targets_by_model_type(gpt2_graph):
    assert all(p.endswith("c_attn") for p in paths(surgeon.match(gpt2_graph, surgeon.LoraConfig())))


def test_uncapturable_model_names_the_line():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask=None):
            x = self.proj(input_ids.float().unsqueeze(-1).expand(-1, -1, 4))
            if x.sum() > 0:  # data-dependent Python control flow
                return x
            return -x

    with pytest.raises(CaptureError, match=r"(?s)DataDependent.*test_match.py:\d+: if x.sum\(\) > 0"):
        surgeon.capture(DataDependent())


def test_inject_is_pure_and_verified(gpt2_graph):
    before = [n.format_node() for n in gpt2_graph.graph.nodes]
    injected = surgeon.inject_lora(gpt2_graph, surgeon.LoraConfig(target_modules=["c_attn", "wte"]))
    assert [n.format_node() for n in gpt2_graph.graph.nodes] == before
    branches = [n for n in injected.graph.nodes if n.op == "call_module" and str(n.target).startswith("surgeon_lora.")]
    assert len(branches) == 3 and len(injected.graph.nodes) == len(before) + 3
    assert injected.transformer.wte.weight is gpt2_graph.transformer.wte.weight  # shared, not copied
