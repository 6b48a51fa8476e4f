"""Fold: graph pass and PEFT merge methods on every architecture, fp32 and bf16; merged checkpoints.

Tolerances: fp32 fold vs unfolded <= 1e-5 max-abs on logits. bf16: the folded weight equals
``(W.float() + scale * B @ A).to(bf16)`` within 1 bf16 ulp, and logits agree within bf16's resolution (5e-2).
"""

from __future__ import annotations

import hashlib
import signal

import pytest
import torch

import surgeon
from surgeon.passes.fold import FoldError
from tests.conftest import ARCHS, batch, make_base, run_cli

FP32_ATOL = 1e-5
BF16_ATOL = 5e-2


def inputs(name, **kw):
    x = {k: v for k, v in batch(name, **kw).items() if k != "labels"}
    if ARCHS[name][2] == "CAUSAL_LM":
        x["use_cache"] = False
    return x


def lora_model(name, dtype=torch.float32, **cfg):
    _, targets, task = ARCHS[name]
    torch.manual_seed(5)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": targets, "task_type": task, "init_lora_weights": False, **cfg}
    model = surgeon.get_peft_model(make_base(name).to(dtype), surgeon.LoraConfig(**cfg))
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_fold_pass_equals_unfolded(name, dtype):
    model = lora_model(name, dtype)
    graph = model.graph_for(**inputs(name))
    before_nodes = [n.format_node() for n in graph.graph.nodes]
    before_weights = {k: v.clone() for k, v in model.base.state_dict().items()}
    folded = surgeon.fold(graph)
    assert [n.format_node() for n in graph.graph.nodes] == before_nodes  # input untouched
    assert all(torch.equal(before_weights[k], v) for k, v in model.base.state_dict().items())
    assert not any(str(n.target).startswith("surgeon_lora") for n in folded.graph.nodes)
    atol = FP32_ATOL if dtype == torch.float32 else BF16_ATOL
    for b, s in [(1, 5), (3, 13)]:
        x = inputs(name, b=b, s=s, pad_left=2)
        with torch.no_grad():
            diff = (graph(**x).logits.float() - folded(**x).logits.float()).abs().max().item()
        assert diff <= atol, f"{name} {dtype} {b}x{s}: {diff}"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_bf16_folded_weight_is_fp32_sum_cast_back(name):
    from surgeon.passes.fold import lora_delta

    model = lora_model(name, torch.bfloat16)
    folded = surgeon.fold(model.graph_for(**inputs(name)))
    layer = next(m for m in model.adapter_state.registry().values() if isinstance(m, surgeon.layers.LoraLayer))
    base_w = model.base.get_submodule(layer.path).weight
    expected = (base_w.float() + lora_delta(layer)).to(torch.bfloat16)
    got = [p for n, p in folded.named_parameters() if n.startswith("surgeon_folded") and layer.path.replace(".", "__") in n]
    # addmm fuses the multiply-add, so a value may round to the neighbouring bf16 number: at most 1 ulp (2**-8 relative)
    assert got and got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), expected.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_unfold_restores_weights_and_outputs(name):
    model = lora_model(name)
    graph = model.graph_for(**inputs(name))
    restored = surgeon.unfold(surgeon.fold(graph))
    x = inputs(name)
    with torch.no_grad():
        assert (graph(**x).logits - restored(**x).logits).abs().max() <= FP32_ATOL
    assert sum(str(n.target).startswith("surgeon_lora") for n in restored.graph.nodes) == \
        sum(str(n.target).startswith("surgeon_lora") for n in graph.graph.nodes)


@pytest.mark.parametrize("name", list(ARCHS))
def test_merge_and_unload_returns_plain_model_with_equal_logits(name):
    model = lora_model(name, modules_to_save=["wpe"] if name == "gpt2" else None)
    x = inputs(name, b=2, s=11, pad_left=3)
    with torch.no_grad():
        expected = model(**x).logits
        merged = model.merge_and_unload()
        got = merged(**x).logits
    assert type(merged) is type(make_base(name))
    assert (got - expected).abs().max() <= FP32_ATOL


def test_merged_model_generates():
    merged = lora_model("llama").merge_and_unload()
    out = merged.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_merge_unmerge_round_trip():
    model = lora_model("opt")
    x = inputs("opt")
    weights = {k: v.clone() for k, v in model.base.state_dict().items()}
    with torch.no_grad():
        before = model(**x).logits
        model.merge_adapter()
        merged = model(**x).logits
        model.unmerge_adapter()
        after = model(**x).logits
    assert (before - merged).abs().max() <= FP32_ATOL and (before - after).abs().max() <= FP32_ATOL
    assert max((weights[k] - v).abs().max().item() for k, v in model.base.state_dict().items()) <= 1e-6


@pytest.mark.parametrize("safe", [True, False])
def test_overflowing_fold_names_module_and_changes_nothing(safe):
    model = lora_model("llama")
    layer = [m for m in model.adapter_state.registry().values() if isinstance(m, surgeon.layers.LoraLayer)][-1]
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(3e38)
        layer.adapters["default"].lora_A.fill_(3e38)
    weights = {k: v.clone() for k, v in model.base.state_dict().items()}
    with pytest.raises(FoldError, match=layer.path):
        model.merge_and_unload(safe_merge=safe)
    # safe_merge checks before writing (bit-identical); otherwise earlier layers are rolled back by subtraction
    atol = 0.0 if safe else 1e-6
    assert all((weights[k] - v).abs().max() <= atol for k, v in model.base.state_dict().items())
    with pytest.raises(FoldError, match=layer.path):
        surgeon.fold(model.graphs.any())


