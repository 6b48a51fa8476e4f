"""Generation: ``SurgeonModel.generate`` on the decode graph, the KV-cache ONNX decoder, ``AdapterSession.generate``.

Parity is token for token against PEFT + transformers ``generate`` with the same adapter files
(greedy, and sampling with the same torch seed), with left-padded batches, on five decoder
architectures. Logits of prefill and of a decode step: ONNX Runtime vs torch <= 1e-4 (fp32),
through ``surgeon check``.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
from click.testing import CliRunner

import surgeon
from surgeon.workflows.checks import run_checks
from surgeon.cli import main
from surgeon.errors import AdapterError, AdapterFileError
from surgeon.errors import GenerationError
from surgeon.onnx.export import export_onnx
from surgeon.onnx.runtime import AdapterSession, pick_tokens
from tests.conftest import ARCHS, V, make_base

DECODERS = [name for name, spec in ARCHS.items() if spec[2] == "CAUSAL_LM"]
SECOND = {"gpt2": ["c_fc"], "llama": ["k_proj", "up_proj"], "qwen2": ["v_proj"], "opt": ["out_proj"], "phi3": ["o_proj"]}
PAD = 0


def prompts(b: int = 3, s: int = 7, seed: int = 0):
    """A left-padded batch: row 0 has 3 pads, row 1 has 1, the rest none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    for row, pads in enumerate((3, 1)[:b]):
        mask[row, :pads] = 0
        ids[row, :pads] = PAD
    return ids, mask


@pytest.fixture(scope="session")
def pairs(tmp_path_factory):
    """``pairs(name)``: (name, PEFT model, surgeon model, kv export dir), built once per architecture."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_pair(name, tmp_path_factory)
        return built[name]

    return get


def build_pair(name, tmp_path_factory):
    """The same two adapters (nonzero B) in PEFT and in surgeon, and surgeon's KV-cache export of them."""
    _, targets, _ = ARCHS[name]
    root = tmp_path_factory.mktemp(f"gen-{name}")
    torch.manual_seed(0)
    ref = peft.get_peft_model(make_base(name), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               init_lora_weights=False))
    ref.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=SECOND[name], init_lora_weights=False))
    ref.save_pretrained(root / "adapters")  # default in adapters/, second in adapters/second/
    ref.eval()
    ours = surgeon.PeftModel.from_pretrained(make_base(name), root / "adapters").eval()
    ours.load_adapter(root / "adapters" / "second", adapter_name="second")
    out = export_onnx(ours, root / "onnx", kv_cache=True, source=None,
                      adapter_sources={"default": root / "adapters", "second": root / "adapters" / "second"})
    return name, ref, ours, out


def greedy(model, ids, mask, n=8, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD, **kw)


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_equals_peft_token_for_token(pairs, name):
    _, ref, ours, _ = pairs(name)
    ids, mask = prompts()
    for adapter in ("default", "second"):
        ref.set_adapter(adapter)
        ours.set_adapter(adapter)
        want = greedy(ref, ids, mask)
        assert torch.equal(greedy(ours, ids, mask), want), adapter
    for length in (1, 2):  # prompts shorter than any size torch.export saw
        short = ids[2:, :length]
        assert torch.equal(greedy(ours, short, torch.ones_like(short)), greedy(ref, short, torch.ones_like(short)))
    ours.set_adapter("default")
    ref.set_adapter("default")
    with ours.disable_adapter(), ref.disable_adapter():
        assert torch.equal(greedy(ours, ids, mask), greedy(ref, ids, mask))


@pytest.mark.parametrize("name", DECODERS)
def test_generate_runs_on_the_decode_graph_and_restores_the_model(pairs, name):
    _, _, ours, _ = pairs(name)
    from surgeon.capturing import DECODE_KEY

    ids, mask = prompts(b=1, s=5)
    greedy(ours, ids, mask, n=3)
    assert DECODE_KEY in ours.graphs
    assert "forward" not in vars(ours.base)  # the base's own forward is back
    graph, layout = ours.decoder_graph()
    lora_calls = [n for n in graph.graph.nodes if n.op == "call_module" and n.target.startswith("surgeon_lora")]
    assert len(lora_calls) == len({t for t in ours.adapter_state.registry() if t.startswith("surgeon_lora")})
    assert layout.layers == 2


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # sampling is transformers' own processors: two are enough
def test_sampling_and_generation_arguments_match_peft(pairs, name):
    _, ref, ours, _ = pairs(name)
    ids, mask = prompts(b=2, s=6, seed=3)
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, no_repeat_ngram_size=2, num_return_sequences=2,
              max_length=14, pad_token_id=PAD)
    outs = []
    for model in (ref, ours):
        torch.manual_seed(11)
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, **kw))
    assert outs[0].shape == (4, 14)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", DECODERS)
