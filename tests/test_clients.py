"""Our KV-cache exports opened as written by the clients people deploy with, each in its own venv
(tools/clients.py), driven in a subprocess: onnxruntime-genai 0.18 (with Multi-LoRA through ``og.Adapters``) and
optimum's ``ORTModelForCausalLM`` (transformers 4.57).

Greedy tokens must equal ``AdapterSession.generate`` on the same export, token for token, up to the first
end-of-sequence token (genai stops there; surgeon pads after it): the base, each adapter, a padded batch of prompts
of different lengths, the merged export. ``surgeon check`` reads ``genai_config.json`` back against the graph and
fails on a config that no longer fits it.
"""

from __future__ import annotations

import json

import pytest
import torch

import surgeon
from surgeon.names import GENAI_CONFIG
from surgeon.onnx.export import export_onnx
from surgeon.onnx.runtime import AdapterSession
from surgeon.workflows.checks import run_checks
from tests.conftest import ROOT, V, client_python, make_base, run_cli, run_client, session_new_tokens, until_eos

TARGETS = {"gpt2": (["c_attn"], ["c_fc", "c_proj"]), "llama": (["q_proj", "v_proj"], ["k_proj", "down_proj"])}
PROMPTS = [[5, 17, 40, 33, 8, 61, 12], [70, 9], [44, 3, 90, 21]]  # one batch: genai pads it, surgeon left-pads it


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """``exports(name)``: (switchable export with adapters 'first' and 'second', merged export of 'second')."""
    built = {}

    def get(name):
        if name not in built:
            root = tmp_path_factory.mktemp(f"clients-{name}")
            torch.manual_seed(0)
            first, second = TARGETS[name]
            model = surgeon.get_peft_model(make_base(name), surgeon.LoraConfig(r=4, lora_alpha=16, target_modules=first,
                                                                               init_lora_weights=False), adapter_name="first")
            model.add_adapter("second", surgeon.LoraConfig(r=2, lora_alpha=8, target_modules=second, init_lora_weights=False))
            with torch.no_grad():  # adapters strong enough that each one changes the greedy tokens
                for p in model.parameters():
                    if p.requires_grad:
                        p.mul_(4)
            switchable = export_onnx(model.eval(), root / "switchable", kv_cache=True)
            merged = export_onnx(model, root / "merged", ["second"], merged=True, kv_cache=True)
            built[name] = switchable, merged
        return built[name]

    return get


def eos_of(export) -> set[int]:
    return set(json.loads((export / "manifest.json").read_text())["generation"]["eos_token_id"])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_genai_greedy_equals_adapter_session_for_the_base_and_each_adapter(exports, genai, name):
    switchable, _ = exports(name)
    session, eos = AdapterSession(switchable), eos_of(switchable)
    pad = session.generation["pad_token_id"]
    pad = pad if pad is not None else min(eos)
    got = genai(switchable, PROMPTS, adapters=(None, "first", "second"), n=10)
    outputs = {}
    for adapter in (None, "first", "second"):
        want = session_new_tokens(session, PROMPTS, adapter, 10, pad)
        assert until_eos(got[adapter], eos) == until_eos(want, eos), adapter
        outputs[adapter] = until_eos(want, eos)
    assert outputs[None] != outputs["first"] != outputs["second"]  # the switch is real: each adapter changes tokens
    alone = genai(switchable, PROMPTS[1:2], adapters=("first",), n=10)  # one row, no padding: the same tokens
    assert until_eos(alone["first"], eos) == outputs["first"][1:2]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_genai_runs_the_merged_export_like_the_switchable_one(exports, genai, name):
    switchable, merged = exports(name)
    eos = eos_of(merged)
    got = genai(merged, PROMPTS, adapters=(None,), n=10)[None]
    want = genai(switchable, PROMPTS, adapters=("second",), n=10)["second"]
    assert until_eos(got, eos) == until_eos(want, eos)
    pad = AdapterSession(merged).generation["pad_token_id"]
    ours = session_new_tokens(AdapterSession(merged), PROMPTS, None, 10, pad if pad is not None else min(eos))
    assert until_eos(got, eos) == until_eos(ours, eos)


