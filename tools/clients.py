"""Environments for the clients that open our exports but cannot share surgeon's venv.

    python3 tools/clients.py ensure genai      # .venv-genai from tools/clients/genai.lock (kept while the lock is unchanged)
    python3 tools/clients.py ensure optimum    # .venv-optimum: CPU torch, then tools/clients/optimum.lock
    python3 tools/clients.py lock genai        # re-resolve the newest releases of the client's top packages

onnxruntime-genai requires the ``onnxruntime`` package, which replaces ``onnxruntime-gpu``'s files in one
environment; optimum-onnx pins transformers below 4.58. Each gets its own venv, installed from its lock file, and
tests drive it in a subprocess (``tests/conftest.py::client_python``). ``ensure`` prints the venv's python and is
safe to call from several pytest workers at once (a file lock: the venv is built once; its stamp, holding the
lock file's sha256, is written last, so an interrupted build is redone). Exit codes: 0 ready, 2 the environment could not be built.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "tools" / "clients"
TORCH = "torch==2.13.0"  # the CPU build on this machine's disk (a newer torch from the index is a CUDA build)
CLIENTS = {  # name -> (top-level requirements the lock is resolved from, needs torch)
    "genai": (["onnxruntime-genai"], False),
    "optimum": (["optimum-onnx[onnxruntime]"], True),
}
STAMP = ".installed-from-lock"


def venv_dir(name: str) -> Path:
    return ROOT / f".venv-{name}"


def lock_file(name: str) -> Path:
    return LOCKS / f"{name}.lock"


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "--quiet", "--disable-pip-version-check", *args],
                          stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode:
        raise SystemExit(f"clients: pip {' '.join(args)} failed (exit {proc.returncode})")


def _build(name: str, target: Path, requirements: list[str]) -> None:
    """A fresh venv at ``target`` with ``requirements`` (pip arguments), checked with ``pip check``."""
    if target.exists():
        shutil.rmtree(target)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    python = target / "bin" / "python"
    if CLIENTS[name][1]:
        _pip(python, "install", TORCH)
    _pip(python, "install", *requirements)
    _pip(python, "check")


def ensure(name: str) -> Path:
    """The python of client ``name``'s venv, built from its lock file when missing or older than the lock."""
    lock = lock_file(name)
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    venv = venv_dir(name)
    python = venv / "bin" / "python"
    with open(ROOT / f".venv-{name}.lock-file", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # a second pytest worker waits here, then finds the venv made
        stamp = venv / STAMP
        if stamp.is_file() and stamp.read_text().strip() == digest and python.is_file():
            return python
        print(f"clients: building {venv.name} from {lock.relative_to(ROOT)}", file=sys.stderr)
        _build(name, venv, ["--no-deps", "-r", str(lock)])
        stamp.write_text(digest + "\n")  # last: an interrupted build has no stamp and is built again
        return python


def lock(name: str) -> None:
    """Resolve the newest releases of the client's top packages in a scratch venv and write its lock file."""
    scratch = ROOT / f".venv-{name}-lock"
    _build(name, scratch, CLIENTS[name][0])
    frozen = subprocess.run([str(scratch / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    lines = [line for line in frozen if not line.lower().startswith("torch==")]
    header = [f"# {name}'s own environment, resolved from {' '.join(CLIENTS[name][0])} on {datetime.date.today()}.",
              f"# Made by: python3 tools/clients.py lock {name}" + ("; torch==2.13.0 (CPU) is installed first."
                                                                    if CLIENTS[name][1] else "")]
    lock_file(name).write_text("\n".join(header + lines) + "\n")
    shutil.rmtree(scratch)
    print(f"wrote {lock_file(name).relative_to(ROOT)} ({len(lines)} packages)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["ensure", "lock"])
    parser.add_argument("client", choices=[*CLIENTS, "all"])
    args = parser.parse_args(argv)
    for name in CLIENTS if args.client == "all" else [args.client]:
        try:
            if args.action == "ensure":
                print(ensure(name))
            else:
                lock(name)
        except (SystemExit, subprocess.CalledProcessError, OSError) as err:
            print(f"clients: {name}: the environment could not be built: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
