"""An export's ``manifest.json``: read and checked (fields, types, paths inside the export), and file digests.

No torch here: the ONNX Runtime side (``AdapterSession``, ``surgeon check``) reads exports through this.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from surgeon.errors import AdapterFileError, ExportFileError
from surgeon.jsonfile import read_json
from surgeon.names import MANIFEST


def read_manifest(out_dir: str | Path) -> dict:
    """``manifest.json`` of an export, checked: valid UTF-8 JSON, the fields surgeon reads, paths inside the export."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise AdapterFileError(f"{out_dir}: no such export directory (one holding {MANIFEST}, written by `surgeon export`)")
    path = out_dir / MANIFEST
    if not path.is_file():
        raise AdapterFileError(f"{out_dir}: no {MANIFEST}; is this a `surgeon export` directory?")
    manifest = read_json(path, ExportFileError, "re-export")
    check_manifest(manifest, out_dir)
    return manifest


def _field(manifest: dict, name: str, kind: type, where: str, required: bool = True):
    if name not in manifest:
        if required:
            raise ExportFileError(f"{where}: field {name!r} is missing; re-export with `surgeon export`")
        return None
    value = manifest[name]
    if not isinstance(value, kind):
        raise ExportFileError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}; re-export")
    return value


def check_manifest(manifest: object, out_dir: Path) -> None:
    """The fields readers use have their types, and every path it names resolves inside ``out_dir``."""
    where = str(out_dir / MANIFEST)
    if not isinstance(manifest, dict):
        raise ExportFileError(f"{where}: must hold a JSON object, got {type(manifest).__name__}; re-export")
    export_path(out_dir, _field(manifest, "model", str, where), f"{where}: 'model'")
    for name, entry in (_field(manifest, "adapters", dict, where, required=False) or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ExportFileError(f"{where}: adapters[{name!r}] needs a 'file' string; re-export")
        export_path(out_dir, entry["file"], f"{where}: adapters[{name!r}].file")
    for i, entry in enumerate(_field(manifest, "lora_inputs", list, where, required=False) or []):
        names = ("path", "ia3") if isinstance(entry, dict) and "ia3" in entry else ("path", "a", "b")
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in names)
                and all(isinstance(entry.get(k), int) and entry[k] > 0 for k in ("in", "out"))):
            raise ExportFileError(f"{where}: lora_inputs[{i}] needs path/a/b names and positive in/out sizes; re-export")
    for rel in _field(manifest, "files", dict, where, required=False) or {}:
        export_path(out_dir, rel, f"{where}: files[{rel!r}]")
    _field(manifest, "source", dict, where, required=False)
    if manifest.get("kv_cache"):
        facts = _field(manifest, "generation", dict, where)
        layers = facts.get("layers")
        if not isinstance(layers, int) or layers <= 0 or not all(
                isinstance(facts.get(k), list) and len(facts[k]) == layers for k in ("kv_heads", "key_dim", "value_dim")):
            raise ExportFileError(f"{where}: generation needs 'layers' and per-layer kv_heads/key_dim/value_dim; re-export")


def export_path(out_dir: Path, rel: object, field: str) -> Path:
    """``out_dir / rel`` when ``rel`` is a relative path that stays inside ``out_dir``; otherwise an error."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ExportFileError(f"{field}: {rel!r} is not a file name")
    if Path(rel).is_absolute():
        raise ExportFileError(f"{field}: {rel!r} is an absolute path; an export names its files relative to itself")
    root = Path(os.path.realpath(out_dir))
    target = Path(os.path.realpath(root / rel))
    if not target.is_relative_to(root) or target == root:
        raise ExportFileError(f"{field}: {rel!r} resolves outside the export ({target}); an export only reads "
                              "files inside its own directory")
    return out_dir / rel


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changed_files(out_dir: Path, manifest: dict) -> list[str]:
    """Each file the manifest lists whose sha256 differs or that is missing, as ``'name (why)'``."""
    problems = []
    for rel, want in sorted((manifest.get("files") or {}).items()):
        path = export_path(out_dir, rel, f"{out_dir / MANIFEST}: files[{rel!r}]")
        if not path.is_file():
            problems.append(f"{rel} (missing)")
        elif file_digest(path) != want:
            problems.append(f"{rel} (changed since export: sha256 differs)")
    return problems
