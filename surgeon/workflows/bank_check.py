"""``surgeon check`` of an adapter bank: the stacked file holds exactly the adapters' own files, slot by slot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from surgeon.names import parse_onnx_input
from surgeon.onnx.manifest import export_path
from surgeon.onnx.runtime import AdapterSession


def bank_matches_adapters(out_dir: Path, manifest: dict, session: AdapterSession) -> tuple[bool, str]:
    """The bank file loads, slot 0 is the base (A, B zeros; DoRA's g and IA3's vectors ones), and slot k holds
    exactly adapter k's own file (the rest as slot 0)."""
    bank = manifest["bank"]
    try:
        session._bank_adapter()
        held = ort.AdapterFormat.read_adapter(str(export_path(out_dir, bank["file"], "bank.file")))
        tensors = {k: np.array(v.numpy()) for k, v in held.get_parameters().items()}
    except Exception as err:
        return False, " ".join(str(err).split())
    slots = bank.get("slots") or []
    bad = []
    for key, stacked in tensors.items():
        if stacked.shape[0] != len(slots):
            bad.append(f"{key}: {stacked.shape[0]} slots, the manifest names {len(slots)}")
            continue
        ones = (parse_onnx_input(key) or ("", ""))[1] in ("G", "L")  # a scale: the base's is one
        want = np.ones_like(stacked) if ones else np.zeros_like(stacked)
        for k, name in enumerate(slots):
            entry = manifest.get("adapters", {}).get(name) if name else None
            if entry:
                own = ort.AdapterFormat.read_adapter(str(export_path(out_dir, entry["file"], f"adapters[{name!r}]")))
                value = own.get_parameters().get(key)
                if value is not None:
                    part = np.array(value.numpy())[0]
                    want[k][tuple(slice(0, n) for n in part.shape)] = part
        if not np.array_equal(stacked, want):
            slot = next(k for k in range(len(slots)) if not np.array_equal(stacked[k], want[k]))
            bad.append(f"{key}: slot {slot} ({slots[slot] or 'the base'}) differs from "
                       f"{'the base' if slot == 0 else 'its adapter file'}")
    if bad:
        return False, f"{bank['file']}: {'; '.join(bad[:3])}; re-export the bank"
    return True, f"{bank['file']}: {len(slots) - 1} adapters in slots 1..{len(slots) - 1}, each equal to its own file"
