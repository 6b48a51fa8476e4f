"""The gate and the writes, tried with hostile input: real files, real subprocesses, real signals.

- ``surgeon check`` fails every broken export (NaN anywhere, an altered adapter, a changed file) and says which
  comparison it could not make (``--strict`` fails then).
- Writes stay inside OUT, never destroy an input, never replace an OUT that appeared meanwhile, leave nothing on
  SIGTERM, sweep what kill -9 left, follow the umask.
- Bad input: exit 2 and one line on stderr, never a traceback; a broken export under ``check``: exit 1, named.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import surgeon
from surgeon.workflows.checks import run_checks
from surgeon.cli import main
from surgeon.errors import AdapterError, ConfigError, ExportFileError, GenerationArgumentError, \
    ModelFileError, OutputError
from surgeon.onnx.export import export_onnx
from surgeon.onnx.runtime import AdapterSession, changed_files, file_digest
from surgeon.outputs import write_dir_atomically
from tests.conftest import make_base

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved GPT-2 base, two adapters for it, and a plain export of the first (sources recorded)."""
    root = tmp_path_factory.mktemp("reliability")
    make_base("gpt2").save_pretrained(root / "base")
    torch.manual_seed(0)
    model = surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(r=4, target_modules=["c_attn"],
                                                                         init_lora_weights=False))
    model.save_pretrained(root / "tuned")
    other = surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(r=4, target_modules=["c_attn"],
                                                                         init_lora_weights=False))
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    other.save_pretrained(root / "other")  # same names and shapes as tuned, other weights
    export_onnx(model, root / "export", source=str(root / "base"), adapter_sources={"default": root / "tuned"},
                adapter_names={"default": "tuned"})
    return root


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def refused(code, out, needle, want=2):
    """Exit ``want``, one line on stderr naming the problem, no traceback."""
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == want, out
    assert "Traceback" not in out, out
    assert len(lines) == 1 and lines[0].startswith("surgeon: error:"), out
    assert needle in lines[0], out


def copy_export(world, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(world / "export", target)
    return target


def edit_manifest(out, change):
    manifest = json.loads((out / "manifest.json").read_text())
    change(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def rehash(out):
    """What a buggy exporter would write: the manifest's hashes matching the broken files."""
    edit_manifest(out, lambda m: m.update(files={rel: file_digest(out / rel) for rel in m["files"]}))


def adapter_params(path):
    return {k: v.numpy().copy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}


def write_adapter_file(path, params):
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in params.items()})
    fmt.export_adapter(str(path))


def verdicts(report):
    return {c.name: c.passed for c in report.checks}


# ---- the gate ------------------------------------------------------------------------------------
def test_check_passes_a_good_export_with_every_comparison(world):
    report = run_checks(world / "export")
    got = verdicts(report)
    assert report.passed and got["file_hashes"] and got["adapter[tuned]_vs_torch"] and got["base_vs_torch"], report.text()


def test_nan_in_the_model_fails_even_when_the_hashes_were_rewritten(world, tmp_path):
    out = copy_export(world, tmp_path)
    proto = onnx.load(str(out / "model.onnx"))
    weight = max((t for t in proto.graph.initializer if 0 not in t.dims), key=lambda t: int(np.prod(t.dims)))
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(proto, str(out / "model.onnx"))
    assert changed_files(out, json.loads((out / "manifest.json").read_text())) == [
        "model.onnx (changed since export: sha256 differs)"]
    rehash(out)
    second = run_checks(out)
    assert verdicts(second)["file_hashes"] is True and not second.passed
    assert verdicts(second)["base_finite"] is False, second.text()


@pytest.mark.parametrize("how", ["nan", "zeroed", "times10"])
def test_an_altered_adapter_file_fails(world, tmp_path, how):
    out = copy_export(world, tmp_path)
    path = out / "adapters" / "tuned.onnx_adapter"
    params = adapter_params(path)
    for key, value in params.items():
        if key.endswith("lora_B.weight"):
            params[key] = {"nan": np.full_like(value, np.nan),
                           "zeroed": np.zeros_like(value), "times10": value * 10}[how].astype(np.float32)
    write_adapter_file(path, params)
    assert changed_files(out, json.loads((out / "manifest.json").read_text())) == [
        "adapters/tuned.onnx_adapter (changed since export: sha256 differs)"]
    rehash(out)  # the numbers alone must catch it: the reference comes from the source directory, not this file
    report = run_checks(out)
    assert verdicts(report)["adapter[tuned]_vs_torch"] is False and verdicts(report)["base_vs_torch"] is True, report.text()
    if how == "nan":
        assert verdicts(report)["adapter[tuned]_finite"] is False