def test_tied_embedding_fold_unties_and_says_so():
    model = lora_model("gpt2", target_modules=["wte"])
    x = inputs("gpt2")
    with torch.no_grad():
        expected = model(**x).logits
    with pytest.warns(UserWarning, match="tied"):
        merged = model.merge_and_unload()
    assert merged.transformer.wte.weight is not merged.lm_head.weight
    assert merged.config.tie_word_embeddings is False
    with torch.no_grad():
        assert (merged(**x).logits - expected).abs().max() <= FP32_ATOL


@pytest.mark.parametrize("kind,atol", [("cat", FP32_ATOL), ("svd", 1e-4)])
def test_add_weighted_adapter(kind, atol):
    model = lora_model("llama")
    model.add_adapter("b", surgeon.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_lora_weights=False))
    x = inputs("llama")
    with torch.no_grad():
        base = model.get_base_model()(**x).logits  # the eager base is untouched by adapters
        a = model(**x).logits
        model.set_adapter("b")
        b = model(**x).logits
        model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type=kind,
                                   svd_rank=6 if kind == "svd" else None)
        model.set_adapter("mix")
        mix = model(**x).logits
    assert not torch.allclose(mix, base) and not torch.allclose(mix, a) and not torch.allclose(mix, b)
    # The mix equals merging both adapters with their weights: fold 0.5 * default + 2.0 * b by hand.
    from surgeon.passes.fold import lora_delta

    with torch.no_grad():
        for layer in model.adapter_state.lora_layers():
            w = model.get_base_model().get_submodule(layer.path).weight
            for name, weight in (("default", 0.5), ("b", 2.0)):
                if name in layer.adapters:
                    w.add_(weight * lora_delta(layer, (name,)))
        by_hand = model.get_base_model()(**x).logits
    assert (by_hand - mix).abs().max() <= atol


# ---- the command -------------------------------------------------------------------------
def _hash_dir(path):
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    from surgeon.hub import model_dir
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("fold")
    make_base("gpt2").save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(model_dir("tiny-gpt2")).save_pretrained(root / "base")
    model = lora_model("gpt2", modules_to_save=["wpe"])
    model.save_pretrained(root / "adapter")
    return root


_cli = run_cli


def test_fold_command_writes_loadable_checkpoint(base_and_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    root = base_and_adapter
    digest = _hash_dir(root / "base")
    result = _cli("fold", root / "base", root / "adapter", "-o", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert _hash_dir(root / "base") == digest  # the base directory is never modified
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = surgeon.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), str(root / "adapter"))
    x = inputs("gpt2")
    with torch.no_grad():
        assert (merged(**x).logits - reference(**x).logits).abs().max() <= FP32_ATOL
    again = _cli("fold", root / "base", root / "adapter", "-o", tmp_path / "merged")
    assert again.returncode == 2 and "exists already" in again.stderr and "--force" in again.stderr
    assert _cli("fold", root / "base", root / "adapter", "-o", tmp_path / "merged", "--force").returncode == 0


def test_fold_command_bf16_and_two_adapters(base_and_adapter, tmp_path):
    root = base_and_adapter
    result = _cli("fold", root / "base", root / "adapter", root / "adapter", "--weights", "0.5,0.5", "--dtype", "bfloat16",
                  "-o", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").dtype == torch.bfloat16


def test_fold_unwritable_out(base_and_adapter, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _cli("fold", base_and_adapter / "base", base_and_adapter / "adapter", "-o", blocker / "sub")
    assert result.returncode == 2 and "cannot write there" in result.stderr and "Traceback" not in result.stderr


def test_disk_full_mid_write_leaves_nothing(base_and_adapter, tmp_path):
    """A real short write: the child may write at most 64 KiB per file (RLIMIT_FSIZE), like a full disk."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "outdir" / "merged"
    result = _cli("fold", base_and_adapter / "base", base_and_adapter / "adapter", "-o", out, preexec_fn=limit)
    assert result.returncode == 1, result.stderr
    assert "writing failed" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and list((tmp_path / "outdir").iterdir()) == []


def test_weighted_onnx_fold_is_checked_against_its_recipe(base_and_adapter, tmp_path):
    """Several adapters folded with weights: check rebuilds the same weighted merge from the recorded recipe."""
    import json

    from surgeon.workflows.checkpoint import fold_onnx
    from surgeon.workflows.checks import run_checks

    root = base_and_adapter
    lora_model("gpt2", r=2, target_modules=["c_fc"]).save_pretrained(tmp_path / "second")
    out = fold_onnx(str(root / "base"), [str(root / "adapter"), str(tmp_path / "second")], tmp_path / "onnx",
                    weights=[0.7, 0.3])
    report = run_checks(out, strict=True)
    assert report.passed and "merged[merged]_vs_torch" in {c.name for c in report.checks}, report.text()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["merge_recipe"]["weights"] = [0.7, 0.6]  # a recipe other than what was folded
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert not run_checks(out).passed


def test_fold_command_onnx_format(base_and_adapter, tmp_path):
    root = base_and_adapter
    result = _cli("fold", root / "base", root / "adapter", "--format", "onnx", "-o", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr
    check = _cli("check", tmp_path / "onnx")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "merged[a0]_vs_torch" in check.stdout