def test_genai_config_is_derived_from_the_graph_and_check_reads_it_back(exports, tmp_path):
    switchable, _ = exports("llama")
    config = json.loads((switchable / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"],
            decoder["num_attention_heads"], decoder["hidden_size"]) == (2, 2, 8, 4, 32)  # grouped-query cache
    assert config["model"]["vocab_size"] == V and config["model"]["eos_token_id"] == 1
    assert config["search"]["past_present_share_buffer"] is False
    report = run_checks(switchable)
    assert next(c for c in report.checks if c.name == "genai_config").passed, report.text()

    import shutil
    for field, value, named in (("head_size", 16, "head_size is 16; the graph's cache has 8"),
                                ("num_hidden_layers", 3, "num_hidden_layers is 3; the graph has 2"),
                                ("filename", "decoder.onnx", "filename is 'decoder.onnx'")):
        broken = tmp_path / field
        shutil.copytree(switchable, broken)
        altered = json.loads((broken / GENAI_CONFIG).read_text())
        altered["model"]["decoder"][field] = value
        (broken / GENAI_CONFIG).write_text(json.dumps(altered))
        code, out, _ = run_cli("check", broken, "--json", tmp_path / f"{field}.json")
        assert code == 1, out
        checks = {c["name"]: c for c in json.loads((tmp_path / f"{field}.json").read_text())["checks"]}
        assert checks["genai_config"]["passed"] is False and named in checks["genai_config"]["detail"], checks
    broken = tmp_path / "pad"
    shutil.copytree(switchable, broken)
    altered = json.loads((broken / GENAI_CONFIG).read_text())
    altered["model"]["pad_token_id"] = V
    (broken / GENAI_CONFIG).write_text(json.dumps(altered))
    report = run_checks(broken)
    check = next(c for c in report.checks if c.name == "genai_config")
    assert not check.passed and f"pad_token_id {V} is not a token id below model.vocab_size {V}" in check.detail


def test_no_genai_config_for_token_ids_outside_the_vocabulary(exports):
    """genai refuses an end-of-sequence id >= vocab_size (GPT2Config's 50256 with a small vocabulary): the export
    then writes no config and says why, rather than one genai cannot open."""
    import onnx

    from surgeon.onnx.genai import GenaiUnsupported, genai_config
    from surgeon.onnx.manifest import read_manifest

    switchable, _ = exports("gpt2")
    facts = read_manifest(switchable)["generation"]
    proto = onnx.load(switchable / "model.onnx", load_external_data=False)
    assert genai_config(proto, facts, "model.onnx")["model"]["eos_token_id"] in range(V)
    with pytest.raises(GenaiUnsupported, match=f"eos_token_id 50256 is outside the vocabulary of {V} tokens"):
        genai_config(proto, {**facts, "eos_token_id": [50256]}, "model.onnx")


def test_genai_example_refuses_unknown_adapters_and_exports_without_a_config(exports, tmp_path):
    switchable, _ = exports("gpt2")
    python = client_python("genai")
    example = ROOT / "examples" / "genai_generate.py"
    import subprocess
    done = subprocess.run([python, example, switchable, "--adapter", "frist", "--json", "--prompt-ids", "[[5, 6]]"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "no adapter named 'frist'" in done.stderr and "first" in done.stderr
    done = subprocess.run([python, example, tmp_path], capture_output=True, text=True)
    assert done.returncode == 2 and "no genai_config.json" in done.stderr


@pytest.fixture(scope="module")
def demo_exports(tmp_path_factory):
    """The built-in tiny GPT-2 with a trained adapter, exported switchable and merged (tokenizer files included)."""
    root = tmp_path_factory.mktemp("clients-demo")
    code, out, err = run_cli("train", "--steps", "20", "--eval-blocks", "1", "-o", root / "demo-adapter")
    assert code == 0, out + err
    for flag, where in (("", "demo-onnx"), ("--merged", "demo-merged")):
        code, out, err = run_cli("export", "tiny-gpt2", root / "demo-adapter", "-o", root / where, "--kv-cache",
                                 *([flag] if flag else []))
        assert code == 0, out + err
    return root


def test_genai_and_transformers_tokenizers_read_our_tokenizer_files(demo_exports):
    import transformers

    text = "Day 12, noon. Wind east, moderate swell."
    want = transformers.AutoTokenizer.from_pretrained(demo_exports / "demo-onnx")(text)["input_ids"]
    script = ("import sys, onnxruntime_genai as og; m = og.Model(sys.argv[1]); "
              "print([int(t) for t in og.Tokenizer(m).encode(sys.argv[2])])")
    done = run_client(client_python("genai"), "-c", script, demo_exports / "demo-onnx", text)
    assert json.loads(done.stdout) == want
    script = ("import sys, json, transformers; t = transformers.AutoTokenizer.from_pretrained(sys.argv[1]); "
              "print(json.dumps([transformers.__version__, t(sys.argv[2]).input_ids, sorted(t(sys.argv[2]))]))")
    version, ids, keys = json.loads(run_client(client_python("optimum"), "-c", script, demo_exports / "demo-onnx",
                                               text).stdout)
    assert version.startswith("4.") and ids == want
    assert keys == ["attention_mask", "input_ids"]  # no token_type_ids, which a decoder's generate refuses


def test_optimum_generates_the_merged_export_like_adapter_session(demo_exports):
    merged = demo_exports / "demo-merged"
    script = ("import sys, json; from optimum.onnxruntime import ORTModelForCausalLM; "
              "m = ORTModelForCausalLM.from_pretrained(sys.argv[1]); import torch; "
              "ids = torch.tensor(json.loads(sys.argv[2])); "
              "print(json.dumps(m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, "
              "do_sample=False).tolist()))")
    prompt = [[36, 393, 999, 18, 12, 556, 263, 14, 658, 560]]
    got = json.loads(run_client(client_python("optimum"), "-c", script, merged, json.dumps(prompt)).stdout)
    session = AdapterSession(merged)
    want = session.generate(prompt, max_new_tokens=12).tolist()
    eos = set(session.generation["eos_token_id"])
    assert until_eos([got[0][10:]], eos) == until_eos([want[0][10:]], eos)