def test_source_missing_is_said_and_strict_fails_it(world, tmp_path):
    out = copy_export(world, tmp_path)
    edit_manifest(out, lambda m: m.update(adapter_sources={"tuned": str(tmp_path / "gone")}))
    report = run_checks(out)
    skipped = next(c for c in report.checks if c.name == "adapter[tuned]_vs_torch")
    assert skipped.passed is None and "--adapter tuned=PEFT_DIR" in skipped.detail
    assert report.passed  # nothing failed...
    report.strict = True
    assert not report.passed and "FAIL  adapter[tuned]_vs_torch" in report.text()  # ...but --strict fails it
    code, text = cli("check", out, "--strict", "--json", tmp_path / "r.json")
    assert code == 1 and json.loads((tmp_path / "r.json").read_text())["passed"] is False
    given = run_checks(out, adapters={"tuned": str(world / "tuned")}, strict=True)
    assert given.passed, given.text()
    wrong = run_checks(out, adapters={"tuned": str(world / "other")})  # a source other than the exported adapter
    assert verdicts(wrong)["adapter[tuned]_vs_torch"] is False


def test_check_command_broken_exports_exit_1_with_json(world, tmp_path):
    cases = {
        "truncated": lambda out: (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:5000]),
        "replaced": lambda out: (out / "model.onnx").write_bytes(b"not a model at all" * 100),
        "empty manifest": lambda out: (out / "manifest.json").write_text(""),
        "missing field": lambda out: edit_manifest(out, lambda m: m.pop("model")),
        "not utf-8": lambda out: (out / "manifest.json").write_bytes(b'{"model": "\xff\xfe"}'),
        "deep nesting": lambda out: (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000),
        "absolute adapter path": lambda out: edit_manifest(
            out, lambda m: m["adapters"]["tuned"].update(file=str(world / "export" / "adapters" / "tuned.onnx_adapter"))),
        "escaping adapter path": lambda out: edit_manifest(
            out, lambda m: m["adapters"]["tuned"].update(file="../../" + out.parent.name + "/x.onnx_adapter")),
    }
    needles = {"truncated": "model.onnx", "replaced": "model.onnx", "empty manifest": "not valid JSON",
               "missing field": "'model' is missing", "not utf-8": "not UTF-8", "deep nesting": "nested too deeply",
               "absolute adapter path": "absolute path", "escaping adapter path": "resolves outside the export"}
    for label, breaking in cases.items():
        out = copy_export(world, tmp_path, label.replace(" ", "-"))
        breaking(out)
        code, text = cli("check", out, "--json", tmp_path / f"{label}.json")
        assert code == 1 and "Traceback" not in text, (label, text)
        report = json.loads((tmp_path / f"{label}.json").read_text())
        failed = " ".join(c["detail"] for c in report["checks"] if c["passed"] is False)
        assert not report["passed"] and needles[label] in failed, (label, failed)


def test_adapter_session_refuses_paths_outside_the_export(world, tmp_path):
    out = copy_export(world, tmp_path)
    edit_manifest(out, lambda m: m["adapters"]["tuned"].update(file="/etc/passwd"))
    with pytest.raises(ExportFileError, match="absolute path"):
        AdapterSession(out)
    edit_manifest(out, lambda m: m["adapters"]["tuned"].update(file="adapters/../../elsewhere.onnx_adapter"))
    with pytest.raises(ExportFileError, match="resolves outside the export"):
        AdapterSession(out)


def test_adapter_with_the_right_names_and_other_shapes_is_refused(world, tmp_path):
    params = adapter_params(world / "export" / "adapters" / "tuned.onnx_adapter")
    key = next(k for k in params if k.endswith("lora_A.weight"))
    params[key] = np.zeros((params[key].shape[0] + 1, params[key].shape[1]), np.float32)
    write_adapter_file(tmp_path / "bad.onnx_adapter", params)
    with pytest.raises(AdapterError, match=r"do not fit the model's adapter inputs: .*lora_A.weight: \[33, 4\]"):
        AdapterSession(world / "export").add_adapter_file("bad", tmp_path / "bad.onnx_adapter")


