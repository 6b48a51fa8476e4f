"""Grow an adapter bank without re-exporting its graph: ``add_to_bank`` appends a PEFT adapter as a new slot.

The bank's graph takes A [adapter_slots, in, lora_r] and B [adapter_slots, lora_r, out] with both dims free, so
a bank of any size and rank runs on the same ``model.onnx``: only ``adapters/bank.onnx_adapter`` is rewritten
(ranks zero-padded to the new largest), the adapter's own one-slot file is added, and the manifest records both.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from surgeon.adapters import check_name, read_adapter_dir
from surgeon.config import LoraConfig
from surgeon.errors import AdapterError, did_you_mean
from surgeon.names import MANIFEST, adapter_file, parse_peft_key
from surgeon.onnx.manifest import export_path, file_digest, read_manifest
from surgeon.onnx.writing import stack_slots, write_adapter_file
from surgeon.outputs import atomic_write_bytes


def _write_beside(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``arrays`` as an ``.onnx_adapter`` in a temporary file beside ``path``; returns it (rename it into place)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    write_adapter_file(Path(tmp), arrays)
    return Path(tmp)


def adapter_inputs(adapter_dir: str | os.PathLike, lora_inputs: list[dict], where: str) -> tuple[LoraConfig, dict]:
    """The config and ``path -> (A [in, r], B [r, out] * scale)`` of a PEFT adapter directory, checked against a
    bank's inputs."""
    config, tensors = read_adapter_dir(adapter_dir)
    known = {lo["path"]: lo for lo in lora_inputs}
    kind = "IA3" if any("ia3" in lo for lo in lora_inputs) else "LORA"
    if config.peft_type != kind:
        raise AdapterError(f"{adapter_dir}: a {config.peft_type} adapter, but {where} is a bank of {kind} adapters; "
                           "a bank holds one method")
    if config.use_dora:
        raise AdapterError(f"{adapter_dir}: a DoRA adapter's scale is taken against the base weights, which `bank "
                           "add` does not read; re-export the bank with this adapter among the others")
    if kind == "IA3":
        return config, _ia3_vectors(adapter_dir, tensors, known, where)
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        path, part = parse_peft_key(key)
        if part not in ("A", "B"):
            raise AdapterError(f"{adapter_dir}: {key} is a modules_to_save tensor; a bank holds LoRA A and B only "
                               "(serve that adapter from its own export)")
        if path not in known:
            raise AdapterError(f"{adapter_dir}: it targets {path}{did_you_mean(path, known)}, which {where} has no "
                               "adapter input for; re-export the bank with this adapter among the others (a bank "
                               "covers the union of its adapters' targets)")
        parts.setdefault(path, {})[part] = value.detach().float().numpy()
    out = {}
    for path, ab in sorted(parts.items()):
        lo = known[path]
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{adapter_dir}: {path} has only lora_{next(iter(ab))}; the adapter file is incomplete")
        a, b = ab["A"], ab["B"]
        if a.shape[1] != lo["in"] or b.shape[0] != lo["out"] or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{adapter_dir}: {path} has A {list(a.shape)} and B {list(b.shape)}, but the bank's "
                               f"module is {lo['in']} -> {lo['out']}; this adapter is for another base model")
        out[path] = (a.T, b.T * config.scale_for(path))
    return config, out


def _ia3_vectors(adapter_dir, tensors: dict, known: dict, where: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tensors.items():
        path, part = parse_peft_key(key)
        lo = known.get(path)
        if part != "L" or lo is None:
            raise AdapterError(f"{adapter_dir}: {key} has no input in {where}{did_you_mean(path, known)}; re-export the "
                               "bank with this adapter among the others")
        vector = value.detach().float().flatten().numpy()
        size = lo["in"] if lo.get("scales") == "input" else lo["out"]
        if vector.shape[0] != size:
            raise AdapterError(f"{adapter_dir}: {key} holds {vector.shape[0]} values, the bank's module takes {size}; "
                               "this adapter is for another base model")
        out[path] = vector
    return out


def add_to_bank(export_dir: str | os.PathLike, adapter_dir: str | os.PathLike, name: str) -> dict:
    """Append the PEFT adapter in ``adapter_dir`` to the bank in ``export_dir`` as ``name`` (its new slot).

    ``model.onnx`` is not touched. Files are written beside their targets and renamed into place, the manifest last.
    Returns the manifest's new bank entry.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    bank = manifest.get("bank")
    if not bank:
        raise AdapterError(f"{export_dir}: not an adapter bank; export one with `surgeon export MODEL ADAPTER_DIR... "
                           "-o OUT --bank`")
    check_name(name, "adapter name (its .onnx_adapter file name)")
    if name in manifest.get("adapters", {}) or name == "bank":
        raise AdapterError(f"{export_dir}: an adapter named {name!r} is in the bank already; pick another --name")
    config, new = adapter_inputs(adapter_dir, manifest["lora_inputs"], str(export_dir))
    bank_path = export_path(export_dir, bank["file"], "bank.file")
    held = ort.AdapterFormat.read_adapter(str(bank_path))
    stacked = {k: np.array(v.numpy()) for k, v in held.get_parameters().items()}
    del held
    grown, own, ranks = {}, {}, {}
    for lo in manifest["lora_inputs"]:
        if "ia3" in lo:  # a vector per slot; where the adapter has none, ones (the base)
            vector = new.get(lo["path"])
            fill = vector if vector is not None else np.ones(stacked[lo["ia3"]].shape[1], np.float32)
            grown[lo["ia3"]] = np.concatenate([stacked[lo["ia3"]], fill[None]])
            if vector is not None:
                own[lo["ia3"]] = vector[None]
            continue
        if "dora" in lo:  # a plain LoRA adapter in a DoRA bank: g = 1
            grown[lo["dora"]] = np.concatenate([stacked[lo["dora"]], np.ones((1, lo["out"]), np.float32)])
        a_bank, b_bank = stacked[lo["a"]], stacked[lo["b"]]
        slots = [(a_bank[k], b_bank[k]) for k in range(a_bank.shape[0])] + [new.get(lo["path"])]
        grown[lo["a"]], grown[lo["b"]] = stack_slots(slots, lo["in"], lo["out"])
        ranks[lo["path"]] = grown[lo["a"]].shape[2]
        if lo["path"] in new:
            own[lo["a"]], own[lo["b"]] = (t[None] for t in new[lo["path"]])
    own_path = export_dir / adapter_file(name)
    tmp_own, tmp_bank = _write_beside(own_path, own), _write_beside(bank_path, grown)
    entry = {**bank, "slots": [*bank["slots"], name], "ranks": ranks}
    manifest["bank"] = entry
    manifest["adapters"][name] = {"file": adapter_file(name), "targets": sorted(new),
                                  "ranks": sorted({v[0].shape[1] for v in new.values() if isinstance(v, tuple)}),
                                  "config": config.to_peft_dict()}
    manifest.setdefault("adapter_sources", {})[name] = str(Path(adapter_dir).resolve())
    os.replace(tmp_own, own_path)
    os.replace(tmp_bank, bank_path)
    manifest["files"][adapter_file(name)] = file_digest(own_path)
    manifest["files"][bank["file"]] = file_digest(bank_path)
    atomic_write_bytes(export_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return entry
