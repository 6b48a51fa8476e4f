"""(IA)^3 (``IA3Config``) against real PEFT on the same base, with PEFT's per-architecture defaults: logits and
gradients (<= 1e-5), a 10-step loss curve, the trainable-parameter line, PEFT's files both ways (``ia3_l``), merges
and the fold pass exact (<= 1e-5), and named refusals. GPT-2 (Conv1D, a feed-forward c_proj), Llama, BERT
classification."""

from __future__ import annotations

import peft
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError, ConfigError
from tests.conftest import ARCHS, batch, loss_curve, make_base, seeded
from tests.test_fold import inputs
from tests.test_peft_parity import copy_peft_weights

NAMES = ["gpt2", "llama", "bert"]


def twins(name: str, **cfg):
    """A surgeon and a PEFT IA3 model of the same base (PEFT's default targets and feed-forward modules) with the
    same random vectors (init_ia3_weights=False: ones would hide a vector applied on the wrong side)."""
    cfg = {"task_type": ARCHS[name][2], "init_ia3_weights": False, **cfg}
    torch.manual_seed(0)
    theirs = peft.get_peft_model(make_base(name), peft.IA3Config(**cfg))
    ours = surgeon.get_peft_model(make_base(name), surgeon.IA3Config(**cfg))
    copy_peft_weights(theirs, ours)
    return ours, theirs


def seeded(model, **kw):
    torch.manual_seed(5)  # the base's own dropout draws the same masks in both tools
    return model(**kw)


@pytest.mark.parametrize("name", NAMES)
def test_ia3_logits_gradients_and_parameter_line_equal_peft(name, capsys):
    from peft.utils import get_peft_model_state_dict

    ours, theirs = twins(name)
    ours.train(), theirs.train()
    b = batch(name, b=3, s=10, seed=4, pad_left=2)
    x = {k: v for k, v in b.items() if k != "labels"}
    assert (seeded(ours, **x).logits - seeded(theirs, **x).logits).abs().max() <= 1e-5
    with torch.no_grad(), ours.disable_adapter():  # the vectors act: off, the logits move by > 1% of their scale
        base, tuned = seeded(ours, **x).logits, seeded(theirs, **x).logits
        assert (base - tuned).abs().max() > 1e-2 * tuned.abs().max()
    got, want = seeded(ours, **b), seeded(theirs, **b)
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5
    got.loss.backward()
    want.loss.backward()
    mine = {k: v.grad for k, v in ours.state_dict(keep_vars=True).items() if v.requires_grad}
    theirs_g = {k: v.grad for k, v in get_peft_model_state_dict(theirs, state_dict=dict(theirs.named_parameters())).items()
                if v.requires_grad}
    assert set(mine) == set(theirs_g) and any(k.endswith(".ia3_l") for k in mine)
    for key, grad in mine.items():
        assert (grad - theirs_g[key]).abs().max() <= 1e-5 * max(1.0, theirs_g[key].abs().max()), key
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trainable params")]
    assert len(lines) == 2 and lines[0] == lines[1]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_ia3_loss_curve_equals_peft(name):
    ours, theirs = twins(name, init_ia3_weights=True)
    curves = [loss_curve(model, name, lr=5e-2) for model in (ours, theirs)]
    assert curves[0] == pytest.approx(curves[1], abs=2e-5), curves
    assert curves[0][-1] < curves[0][0]


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_ia3_files_both_ways(name, tmp_path):
    from tests.conftest import files_both_ways

    loaded, back = files_both_ways(twins(name)[1], name, tmp_path, inputs(name, seed=7))
    assert isinstance(loaded.peft_config["default"], surgeon.IA3Config)
    assert type(back.peft_config["default"]).__name__ == "IA3Config"


