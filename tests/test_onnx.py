"""ONNX export with switchable adapters, on every architecture, checked with plain ONNX Runtime.

Tolerance: ONNX Runtime vs torch <= 1e-4 max-abs on logits (fp32), on real (unpadded) tokens, at
batch/sequence sizes other than the ones used for export.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import surgeon
from surgeon.errors import AdapterError
from surgeon.onnx.export import export_onnx
from surgeon.onnx.runtime import AdapterSession
from tests.conftest import ARCHS, make_base, run_cli

ATOL = 1e-4
SECOND = {  # a second adapter with other targets and rank, per architecture
    "gpt2": ["c_fc"], "llama": ["k_proj", "up_proj"], "qwen2": ["v_proj"], "opt": ["out_proj"],
    "phi3": ["o_proj"], "bert": ["key", "output.dense"],
}


def feeds(name, b, s, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 96, (b, s), dtype=np.int64)
    mask = np.ones((b, s), np.int64)
    if b > 1:
        if ARCHS[name][2] == "CAUSAL_LM":
            mask[0, :2] = 0  # left padding for decoders
        else:
            mask[0, -2:] = 0  # right padding for encoders
    return {"input_ids": ids, "attention_mask": mask}


def real_diff(got, want, mask):
    diff = np.abs(got - want)
    return float((diff[mask.astype(bool)] if diff.ndim == 3 else diff).max())


@pytest.fixture(scope="session", params=list(ARCHS))
def exported(request, tmp_path_factory):
    name = request.param
    _, targets, task = ARCHS[name]
    torch.manual_seed(0)
    model = surgeon.get_peft_model(make_base(name), surgeon.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       task_type=task, init_lora_weights=False))
    model.add_adapter("second", surgeon.LoraConfig(r=2, lora_alpha=4, target_modules=SECOND[name], task_type=task,
                                                   init_lora_weights=False))
    out = tmp_path_factory.mktemp(f"onnx-{name}") / "export"
    export_onnx(model, out)
    return name, model.eval(), out


def torch_logits(model, x, adapter):
    inputs = {k: torch.from_numpy(v) for k, v in x.items()}
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return model(**inputs).logits.numpy()
        model.set_adapter(adapter)
        return model(**inputs).logits.numpy()


def test_plain_onnxruntime_matches_torch(exported):
    name, model, out = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for adapter in ("default", "second", None):
        options = ort.RunOptions()
        if adapter:
            lora = ort.LoraAdapter()
            lora.Load(str(out / "adapters" / f"{adapter}.onnx_adapter"))
            options.add_active_adapter(lora)
        for b, s in [(1, 5), (3, 13)]:
            x = feeds(name, b, s)
            got = session.run(["logits"], x, options)[0]
            diff = real_diff(got, torch_logits(model, x, adapter), x["attention_mask"])
            assert diff <= ATOL, f"{name} {adapter} {b}x{s}: {diff}"


def test_manifest_and_names(exported):
    name, model, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["inputs"][0]["shape"] == ["batch", "sequence"] and manifest["outputs"][0]["name"] == "logits"
    assert set(manifest["adapters"]) == {"default", "second"}
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    for lo in manifest["lora_inputs"]:
        assert lo["a"] == f"{lo['path']}.lora_A.weight" and inputs[lo["a"]] == [lo["in"], "lora_r"]
        assert inputs[lo["b"]] == ["lora_r", lo["out"]]
    expected_paths = {m.path for m in model.adapter_state.registry().values() if isinstance(m, surgeon.layers.LoraLayer)}
    assert {lo["path"] for lo in manifest["lora_inputs"]} == expected_paths


def test_adapter_session_switches_per_call(exported):
    name, model, out = exported
    session = AdapterSession(out)
    assert session.providers == ["CPUExecutionProvider"] and session.adapters == ["default", "second"]
    x = feeds(name, 2, 9, seed=1)
    for adapter in ("second", None, "default", "second"):
        got = session.run(x, adapter=adapter)["logits"]
        assert real_diff(got, torch_logits(model, x, adapter), x["attention_mask"]) <= ATOL


def test_adapter_session_is_thread_safe():
    name, model, out = _gpt2_export()
    session = AdapterSession(out)
    x = feeds("gpt2", 2, 7)
    expected = {a: session.run(x, adapter=a)["logits"] for a in ("default", "second", None)}
    results, errors = [], []

    def worker(adapter):
        try:
            for _ in range(5):
                results.append((adapter, session.run(x, adapter=adapter)["logits"]))
        except Exception as err:  # collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(a,)) for a in ("default", "second", None) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 30
    assert all(np.array_equal(got, expected[a]) for a, got in results)


_CACHE = {}


def _gpt2_export():
    """A GPT-2 export shared by the tests below (built once per session)."""
    if "gpt2" not in _CACHE:
        import tempfile

        torch.manual_seed(0)
        model = surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(r=4, target_modules=["c_attn"],
                                                                             init_lora_weights=False))
        model.add_adapter("second", surgeon.LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False))
        root = tempfile.mkdtemp(prefix="surgeon-onnx-")
        base_dir = os.path.join(root, "base")
        model.get_base_model().save_pretrained(base_dir)
        model.save_pretrained(os.path.join(root, "adapters"))  # default in adapters/, second in adapters/second/
        export_onnx(model, os.path.join(root, "export"), source=base_dir,
                    adapter_sources={"default": os.path.join(root, "adapters"),
                                     "second": os.path.join(root, "adapters", "second")})
        _CACHE["gpt2"] = ("gpt2", model.eval(), __import__("pathlib").Path(root) / "export")
    return _CACHE["gpt2"]


def test_check_passes_and_catches_altered_weights(tmp_path):
    import shutil

    from surgeon.workflows.checks import run_checks

    _, _, out = _gpt2_export()
    report = run_checks(out)
    assert report.passed, report.text()
    names = [c.name for c in report.checks]
    assert {"onnx_checker", "rank0_defaults", "session_loads", "base_vs_torch", "adapter[second]_vs_torch"} <= set(names)
    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    proto = onnx.load(str(altered / "model.onnx"))
    weight = max((t for t in proto.graph.initializer if len(t.dims) == 2 and 0 not in t.dims), key=lambda t: t.dims[0] * t.dims[1])
    array = onnx.numpy_helper.to_array(weight).copy()
    array[0, 0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(proto, str(altered / "model.onnx"))
    bad = run_checks(altered)
    assert not bad.passed and any(c.name == "base_vs_torch" and c.passed is False for c in bad.checks)


def test_check_command_exit_codes_and_json(tmp_path):
    _, _, out = _gpt2_export()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "surgeon.cli", "check", str(out), "--json", str(tmp_path / "r.json")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    # one real child above proves the entry point and sys.exit's code; the other two codes in this process
    usage = run_cli("check", tmp_path / "nothing")
    assert usage.returncode == 2 and "manifest.json" in usage.stderr
    strict = run_cli("check", out, "--atol", "1e-12")
    assert strict.returncode == 1 and "FAIL" in strict.stdout


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_merged_export_matches_torch(name, tmp_path):
    _, targets, task = ARCHS[name]
    torch.manual_seed(0)
    model = surgeon.get_peft_model(make_base(name), surgeon.LoraConfig(r=4, target_modules=targets, task_type=task,
                                                                       init_lora_weights=False)).eval()
    export_onnx(model, tmp_path / "m", merged=True)
    proto = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False)
    assert not any("lora" in i.name for i in proto.graph.input)
    session = AdapterSession(tmp_path / "m")
    x = feeds(name, 3, 11)
    assert real_diff(session.run(x)["logits"], torch_logits(model, x, "default"), x["attention_mask"]) <= ATOL


# ---- bad input ----------------------------------------------------------------------------
def test_adapter_file_for_another_model_lists_names(tmp_path):
    _, _, out = _gpt2_export()
    torch.manual_seed(0)
    other = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(r=2, target_modules=["q_proj"]))
    export_onnx(other, tmp_path / "llama")
    session = AdapterSession(out)
    session.add_adapter_file("ok", out / "adapters" / "second.onnx_adapter")
    with pytest.raises(AdapterError, match=r"not adapter inputs of this model: model\.layers\.0\.self_attn\.q_proj"):
        session.add_adapter_file("llama", tmp_path / "llama" / "adapters" / "default.onnx_adapter")
    with pytest.raises(AdapterError, match="did you mean 'second'"):
        session.run(feeds("gpt2", 1, 3), adapter="secnd")


def test_adapter_with_another_dtype(tmp_path):
    _, _, out = _gpt2_export()
    params = ort.AdapterFormat.read_adapter(str(out / "adapters" / "default.onnx_adapter")).get_parameters()
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v.numpy().astype(np.float16)) for k, v in params.items()})
    fmt.export_adapter(str(tmp_path / "half.onnx_adapter"))
    with pytest.raises(AdapterError, match="dtype mismatch: .*float16 vs model float32"):
        AdapterSession(out).add_adapter_file("half", tmp_path / "half.onnx_adapter")


_cli = run_cli


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-export")
    make_base("gpt2").save_pretrained(root / "base")
    model = surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    model.save_pretrained(root / "tuned")
    other = surgeon.get_peft_model(make_base("llama"), surgeon.LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(root / "llama-adapter")
    return root


def test_export_command_and_existing_out(gpt2_dirs, tmp_path):
    result = _cli("export", gpt2_dirs / "base", gpt2_dirs / "tuned", "-o", tmp_path / "e")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "e" / "adapters" / "tuned.onnx_adapter").is_file()
    assert _cli("check", tmp_path / "e").returncode == 0
    again = _cli("export", gpt2_dirs / "base", gpt2_dirs / "tuned", "-o", tmp_path / "e")
    assert again.returncode == 2 and "--force" in again.stderr


def test_export_adapter_for_another_base(gpt2_dirs, tmp_path):
    result = _cli("export", gpt2_dirs / "base", gpt2_dirs / "llama-adapter", "-o", tmp_path / "e")
    assert result.returncode == 2 and "q_proj" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "e").exists()


def test_interrupted_export_leaves_nothing(gpt2_dirs, tmp_path):
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    result = _cli("export", gpt2_dirs / "base", gpt2_dirs / "tuned", "-o", tmp_path / "x" / "e", preexec_fn=limit)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert list((tmp_path / "x").iterdir()) == []