def test_check_usage_errors_exit_2(world, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(*cli("check", world / "export", "--json", tmp_path / "file" / "r.json"), "not a directory")
    refused(*cli("check", tmp_path / "nowhere"), "no such export directory")
    refused(*cli("check", world / "export", "--adapter", "tuned"), "NAME=PEFT_DIR")
    refused(*cli("check", world / "export", "--adapter", "tunned=x"), "did you mean 'tuned'")
    refused(*cli("check", world / "export", "--adapter", f"tuned={tmp_path / 'gone'}"), "no such directory")
    refused(*cli("check", world / "export", "--atol", "nan"), "finite number")


# ---- writes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/srv/other/escaped", "..", ".", "", "sub/dir", "a\\b"])
def test_export_names_are_one_path_component(world, tmp_path, name):
    refused(*cli("export", world / "base", world / "tuned", "--name", name, "-o", tmp_path / "e"), "--name")
    assert list(tmp_path.iterdir()) == [] and not os.path.exists("/srv/other/escaped.onnx_adapter")


def test_save_pretrained_refuses_an_adapter_name_that_is_a_path(tmp_path):
    model = surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(AdapterError, match="without '.'"):
        model.add_adapter("../escaped", surgeon.LoraConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("sub/escaped", surgeon.LoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(AdapterError, match="path separator"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "sub").exists()


def test_force_never_destroys_an_input(world, tmp_path):
    base = tmp_path / "models" / "base"
    shutil.copytree(world / "base", base)
    before = sorted(p.name for p in base.iterdir())
    refused(*cli("fold", base, world / "tuned", "-o", base, "--force"), "is an input")
    refused(*cli("fold", base, world / "tuned", "-o", base.parent, "--force"), "contains the input")
    refused(*cli("export", base, world / "tuned", "-o", world / "tuned", "--force"), "is an input")
    (base / "sub").mkdir()
    refused(*cli("fold", base, world / "tuned", "-o", base / "sub", "--force"), "lies inside the input")
    assert sorted(p.name for p in base.iterdir()) == sorted(before + ["sub"])


def test_an_out_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"

    def fill(tmp):
        (tmp / "result").write_text("ours")
        out.mkdir()  # someone else's files arrive while we work
        (out / "theirs.txt").write_text("keep me")

    for force in (False, True):  # OUT did not exist at the start: not even --force replaces it
        with pytest.raises(OutputError, match="appeared while surgeon was writing"):
            write_dir_atomically(out, fill, force=force)
        assert (out / "theirs.txt").read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["out"]
        shutil.rmtree(out)


def test_inject_and_train_refuse_existing_out_and_model_dirs(world, tmp_path):
    existing = tmp_path / "adapter"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    refused(*cli("inject", world / "base", "-t", "c_attn", "-o", existing), "--force")
    refused(*cli("train", "--steps", "1", "-o", existing), "--force")
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    model_dir = tmp_path / "model"
    shutil.copytree(world / "base", model_dir)
    for args in (("inject", world / "base", "-t", "c_attn", "-o", model_dir, "--force"),
                 ("train", "--steps", "1", "-o", model_dir, "--force")):
        refused(*cli(*args), "is a model directory")
    assert not (model_dir / "adapter_config.json").exists()
    code, out = cli("inject", world / "base", "-t", "c_attn", "-o", tmp_path / "empty")  # new or empty: fine
    assert code == 0, out
    code, out = cli("inject", world / "base", "-t", "c_attn", "-r", "2", "-o", existing, "--force")
    assert code == 0 and json.loads((existing / "adapter_config.json").read_text())["r"] == 2, out


def test_a_model_dir_holding_an_adapter_is_refused(world, tmp_path):
    polluted = tmp_path / "polluted"
    shutil.copytree(world / "base", polluted)
    shutil.copy(world / "tuned" / "adapter_config.json", polluted)
    with pytest.raises(ModelFileError, match="holds adapter_config.json"):
        surgeon.load_model(str(polluted))


SIGNAL_CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from surgeon.cli import friendly
    from surgeon.outputs import write_dir_atomically

    @friendly
    def job():
        def fill(tmp):
            (tmp / "part.bin").write_bytes(b"x" * 100_000)
            os.kill(os.getpid(), getattr(signal, sys.argv[2]))
            raise AssertionError("the signal did not stop the write")
        write_dir_atomically(Path(sys.argv[1]), fill)

    job()
""")


def test_sigterm_leaves_nothing_and_kill_9_is_swept_next_time(world, tmp_path):
    out = tmp_path / "x" / "e"
    term = subprocess.run([sys.executable, "-c", SIGNAL_CHILD, str(out), "SIGTERM"], capture_output=True, text=True,
                          env=ENV)
    assert term.returncode == 128 + signal.SIGTERM and "terminated (SIGTERM)" in term.stderr, term.stderr
    assert list((tmp_path / "x").iterdir()) == []
    killed = subprocess.run([sys.executable, "-c", SIGNAL_CHILD, str(out), "SIGKILL"], capture_output=True, env=ENV)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in (tmp_path / "x").iterdir()]
    assert len(left) == 1 and left[0].startswith(".e.tmp-")  # what kill -9 leaves
    code, text = cli("export", world / "base", world / "tuned", "-o", out)
    assert code == 0 and "surgeon: note: removed 1 temporary directory left by an interrupted earlier write" in text, text
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["e"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_modes_follow_the_umask(world, tmp_path, mask):
    old = os.umask(mask)
    try:
        code, out = cli("inject", world / "base", "-t", "c_attn", "-o", tmp_path / "a")
    finally:
        os.umask(old)
    assert code == 0, out
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o777 & ~mask
    for f in (tmp_path / "a").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_a_float16_cast_that_overflows_is_refused(world, tmp_path):
    model = surgeon.PeftModel.from_pretrained(make_base("gpt2"), str(world / "tuned"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(1e5)  # scale 2 * B @ A: far beyond 65504
    model.save_pretrained(tmp_path / "huge")
    code, out = cli("fold", world / "base", tmp_path / "huge", "--dtype", "float16", "-o", tmp_path / "m")
    refused(code, out, "would become inf: transformer.h.0.attn.c_attn, transformer.h.1.attn.c_attn; largest")
    assert not (tmp_path / "m").exists()


# ---- bad input: configs and model directories ---------------------------------------------------------
CONFIG_CASES = {
    "bad regex target_modules": ({"target_modules": "(c_attn"}, "target_modules='(c_attn': not a valid regular"),
    "bad regex exclude_modules": ({"exclude_modules": "*attn"}, "exclude_modules='*attn': not a valid regular"),
    "bad regex rank_pattern": ({"rank_pattern": {"c_[attn": 2}}, "rank_pattern['c_[attn']: not a valid regular"),
    "rank_pattern wrong type": ({"rank_pattern": [["c_attn", 2]]}, "rank_pattern=[['c_attn', 2]]: must be a mapping"),
    "5000-digit r": ('"r": ' + "9" * 5000, "not valid JSON"),
    "deep nesting": ('"x": ' + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "r = 10**12": ({"r": 10 ** 12}, "at most 65536"),
    "lora_alpha NaN": ('"lora_alpha": NaN', "lora_alpha=nan: must be a finite positive number"),
    "lora_alpha Infinity": ('"lora_alpha": Infinity', "lora_alpha=inf: must be a finite positive number"),
    "r disagrees with the file": ({"r": 60000}, "rank 4 in the file, 60000 in the config"),
    "not utf-8": (b"\xff", "not UTF-8"),
}


@pytest.mark.parametrize("label", list(CONFIG_CASES))
def test_bad_adapter_configs_are_one_line_exit_2(world, tmp_path, label):
    change, needle = CONFIG_CASES[label]
    bad = tmp_path / "bad"
    shutil.copytree(world / "tuned", bad)
    config_path = bad / "adapter_config.json"
    if isinstance(change, dict):
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    elif isinstance(change, bytes):
        config_path.write_bytes(config_path.read_bytes()[:-2] + change + b"}")
    else:
        config_path.write_text(config_path.read_text().rstrip()[:-1].rstrip() + ", " + change + "}")
    refused(*cli("inspect", bad), needle)
    with pytest.raises((ConfigError, AdapterError)):
        surgeon.PeftModel.from_pretrained(make_base("gpt2"), str(bad))


def test_a_config_override_is_checked_against_the_file_before_allocating(world):
    with pytest.raises(AdapterError, match="rank 4 in the file, 60000 in the config"):
        surgeon.PeftModel.from_pretrained(make_base("gpt2"), str(world / "tuned"),
                                          config=surgeon.LoraConfig(r=60000, target_modules=["c_attn"]))


BASE_CASES = {
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:4096]),
                          "model.safetensors: not a readable safetensors file"),
    "bad config.json": (lambda d: (d / "config.json").write_text("{ nope"), "config.json: not valid JSON"),
    "no weight file": (lambda d: (d / "model.safetensors").rename(d / "weights.safetensors"),
                       "no model.safetensors (or model.safetensors.index.json); found weights.safetensors"),
    "adapter files in the model dir": (lambda d: shutil.copy(d.parent.parent / "tuned" / "adapter_config.json", d),
                                       "holds adapter_config.json"),
}


@pytest.mark.parametrize("label", list(BASE_CASES))
def test_bad_model_directories_are_one_line_exit_2(world, tmp_path, label):
    breaking, needle = BASE_CASES[label]
    base = world / "cases" / label.replace(" ", "-")
    shutil.copytree(world / "base", base)
    breaking(base)
    refused(*cli("inject", base, "-t", "c_attn", "--dry-run"), needle)
    refused(*cli("fold", base, world / "tuned", "-o", tmp_path / "m", "--bits", "4"), needle)  # the quantized loader


# ---- bad input: command-line numbers and generation arguments ---------------------------------------
@pytest.mark.parametrize("args,needle", [
    (("train", "--seq-len", "0"), "'--seq-len': 0 is not in the range x>=2"),
    (("train", "--batch-size", "0"), "'--batch-size': 0 is not in the range x>=1"),
    (("train", "--lr", "nan"), "'--lr': nan: give a finite number > 0"),
    (("train", "--steps", "-5"), "'--steps': -5 is not in the range x>=1"),
    (("inject", "tiny-gpt2", "-r", "99999999999", "--dry-run"), "99999999999 is not in the range 1<=x<=65536"),
    (("inject", "tiny-gpt2", "--alpha", "inf", "--dry-run"), "'--alpha': inf: give a finite number > 0"),
    (("generate", "tiny-gpt2", "-p", ""), "the prompt is empty"),
    (("generate", "tiny-gpt2", "-p", "At dawn", "--sample", "--top-p", "-0.5"), "top_p=-0.5: give a number in [0, 1]"),
    (("generate", "tiny-gpt2", "-p", "At dawn", "--sample", "--top-k", "-1"), "top_k=-1: give an integer >= 0"),
    (("generate", "tiny-gpt2", "-p", "At dawn", "--sample", "--temperature", "nan"), "temperature=nan: give a finite"),
    (("fold", "tiny-gpt2", "x", "-o", "y", "--weights", "1,nan"), "give finite numbers separated by commas"),
])
def test_bad_numbers_are_one_line_exit_2(tmp_path, args, needle):
    refused(*cli(*args, *(("-o", tmp_path / "o") if args[0] == "train" else ())), needle)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def decoder(world):
    """A KV-cache export and its surgeon model, for the generation arguments of both paths."""
    model = surgeon.PeftModel.from_pretrained(make_base("gpt2"), str(world / "tuned")).eval()
    out = export_onnx(model, world / "kv", kv_cache=True)
    return model, AdapterSession(out)


@pytest.mark.parametrize("settings,needle", [
    ({"do_sample": True, "top_p": -0.1}, "top_p=-0.1"), ({"do_sample": True, "top_k": -3}, "top_k=-3"),
    ({"do_sample": True, "temperature": float("nan")}, "temperature=nan"),
    ({"do_sample": True, "temperature": 0.0}, "temperature=0.0"), ({"ids": [[5, -2, 7]]}, "input_ids[0, 1] = -2"),
    ({"ids": [[5, 96]]}, "input_ids[0, 1] = 96 is not a token id [0, 96)"),
])
def test_generation_arguments_are_checked_the_same_in_torch_and_onnx_runtime(decoder, settings, needle):
    model, session = decoder
    settings = dict(settings)
    ids = np.array(settings.pop("ids", [[5, 6, 7]]))
    with pytest.raises(GenerationArgumentError, match=None) as in_ort:
        session.generate(ids, max_new_tokens=2, **settings)
    with pytest.raises(GenerationArgumentError, match=None) as in_torch:
        model.generate(input_ids=torch.from_numpy(ids), max_new_tokens=2, pad_token_id=0, **settings)
    assert needle in str(in_ort.value) and needle in str(in_torch.value)


def test_top_p_zero_keeps_the_most_likely_token_as_in_transformers(decoder):
    model, session = decoder
    ids = np.array([[5, 6, 7, 8]])
    greedy = session.generate(ids, max_new_tokens=5)
    assert np.array_equal(session.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.0, seed=3), greedy)
    with torch.no_grad():
        sampled = model.generate(input_ids=torch.from_numpy(ids), max_new_tokens=5, do_sample=True, top_p=0.0,
                                 pad_token_id=0)
    assert np.array_equal(sampled.numpy(), greedy)


def test_generate_on_a_broken_export_is_exit_2(world, decoder, tmp_path):
    out = tmp_path / "kv"
    shutil.copytree(world / "kv", out)
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes()[:3000])
    refused(*cli("generate", out, "-p", "At dawn"), "ONNX Runtime cannot load it")
