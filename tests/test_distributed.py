"""Data-parallel training with real processes: ``torchrun --nproc-per-node 2`` (gloo, CPU) over a surgeon model
wrapped in ``DistributedDataParallel``, and ``transformers.Trainer`` under torchrun and under ``accelerate launch``.
2 processes x 2 rows give the loss curve of 1 process x 4 rows within 1e-5 and the same adapter within 1e-6
(fp32, 10 AdamW steps); DDP synchronises the adapter tensors only (the frozen base is never broadcast or
reduced); ``save_pretrained`` writes once; a rank that raises ends the job, its error named. FSDP2 (``fully_shard``
over the whole model, gloo on CPU) gives the same and keeps half of every base tensor per rank; a shard on a
submodule is refused by name. ``torchrun -m surgeon train`` splits each batch over the processes and writes the
adapter a single process writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "distributed_worker.py"


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ACCELERATE = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # --multi_gpu: Accelerate's DDP launcher, gloo on CPU


def _run(args: list[str], out: Path, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args, str(WORKER), str(out), *extra], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HOME": str(out)})  # HOME: no user Accelerate config
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process x 4 rows (the reference; Trainer alone gives the same, checked once by hand: losses equal, adapter
    within 7e-7), and 2 processes x 2 rows: our own DDP loop under torchrun, Trainer under torchrun and under
    accelerate launch."""
    outs = {k: tmp_path_factory.mktemp(k) for k in ("alone", "ddp", "fsdp", "trainer-torchrun", "trainer-accelerate")}
    _run([], outs["alone"])
    _run(TORCHRUN, outs["ddp"])
    _run(TORCHRUN, outs["fsdp"], "--fsdp")
    _run(TORCHRUN, outs["trainer-torchrun"], "--trainer")
    _run(ACCELERATE, outs["trainer-accelerate"], "--trainer")
    return outs


@pytest.mark.parametrize("run", ["ddp", "fsdp", "trainer-torchrun", "trainer-accelerate"])
def test_two_processes_equal_one_with_the_whole_batch(runs, run):
    ref = json.loads((runs["alone"] / "rank0.json").read_text())
    for rank in (0, 1):
        got = json.loads((runs[run] / f"rank{rank}.json").read_text())
        assert len(got["losses"]) == 10 and max(abs(a - b) for a, b in zip(ref["losses"], got["losses"])) <= 1e-5
        # DDP synchronises exactly the adapter: 2 layers x q,v x A,B; none of the base's tensors
        assert got["synced"] == got["trainable"] and len(got["trainable"]) == 8 and got["base_params"] > 20
        assert got.get("wrapper", "DistributedDataParallel") == "DistributedDataParallel"
    a = load_file(runs["alone"] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs[run] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # save_pretrained wrote once: PEFT's two files, nothing else
    assert sorted(p.name for p in (runs[run] / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_fsdp_keeps_a_shard_of_every_base_tensor(runs):
    """Each rank holds half the rows of every base tensor between steps (dim 0 split over 2 ranks)."""
    full = {"model.embed_tokens.weight": 96, "model.layers.0.self_attn.q_proj.weight": 32}
    for rank in (0, 1):
        rows = json.loads((runs["fsdp"] / f"rank{rank}.json").read_text())["shard_rows"]
        assert len(rows) == json.loads((runs["fsdp"] / f"rank{rank}.json").read_text())["base_params"]
        assert all(rows[name] == n // 2 for name, n in full.items())


def test_fsdp_on_a_submodule_is_refused_by_name(tmp_path):
    proc = _run(TORCHRUN, tmp_path, "--fsdp", "--layers", ok=False)
    assert proc.returncode != 0
    assert "fully_shard was applied to 'base_model.model.model.layers.0' inside the surgeon model" in proc.stderr
    assert "fully_shard(model) alone" in proc.stderr


CLI = ["--steps", "4", "--dropout", "0", "--seq-len", "32", "--batch-size", "4", "--eval-blocks", "4"]


def _surgeon(launcher: list[str], out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *launcher, "-m", "surgeon", "train", *CLI, *args, "-o", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(out.parent)})


def test_cli_train_under_torchrun_equals_one_process(tmp_path):
    alone, two = _surgeon([], tmp_path / "alone"), _surgeon(TORCHRUN, tmp_path / "two")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "over 2 processes (2 rows of each batch)" in two.stdout
    for line in ("held-out loss", "wrote adapter to", "trainable params"):  # rank 0 speaks, once
        assert two.stdout.count(line) == 1, two.stdout
    assert two.stderr.count("?step/s]") == 1  # one progress bar (the line each bar prints when it starts)
    loss = [next(line for line in p.stdout.splitlines() if line.startswith("held-out")) for p in (alone, two)]
    assert loss[0] == loss[1]
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("alone", "two"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert (tmp_path / "alone" / "adapter_config.json").read_text() == (tmp_path / "two" / "adapter_config.json").read_text()


def test_a_batch_that_does_not_split_is_refused():
    from surgeon.errors import ConfigError
    from surgeon.workflows.processes import Ranks

    assert Ranks(1, 2).share(8, "--batch-size") == slice(4, 8)
    with pytest.raises(ConfigError, match="--batch-size=3 does not split evenly over 2 processes; give a multiple of 2"):
        Ranks(0, 2).share(3, "--batch-size")


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    proc = _run(TORCHRUN, tmp_path, "--fail", ok=False)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose before its first step" in proc.stderr


def _readme_commands() -> list[str]:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Training on several processes", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()


def test_readme_lists_these_commands():
    assert [c.split()[0] for c in _readme_commands()] == ["torchrun", "torchrun", "torchrun", "accelerate"]


def test_readme_cli_command_is_the_one_tested_above():
    words = _readme_commands()[0].split()
    assert words[:6] == ["torchrun", *TORCHRUN[2:], "-m", "surgeon"] and words[6] == "train"


@pytest.mark.parametrize("i", range(1, 4))  # the first, `torchrun ... -m surgeon train`, runs in the CLI test above
def test_readme_commands_run_as_written(tmp_path, i):
    """Each command of the README's section, as written but for 2 steps, its launcher run as a module (the venv's
    bin need not be on PATH) and OUT in an empty folder: it writes PEFT's two files there."""
    words = _readme_commands()[i].split()
    launcher = {"torchrun": ["-m", "torch.distributed.run"], "accelerate": ["-m", "accelerate.commands.launch"]}
    args = launcher[words[0]] + words[2 if words[0] == "accelerate" else 1:]
    root = Path(__file__).parent.parent
    args = [str(root / a) if a.startswith("examples/") else a if a != "30" else "2" for a in args]
    args += [] if "--steps" in args else ["--steps", "2"]
    out = tmp_path / args[(args.index("--out") if "--out" in args else args.index("-o")) + 1]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["adapter_config.json", "adapter_model.safetensors"]