def test_kv_export_names_and_dims(pairs, name):
    name, _, ours, out = pairs(name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kv_cache"] is True
    inputs = {v["name"]: v["shape"] for v in manifest["inputs"]}
    outputs = {v["name"]: v["shape"] for v in manifest["outputs"]}
    layers = manifest["generation"]["layers"]
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["input_ids"] == ["batch", "sequence"] and inputs["attention_mask"] == ["batch", "total_sequence"]
    for i in range(layers):
        for kv in ("key", "value"):
            past, present = inputs[f"past_key_values.{i}.{kv}"], outputs[f"present.{i}.{kv}"]
            assert past[0] == "batch" and past[2] == "past_sequence"
            assert present[0] == "batch" and present[2] == "total_sequence"
    assert outputs["logits"] == ["batch", "sequence", V]
    session = AdapterSession(out)
    assert sorted(session.adapters) == ["default", "second"]
    assert {i["a"] for i in manifest["lora_inputs"]} <= set(session.lora_inputs)


@pytest.mark.parametrize("name", DECODERS)
def test_onnx_prefill_and_decode_logits_equal_torch(pairs, name):
    name, _, _, out = pairs(name)
    # `surgeon check`: the reference is the same seeded base + the PEFT-written adapter directories recorded at export
    base_dir = out.parent / "base"
    make_base(name).save_pretrained(base_dir)
    report = run_checks(out, reference=str(base_dir), atol=1e-4)
    labels = {c.name for c in report.checks}
    assert {"base_decode_vs_torch", "adapter[default]_decode_vs_torch", "adapter[second]_decode_vs_torch"} <= labels
    assert report.passed, report.text()


@pytest.mark.parametrize("name", DECODERS)
def test_onnx_runtime_greedy_equals_peft(pairs, name):
    _, ref, _, out = pairs(name)
    session = AdapterSession(out)
    ids, mask = prompts()
    for adapter in ("default", "second", None):
        if adapter is None:
            with ref.disable_adapter():
                want = greedy(ref, ids, mask)
        else:
            ref.set_adapter(adapter)
            want = greedy(ref, ids, mask)
        got = session.generate(ids.numpy(), mask.numpy(), adapter=adapter, max_new_tokens=8, pad_token_id=PAD)
        np.testing.assert_array_equal(got, want.numpy(), err_msg=str(adapter))
    one = ids[2:, :1]  # `ref` is on "second" (set in the loop)
    np.testing.assert_array_equal(session.generate(one.numpy(), adapter="second", max_new_tokens=4, pad_token_id=PAD),
                                  greedy(ref, one, torch.ones_like(one), n=4).numpy())
    ref.set_adapter("default")


def test_onnx_runtime_sampling_is_seeded(pairs):
    session = AdapterSession(pairs("gpt2")[3])
    ids, mask = prompts(b=2, s=5)
    run = lambda **kw: session.generate(ids.numpy(), mask.numpy(), adapter="default", max_new_tokens=10,  # noqa: E731
                                        do_sample=True, pad_token_id=PAD, **kw)
    a, b = run(seed=1, temperature=1.5), run(seed=1, temperature=1.5)
    np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, run(seed=s, temperature=1.5)) for s in range(2, 6))
    greedy_out = session.generate(ids.numpy(), mask.numpy(), adapter="default", max_new_tokens=10, pad_token_id=PAD)
    np.testing.assert_array_equal(run(seed=3, top_k=1), greedy_out)


def test_pick_tokens_filters_like_transformers():
    import transformers

    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    rng = np.random.default_rng(0)
    seen = {tuple(pick_tokens(logits, rng, True, 0.8, 5, 1.0)) for _ in range(50)}
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert all(tok in top5[row] for picks in seen for row, tok in enumerate(picks))
    # top-p keeps exactly the tokens transformers' TopPLogitsWarper keeps
    warper = transformers.TopPLogitsWarper(top_p=0.6)
    kept = torch.isfinite(warper(None, torch.from_numpy(logits))).numpy()
    picks = np.array([pick_tokens(logits, rng, True, 1.0, 0, 0.6) for _ in range(300)])
    for row in range(4):
        assert set(picks[:, row]) <= set(np.flatnonzero(kept[row]))


