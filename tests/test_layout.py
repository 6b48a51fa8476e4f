"""The layout as rules: import contracts (pyproject's [tool.importlinter]), no import cycles, imports at the top
of modules unless a comment says why, and the CLI and the ONNX Runtime side importable without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "surgeon"


def test_import_contracts_hold():
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_catch_an_upward_import(tmp_path):
    """The contract is not vacuous: in a copy of the package, a bottom-layer module importing the model is reported."""
    import os
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "surgeon", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (tmp_path / "surgeon" / "names.py").write_text((PACKAGE / "names.py").read_text() + "\nimport surgeon.model\n")
    config = tmp_path / "contracts.toml"
    config.write_text((ROOT / "pyproject.toml").read_text())
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # ahead of the editable install's finder
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--config", str(config), "--no-cache"],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode != 0 and "surgeon.names -> surgeon.model" in result.stdout, result.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("surgeon", cache_dir=None)
    cycles = sorted({tuple(sorted((m, imp))) for m in graph.modules for imp in graph.find_modules_directly_imported_by(m)
                     if imp.startswith("surgeon") and graph.chain_exists(importer=imp, imported=m)})
    assert not cycles


def _deferred_imports(path: Path) -> list[str]:
    """Imports inside functions with no ``deferred:`` comment on or just above them."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    near = " ".join(lines[max(0, sub.lineno - 3): sub.lineno])
                    if "deferred" not in near:
                        found.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {lines[sub.lineno - 1].strip()}")
    return found


def test_imports_sit_at_the_top_unless_a_comment_says_why():
    # The CLI's commands import their stage inside the command (its module docstring says why: --help without torch).
    files = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "cli" / "commands.py"]
    offenders = [line for p in files for line in _deferred_imports(p)]
    assert not offenders


@pytest.mark.parametrize("module", ["surgeon.cli", "surgeon.onnx.runtime", "surgeon.names", "surgeon.config"])
def test_light_modules_do_not_load_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 330}, "split these files (the rule is ~300 lines)"
