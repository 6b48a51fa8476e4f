"""The command line: tables, files written, and one-line errors with exit status 1 and nothing written."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from click.testing import CliRunner

from surgeon.cli import main
from tests.conftest import make_base


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2-base")
    make_base("gpt2").save_pretrained(d)
    return d


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_inject_dry_run_prints_table_and_count(model_dir, tmp_path):
    code, out = run("inject", model_dir, "-t", "c_attn", "-r", "4", "--dry-run", "-o", tmp_path / "x")
    assert code == 0, out
    rows = [line.split() for line in out.splitlines()]
    assert ["transformer.h.0.attn.c_attn", "conv1d", "32", "96", "4", "16", "LoRA"] in rows
    assert "skipped: not in target_modules" in out and "trainable params: 1,024 ||" in out
    assert not (tmp_path / "x").exists()


def test_inject_writes_an_adapter_peft_loads(model_dir, tmp_path):
    code, out = run("inject", model_dir, "-t", "c_attn", "-t", "c_fc", "-o", tmp_path / "init")
    assert code == 0, out
    config = json.loads((tmp_path / "init" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir) and set(config["target_modules"]) == {"c_attn", "c_fc"}
    loaded = peft.PeftModel.from_pretrained(make_base("gpt2"), str(tmp_path / "init"))
    assert sum("lora_A" in n for n, _ in loaded.named_parameters()) == 4


@pytest.mark.parametrize("args,needle", [
    (("-t", "q_attn", "-t", "v_attn"), "'q_attn' (nearest: c_attn)"),
    (("-t", "attn"), "GPT2Attention"),
    (("-t", "c_attn", "-r", "0"), "0 is not in the range 1<=x<=65536"),
    (("-t", "c_attn", "--dropout", "1.5"), "1.5: give a finite number >= 0 and < 1"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(model_dir, tmp_path, args, needle):
    code, out = run("inject", model_dir, *args, "-o", tmp_path / "out")
    assert code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("surgeon: error:") and needle in lines[0], out
    assert "Traceback" not in out and not (tmp_path / "out").exists()


def test_unknown_model_suggests_builtin(tmp_path):
    code, out = run("inject", "tiny-gtp2", "--dry-run")
    assert code == 2 and "did you mean 'tiny-gpt2'" in out


def test_train_builtin_on_bundled_text_writes_adapter(tmp_path):
    code, out = run("train", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "-o", tmp_path / "adapter")
    assert code == 0, out
    assert "held-out loss:" in out and "trainable params:" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_train_own_model_and_text(tmp_path):
    import shutil

    from surgeon.hub import model_dir as builtin_dir

    shutil.copytree(builtin_dir("tiny-gpt2"), tmp_path / "mine")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    code, out = run("train", tmp_path / "mine", "--data", text, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                    "-t", "c_attn", "-o", tmp_path / "a")
    assert code == 0, out
    assert "held-out blocks" in out


def test_train_tokenizer_that_does_not_fit_the_model(model_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from surgeon.hub import model_dir as builtin_dir

    PreTrainedTokenizerFast.from_pretrained(builtin_dir("tiny-gpt2")).save_pretrained(model_dir)  # vocab > 96
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    code, out = run("train", model_dir, "--data", text, "--steps", "2", "--seq-len", "16", "-o", tmp_path / "a")
    assert code == 2 and "vocab_size is 96" in out and not (tmp_path / "a").exists()


def test_train_missing_data_file(tmp_path):
    code, out = run("train", "--data", tmp_path / "none.txt", "-o", tmp_path / "a")
    assert code == 2 and "none.txt: no such data file" in out


def test_inspect(tmp_path):
    import surgeon

    torch.manual_seed(0)
    m = surgeon.get_peft_model(make_base("gpt2"), surgeon.LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    m.save_pretrained(tmp_path / "a")
    code, out = run("inspect", tmp_path / "a")
    assert code == 0 and ["transformer.h.1.attn.c_attn", "8", "8", "1"] in [line.split()[:4] for line in out.splitlines()]
    assert "bytes" in out
    code, out = run("inspect", tmp_path / "missing")
    assert code == 2 and "no such adapter directory" in out