@pytest.mark.parametrize("name", NAMES)
def test_ia3_merge_and_fold_are_exact(name):
    ours, theirs = twins(name)
    ours.eval(), theirs.eval()
    x = inputs(name, seed=8)
    with torch.no_grad():
        want = ours(**x).logits
        folded = surgeon.fold(ours.graph_for(**x))
        assert not any(str(n.target).startswith("surgeon_lora") for n in folded.graph.nodes)
        assert (folded(**x).logits - want).abs().max() <= 1e-5
        before = {k: v.clone() for k, v in ours.base.state_dict().items()}
        ours.merge_adapter()
        assert (ours(**x).logits - want).abs().max() <= 1e-5
        ours.unmerge_adapter()
        assert all((before[k] - v).abs().max() <= 1e-6 for k, v in ours.base.state_dict().items())
        assert (ours(**x).logits - want).abs().max() <= 1e-5
        merged = ours.merge_and_unload()(**x).logits
        peft_merged = theirs.merge_and_unload()(**x).logits
    assert (merged - want).abs().max() <= 1e-5 and (merged - peft_merged).abs().max() <= 1e-5


def test_two_ia3_adapters_switch_like_peft(tmp_path):
    _, theirs = twins("llama")
    torch.manual_seed(1)
    theirs.add_adapter("other", peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False,
                                               target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    theirs.save_pretrained(tmp_path)
    ours = surgeon.PeftModel.from_pretrained(make_base("llama"), tmp_path).eval()
    ours.load_adapter(tmp_path / "other", adapter_name="other")
    theirs.eval()
    x = inputs("llama", seed=9)
    with torch.no_grad():
        for name in ("other", "default", "other"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            assert (ours(**x).logits - theirs(**x).logits).abs().max() <= 1e-5, name


def test_ia3_refusals(tmp_path):
    with pytest.raises(ConfigError, match="feedforward_modules"):
        surgeon.IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ConfigError, match="feedforward_modules is not set"):
        surgeon.get_peft_model(make_base("phi3"), surgeon.IA3Config(target_modules=["qkv_proj"]))
    with pytest.raises(AdapterError, match="embedding"):
        surgeon.get_peft_model(make_base("llama"), surgeon.IA3Config(target_modules=["embed_tokens"],
                                                                     feedforward_modules=[]))
    ours, _ = twins("llama")
    ours.eval()
    with pytest.raises(AdapterError, match="IA3"):
        ours(**batch("llama", b=2), adapter_names=["default", "__base__"])
    with pytest.raises(AdapterError, match="one method per model"):
        ours.add_adapter("lora", surgeon.LoraConfig(target_modules=["q_proj"]))
    ours.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterError, match="hotswap is for LoRA"):
        ours.load_adapter(tmp_path / "ia3", adapter_name="default", hotswap=True)
    with pytest.raises(ConfigError, match="LoRA, IA3 and prompt-tuning"):
        surgeon.LoraConfig.from_peft_dict({"peft_type": "P_TUNING"})


# ---- ONNX: each (IA)^3 vector a switchable input (default ones) -----------------------------------------------------
@pytest.fixture(scope="module")
def ia3_exports(tmp_path_factory):
    from surgeon.onnx.export import export_onnx

    out = {}
    for name in ("gpt2", "llama"):
        root = tmp_path_factory.mktemp(f"ia3-{name}")
        ours, _ = twins(name)
        ours.eval()
        make_base(name).save_pretrained(root / "base")
        ours.save_pretrained(root / "ad")
        with torch.no_grad():  # an altered copy, for the check to catch
            ours.adapter_state.ia3_layers()[0].adapters["default"].ia3_l.mul_(1.2)
        ours.save_pretrained(root / "altered")
        ours = surgeon.PeftModel.from_pretrained(make_base(name), root / "ad").eval()
        sources = {"default": str(root / "ad")}
        export_onnx(ours, root / "onnx", kv_cache=True, source=str(root / "base"), adapter_sources=sources)
        export_onnx(ours, root / "merged", merged=True, kv_cache=True, source=str(root / "base"), adapter_sources=sources)
        out[name] = (root, ours)
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_ia3_onnx_export_switches_and_equals_torch(ia3_exports, name):
    from tests.conftest import assert_export_matches_torch

    root, ours = ia3_exports[name]
    assert_export_matches_torch(root, ours, name, (None, "default", None), ".ia3_l")


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_check_passes_on_an_ia3_export_and_fails_on_an_altered_vector(ia3_exports, name):
    from tests.conftest import assert_check_catches

    assert_check_catches(ia3_exports[name][0])


