"""Data-parallel training with real processes: ``torchrun --nproc-per-node 2`` (gloo, CPU) over a surgeon model
wrapped in ``DistributedDataParallel``, and ``transformers.Trainer`` under torchrun and under ``accelerate launch``.
2 processes x 2 rows give the loss curve of 1 process x 4 rows within 1e-5 and the same adapter within 1e-6
(fp32, 10 AdamW steps); DDP synchronises the adapter tensors only (the frozen base is never broadcast or
reduced); ``save_pretrained`` writes once; a rank that raises ends the job, its error named."""

from __future__ import annotations

import json
import os
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
    outs = {k: tmp_path_factory.mktemp(k) for k in ("alone", "ddp", "trainer-torchrun", "trainer-accelerate")}
    _run([], outs["alone"])
    _run(TORCHRUN, outs["ddp"])
    _run(TORCHRUN, outs["trainer-torchrun"], "--trainer")
    _run(ACCELERATE, outs["trainer-accelerate"], "--trainer")
    return outs


@pytest.mark.parametrize("run", ["ddp", "trainer-torchrun", "trainer-accelerate"])
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


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    proc = _run(TORCHRUN, tmp_path, "--fail", ok=False)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose before its first step" in proc.stderr


@pytest.mark.parametrize("launcher,extra", [("torchrun", []), ("accelerate", ["--trainer"])])
def test_readme_commands_run_as_written(tmp_path, launcher, extra):
    example = Path(__file__).parent.parent / "examples" / "train_ddp.py"
    args = (TORCHRUN if launcher == "torchrun" else ACCELERATE) + [str(example), *extra, "--steps", "2",
                                                                   "--out", str(tmp_path / "out")]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": str(tmp_path)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file()) == ["adapter_config.json",
                                                                                  "adapter_model.safetensors"]