def test_bad_generation_input(pairs, tmp_path):
    _, _, ours, out = pairs("gpt2")
    session = AdapterSession(out)
    ids = np.full((1, 60), 5, np.int64)  # the tiny models have 64 positions
    with pytest.raises(AdapterError, match=r"60 tokens \+ max_new_tokens 10 exceeds .* context of 64.*at most 54"):
        session.generate(ids, max_new_tokens=10)
    with pytest.raises(GenerationError, match=r"60 tokens \+ 10 new tokens exceeds .* 64 positions"):
        ours.generate(input_ids=torch.from_numpy(ids), max_new_tokens=10)
    with pytest.raises(AdapterError, match="did you mean 'second'"):
        session.generate(ids[:, :4], adapter="secnod", max_new_tokens=2)
    plain = export_onnx(ours, tmp_path / "plain", adapters=["default"])
    with pytest.raises(AdapterFileError, match="without a KV cache.*--kv-cache"):
        AdapterSession(plain).generate(ids[:, :4])
    with pytest.raises(GenerationError, match="cache_implementation"):
        ours.generate(input_ids=torch.from_numpy(ids[:, :4]), max_new_tokens=2, cache_implementation="static")


def test_generate_on_a_classifier_says_what_works():
    model = surgeon.get_peft_model(make_base("bert"), surgeon.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    with pytest.raises(GenerationError, match="ForCausalLM"):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long))


# ---- command line on the embedded model ---------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-gen")
    base = surgeon.load_model("tiny-gpt2")
    torch.manual_seed(0)
    model = surgeon.get_peft_model(base, surgeon.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False,
                                                            lora_alpha=64))
    model.save_pretrained(root / "shiplog")
    result = CliRunner().invoke(main, ["export", "tiny-gpt2", str(root / "shiplog"), "-o", str(root / "onnx"), "--kv-cache"])
    assert result.exit_code == 0, result.output
    return root


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_generate_onnx_and_torch_agree(tiny_export):
    code, out = cli("generate", tiny_export / "onnx", "--base", "-a", "shiplog", "-p", "The wind", "-n", "12")
    assert code == 0, out
    assert out.count("--- ") == 2 and "--- base (no adapter) ---" in out and "--- shiplog ---" in out
    onnx_adapter = out.split("--- shiplog ---\n")[1].strip()
    onnx_base = out.split("--- base (no adapter) ---\n")[1].split("--- shiplog")[0].strip()
    assert onnx_adapter.startswith("The wind") and onnx_adapter != onnx_base
    code, torch_out = cli("generate", "tiny-gpt2", "-a", tiny_export / "shiplog", "-p", "The wind", "-n", "12")
    assert code == 0, torch_out
    assert torch_out.strip() == onnx_adapter  # the same greedy text from torch and from ONNX Runtime
    code, torch_base = cli("generate", "tiny-gpt2", "-p", "The wind", "-n", "12")
    assert torch_base.strip() == onnx_base


@pytest.mark.parametrize("args, needle", [
    (["-a", "shiplgo"], "did you mean 'shiplog'"),
    (["-n", "300"], "exceeds the model's context of 256 positions"),
])
def test_cli_generate_errors_are_one_line(tiny_export, args, needle):
    code, out = cli("generate", tiny_export / "onnx", "-p", "The wind", *args)
    assert code == 2
    assert needle in out and "Traceback" not in out
    assert out.strip().count("\n") == 0  # nothing echoed before the error: one line


def test_cli_generate_needs_kv_export(tiny_export, tmp_path):
    code, out = cli("export", "tiny-gpt2", tiny_export / "shiplog", "-o", tmp_path / "plain")
    assert code == 0, out
    code, out = cli("generate", tmp_path / "plain", "-p", "The wind")
    assert code == 2 and "--kv-cache" in out


def test_cli_generate_torch_unknown_adapter_dir(tiny_export):
    code, out = cli("generate", "tiny-gpt2", "-a", tiny_export / "shiplgo", "-p", "The wind")
    assert code == 2 and "no such adapter directory (did you mean shiplog?)" in out
