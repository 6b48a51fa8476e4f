"""README's Python examples run as written (the front door must not rot)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_as_written(tmp_path, capsys):
    quickstart = python_blocks()[0]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(quickstart, "README.md quickstart", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    documented = re.search(r"# (trainable params: .*?)   ", quickstart).group(1)
    assert documented in printed
    assert (tmp_path / "runs" / "quicktour" / "adapter_model.safetensors").is_file()


def test_example_deploy_switchable_runs(tmp_path):
    import subprocess
    import sys

    script = README.parent / "examples" / "deploy_switchable.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "2", "--out", str(tmp_path / "ex")],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "adapter=shiplog" in result.stdout and "adapter=(none)" in result.stdout


def test_generation_examples_run_as_written(tmp_path, capsys):
    from click.testing import CliRunner

    from surgeon.cli import main

    blocks = [b for b in python_blocks() if ".generate(" in b]
    assert len(blocks) == 2, "README's torch and ONNX Runtime generation examples"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for args in (["train", "--steps", "2", "--eval-blocks", "1", "-o", "runs/demo-adapter"],
                     ["export", "tiny-gpt2", "runs/demo-adapter", "-o", "runs/demo-onnx", "--kv-cache", "--force"]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
        namespace = {"__name__": "__readme__"}
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md generation example {i}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "Day 12, noon. Wind" in printed and " | " in printed
