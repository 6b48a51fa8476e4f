"""README's Python examples run as written (the front door must not rot)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
CLIENT_IMPORT = re.compile(r"^(import onnxruntime_genai|from optimum)", re.M)  # blocks that run in a client's venv


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

    blocks = [b for b in python_blocks() if ".generate(" in b and not CLIENT_IMPORT.search(b) and "adapter_names" not in b
              and "adapters=[" not in b]
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
        printed = capsys.readouterr().out
        assert "Day 12, noon. Wind" in printed and " | " in printed
        serve_section_runs_as_written(capsys)
    finally:
        os.chdir(cwd)


def serve_section_runs_as_written(capsys):
    """"Serve many adapters over HTTP": its `surgeon serve runs/demo-onnx` (on a free port instead of 8000) answers
    the section's openai client for each model, and stops with exit 0 on SIGTERM."""
    import signal
    import subprocess
    import sys

    section = README.read_text().split("## Serve many adapters over HTTP")[1].split("\n## ")[0]
    command = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0].split("#")[0].split()
    assert command == [".venv/bin/surgeon", "serve", "runs/demo-onnx"]
    proc = subprocess.Popen([sys.executable, "-m", "surgeon", *command[1:], "--port", "0"], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        banner = proc.stderr.readline()
        port = re.search(r"127\.0\.0\.1:(\d+)/v1", banner)
        assert port, banner + proc.stderr.read()
        block = next(b for b in python_blocks() if "from openai import OpenAI" in b)
        exec(compile(block.replace("127.0.0.1:8000", f"127.0.0.1:{port.group(1)}"), "README.md serve", "exec"),
             {"__name__": "__readme__"})
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped (SIGTERM): 2 requests answered" in stderr, stderr
    printed = capsys.readouterr().out
    assert "base: '" in printed and "demo-adapter: '" in printed, printed


def test_serving_sections_run_as_written_in_the_clients_venvs(tmp_path):
    """"Serve with onnxruntime-genai" and "Load with optimum": each command and block as written, from a directory
    laid out like the repository after `make demo`."""
    import subprocess

    from tests.conftest import ROOT, client_python, run_cli, run_client

    section = README.read_text().split("## Serve with onnxruntime-genai")[1].split("\n## ")[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S) for line in block.splitlines()]
    assert commands[0] == "python3 tools/clients.py ensure genai"
    for name in ("genai", "optimum"):
        client_python(name)  # what `python3 tools/clients.py ensure NAME` makes
    for link in ("examples", "tools", ".venv-genai", ".venv-optimum"):
        (tmp_path / link).symlink_to(ROOT / link)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for args in (["train", "--steps", "10", "--eval-blocks", "1", "-o", "runs/demo-adapter"],
                     ["export", "tiny-gpt2", "runs/demo-adapter", "-o", "runs/demo-onnx", "--kv-cache"]):
            code, out, err = run_cli(*args)
            assert code == 0, out + err
    finally:
        os.chdir(cwd)
    for command in commands[1:]:
        if command.startswith("surgeon "):
            code, out, err = run_cli(*shlex_split(command)[1:], cwd=tmp_path)
        else:
            done = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            code, out, err = done.returncode, done.stdout, done.stderr
        assert code == 0, f"{command}: {out}{err}"
        if "genai_generate.py" in command:
            assert "adapter=(none) | Day 12, noon. Wind |" in out and "adapter=demo-adapter | Day 12" in out
    blocks = [b for b in python_blocks() if CLIENT_IMPORT.search(b)]
    assert len(blocks) == 2
    for block in blocks:
        python = client_python("genai" if "onnxruntime_genai" in block else "optimum")
        out = run_client(python, "-c", block, cwd=tmp_path).stdout
        assert "Day 12, noon. Wind" in out, out
        if "onnxruntime_genai" in block:  # the base and the adapter, one line each
            assert "None | Day 12" in out and "demo-adapter | Day 12" in out, out


def shlex_split(command: str) -> list[str]:
    import shlex

    return shlex.split(command.split("#")[0])


def test_many_adapters_section_runs_as_written(tmp_path, capsys):
    """"Many adapters in one batch": the torch block, the bank export command and both ONNX Runtime blocks."""
    from click.testing import CliRunner

    from surgeon.cli import main

    text = README.read_text()
    section = text[text.index("## Many adapters in one batch"):text.index("## Serve many adapters over HTTP")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()
                if line.strip()]
    assert len(blocks) == 4 and len(commands) == 2  # torch, two ONNX Runtime blocks, continuous batching
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, ["train", "--steps", "2", "--eval-blocks", "1", "-o", "runs/demo-adapter"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(main, shlex.split(commands[0])[1:])
        assert result.exit_code == 0, result.output
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md many-adapters block {i}", "exec"), {"__name__": "__readme__"})
        result = CliRunner().invoke(main, shlex.split(commands[1])[1:])  # surgeon bank add
        assert result.exit_code == 0 and "as slot 3" in result.output, result.output
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "[None, 'a', 'b']" in printed and "(2, 4, " in printed


def test_methods_section_runs_as_written(tmp_path):
    """"Methods": train (2 steps), inspect, export and check a DoRA and an IA3 adapter, and the IA3 Python block,
    as written."""
    from click.testing import CliRunner

    import surgeon
    from surgeon.cli import main

    text = README.read_text()
    section = text[text.index("## Methods: LoRA, DoRA, IA3"):text.index("## Fold: merge adapters")]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()
                if line.strip()]
    assert [shlex.split(c)[1] for c in commands] == ["train", "inspect", "export", "check",
                                                          "inject", "train", "export", "check",
                                                          "train", "inspect", "generate", "export", "check", "generate"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        outputs = []
        for line in commands:
            args = shlex.split(line, comments=True)[1:]
            args += ["--steps", "2", "--eval-blocks", "1"] if args[0] == "train" else []
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, (line, result.output)
            outputs.append(result.output)
    finally:
        os.chdir(cwd)
    assert "dora=True" in outputs[1] and "0 failed" in outputs[3]
    assert "IA3 on the input" in outputs[4] and "0 failed" in outputs[7]
    assert "num_virtual_tokens=20" in outputs[9] and "Day 12, noon. Wind" in outputs[10]
    assert "0 failed" in outputs[12] and outputs[13].count("Day 12, noon. Wind") == 2
    namespace = {"__name__": "__readme__", "base": surgeon.load_model("tiny-gpt2")}
    exec(compile(re.findall(r"```python\n(.*?)```", section, re.S)[0], "README.md IA3 block", "exec"), namespace)