def test_cli_inject_and_train_with_method_ia3(tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    shown = run_cli("inject", "tiny-gpt2", "--method", "ia3", "--dry-run")
    assert shown.returncode == 0 and "IA3 on the input" in shown.stdout and "IA3 on the output" in shown.stdout
    bad = run_cli("inject", "tiny-gpt2", "--method", "ia3", "-r", "4", "--dry-run")
    assert bad.returncode == 2 and "--rank" in bad.stderr
    trained = run_cli("train", "--method", "ia3", "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                      "-o", tmp_path / "ad")
    assert trained.returncode == 0, trained.stderr
    assert all(k.endswith(".ia3_l") for k in load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    # export + check of a CLI-trained IA3 adapter: README's methods section, run as written (test_readme.py)
    int4 = run_cli("export", "tiny-gpt2", tmp_path / "ad", "-o", tmp_path / "q", "--int4")
    assert int4.returncode == 2 and "IA3" in int4.stderr and not (tmp_path / "q").exists()


def test_genai_runs_the_ia3_export_as_written(ia3_exports, genai):
    from tests.conftest import genai_equals_session

    want = genai_equals_session(genai, ia3_exports["llama"][0] / "onnx", (None, "default"))
    assert want["default"] != want[None]


def test_ia3_bank_rows_equal_each_adapter_alone_and_grow_with_bank_add(tmp_path):
    """A bank of IA3 adapters: each row of one batch runs its own vectors (slot 0 ones: the base), equal to that
    adapter's own export run alone; `surgeon bank add` appends a third; check proves slots equal the files."""
    import numpy as np

    from surgeon.onnx.decoding import empty_past
    from surgeon.onnx.export import export_onnx
    from surgeon.onnx.runtime import AdapterSession
    from surgeon.workflows.checks import run_checks
    from tests.conftest import run_cli

    ours, _ = twins("llama")
    torch.manual_seed(4)
    ours.add_adapter("other", surgeon.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                                init_ia3_weights=False))
    ours.add_adapter("third", surgeon.IA3Config(target_modules=["v_proj"], feedforward_modules=[],
                                                init_ia3_weights=False))
    ours.eval().save_pretrained(tmp_path / "ad", selected_adapters=["third"])
    bank = export_onnx(ours, tmp_path / "bank", ["default", "other"], kv_cache=True, bank=True)
    alone = export_onnx(ours, tmp_path / "alone", ["default", "other", "third"], kv_cache=True)
    ids = batch("llama", b=3, s=7, seed=12)["input_ids"].numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(7), (3, 1)),
             **empty_past(AdapterSession(bank).generation, 3)}
    rows = [None, "default", "other"]
    got = AdapterSession(bank).run(feeds, adapters=rows)["logits"]
    single = AdapterSession(alone)
    for i, name in enumerate(rows):
        want = single.run({k: v[i:i + 1] for k, v in feeds.items()}, adapter=name)["logits"]
        assert np.abs(got[i:i + 1] - want).max() <= 1e-4, name
    report = run_checks(bank)
    assert report.passed and any(c.name == "bank" and c.passed for c in report.checks), report.text()
    added = run_cli("bank", "add", bank, tmp_path / "ad" / "third", "--name", "third")
    assert added.returncode == 0, added.stderr
    grown = AdapterSession(bank).run(feeds, adapters=["third", None, "default"])["logits"]
    assert np.abs(grown[0:1] - single.run({k: v[:1] for k, v in feeds.items()}, adapter="third")["logits"]).max() <= 1e-4
    assert run_checks(bank).passed
