"""What an export directory holds besides the traced graph: named dims and rank-0 defaults in ``model.onnx``,
one ``.onnx_adapter`` per adapter, and ``manifest.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from surgeon.capturing.decoder import context_length
from surgeon.names import (
    ADAPTER_DIR,
    ADAPTER_IDS,
    BANK_FILE,
    LOGITS,
    MANIFEST,
    MANIFEST_FORMAT,
    MODEL_FILE,
    PROMPT_KEY,
    adapter_file,
    onnx_dora_name,
    onnx_input_names,
    present_names,
)
from surgeon.onnx.manifest import file_digest
from surgeon.passes.inputs import LoraInput, adapter_tensors

EXTERNAL_DATA_BYTES = 1 << 30  # above this much weight, write model.onnx.data beside model.onnx


def save_model(program, path: Path, loras: tuple[LoraInput, ...], base, kv_layers: int = 0, bank: bool = False) -> None:
    """Save, then name the rank dims ``lora_r`` (and the cache dims) and add the rank-0 default initializers.

    A bank's adapter inputs are [adapter_slots, in, lora_r] / [adapter_slots, lora_r, out] with one-slot rank-0
    defaults, and ``adapter_ids`` defaults to ``[0]`` (every row slot 0), so a plain run is the base model."""
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    proto = onnx.load(str(path), load_external_data=False)
    lora_names = {n for lo in loras for n in lo.names}
    for value in proto.graph.input:
        if value.name in lora_names:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = "adapter_slots" if dim.dim_param == "adapter_slots" else "lora_r"
    if kv_layers:
        _name_cache_dims(proto, kv_layers)
    slot = [1] if bank else []
    for lo in loras:
        if lo.ia3:  # ones: the base weight as it is
            proto.graph.initializer.append(helper.make_tensor(lo.names[0], TensorProto.FLOAT, slot + [lo.ia3_size],
                                                              [1.0] * lo.ia3_size))
            continue
        name_a, name_b = onnx_input_names(lo.path)
        proto.graph.initializer.append(helper.make_tensor(name_a, TensorProto.FLOAT, slot + [lo.in_features, 0], []))
        proto.graph.initializer.append(helper.make_tensor(name_b, TensorProto.FLOAT, slot + [0, lo.out_features], []))
        if lo.dora:  # g = 1: the base weight's own scale
            proto.graph.initializer.append(helper.make_tensor(onnx_dora_name(lo.path), TensorProto.FLOAT,
                                                              slot + [lo.out_features], [1.0] * lo.out_features))
    if bank:
        _broadcast_adapter_ids(proto)
        proto.graph.initializer.append(helper.make_tensor(ADAPTER_IDS, TensorProto.INT64, [1], [0]))
    onnx.save(proto, str(path))


def _broadcast_adapter_ids(proto) -> None:
    """Let ``adapter_ids`` be [1] (its default: that slot for every row) as well as [batch]: the graph reads
    ``Expand(adapter_ids, [batch])``. The exporter derives the batch size from whichever input has it, so without
    this a one-element ``adapter_ids`` would shrink the batch."""
    rows = f"{ADAPTER_IDS}.rows"
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name == ADAPTER_IDS:
                node.input[i] = rows
    first = proto.graph.input[0].name  # input_ids: [batch, sequence]
    head = [helper.make_node("Shape", [first], [f"{rows}.batch"], start=0, end=1),
            helper.make_node("Expand", [ADAPTER_IDS, f"{rows}.batch"], [rows])]
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(head + nodes)


def _name_cache_dims(proto, layers: int) -> None:
    """Readable dims: ``total_sequence`` for the mask's length and the presents' length."""
    values = {v.name: v for v in list(proto.graph.input) + list(proto.graph.output)}

    def name(value_name: str, axis: int, label: str) -> None:
        dim = values[value_name].type.tensor_type.shape.dim[axis]
        dim.ClearField("dim_value")
        dim.dim_param = label

    name("attention_mask", 1, "total_sequence")
    name(LOGITS, 0, "batch")
    name(LOGITS, 1, "sequence")
    for n in present_names(layers):
        name(n, 0, "batch")
        name(n, 2, "total_sequence")


def write_adapter_file(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` as an ``.onnx_adapter`` (ONNX Runtime's format) at ``path``."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    fmt.set_parameters(values)  # it keeps pointers, not the arrays: ``values`` must outlive the export
    fmt.export_adapter(str(path))
    del values


def stack_slots(parts: list[tuple[np.ndarray, np.ndarray] | None], in_features: int,
                out_features: int) -> tuple[np.ndarray, np.ndarray]:
    """One target's bank: slot k holds ``parts[k]`` (A [in, r_k], B [r_k, out]; None: zeros), every rank zero-padded
    to the largest (exact). Returns A [slots, in, R], B [slots, R, out]."""
    rank = max([a.shape[1] for a, _ in filter(None, parts)] or [0])
    a_bank = np.zeros((len(parts), in_features, rank), np.float32)
    b_bank = np.zeros((len(parts), rank, out_features), np.float32)
    for slot, part in enumerate(parts):
        if part is not None:
            a, b = part
            a_bank[slot, :, : a.shape[1]] = a
            b_bank[slot, : b.shape[0]] = b
    return a_bank, b_bank


def write_bank(model, names: list[str], loras: tuple[LoraInput, ...], out: Path, rename: dict[str, str]) -> dict:
    """``adapters/bank.onnx_adapter``: per target A [slots, in, R] and B [slots, R, out], slot 0 zeros (the base),
    slot k the k-th adapter (scale in B), every rank zero-padded to the target's largest (exact); targets an adapter
    lacks are zeros in its slot. Returns the manifest's ``bank`` entry."""
    layers = {layer.path: layer for layer in model.adapter_state.lora_layers() + model.adapter_state.ia3_layers()}
    arrays, ranks = {}, {}
    for lo in loras:
        layer = layers[lo.path]
        parts = [None] + [adapter_tensors(layer, n, _base_weight(model, lo)) if n in layer.adapters else None
                          for n in names]
        if lo.ia3 or lo.dora:  # slot 0 and adapters without a vector there: ones, the base
            size = lo.ia3_size if lo.ia3 else lo.out_features
            arrays[lo.names[-1]] = np.stack([p[-1].numpy() if p is not None and len(p) in (1, 3) else np.ones(size,
                                             np.float32) for p in parts])
        if lo.ia3:
            continue
        name_a, name_b = onnx_input_names(lo.path)
        arrays[name_a], arrays[name_b] = stack_slots([p and (p[0].numpy(), p[1].numpy()) for p in parts],
                                                     lo.in_features, lo.out_features)
        ranks[lo.path] = arrays[name_a].shape[2]
    write_adapter_file(out / BANK_FILE, arrays)
    return {"file": BANK_FILE, "input": ADAPTER_IDS, "slots": [None] + [rename.get(n, n) for n in names],
            "ranks": ranks}


def write_adapters(model, names: list[str], loras: tuple[LoraInput, ...], out: Path,
                   rename: dict[str, str], bank: bool = False) -> dict[str, dict]:
    """One ``.onnx_adapter`` per adapter (ONNX Runtime's format) under ``out``; returns manifest entries.

    For a bank graph each file is a one-slot bank (A [1, in, r], B [1, r, out]): active alone, every row runs it."""
    (out / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
    layers = {layer.path: layer for layer in model.adapter_state.lora_layers() + model.adapter_state.ia3_layers()}
    written = {}
    prompts = model.adapter_state.prompts()
    for name in names:
        params, targets, ranks = {}, [], set()
        if prompts is not None and name in prompts.adapters:  # prompt tuning: the virtual tokens [n, dim]
            params[PROMPT_KEY] = prompts.adapters[name].detach().float().contiguous().numpy()
        for lo in loras:
            layer = layers[lo.path]
            if name not in layer.adapters:
                continue  # that module keeps its rank-0 default: no change there
            if lo.ia3:
                vector = adapter_tensors(layer, name)[0]
                params[lo.names[0]] = (vector[None] if bank else vector).numpy()  # a bank's file: one slot
                targets.append(lo.path)
                continue
            a, b, *g = adapter_tensors(layer, name, _base_weight(model, lo))
            if bank:
                a, b, g = a.unsqueeze(0), b.unsqueeze(0), [t.unsqueeze(0) for t in g]
            name_a, name_b = onnx_input_names(lo.path)
            params[name_a], params[name_b] = a.numpy(), b.numpy()
            if g:
                params[onnx_dora_name(lo.path)] = g[0].numpy()
            targets.append(lo.path)
            ranks.add(a.shape[-1])
        shown = rename.get(name, name)
        write_adapter_file(out / adapter_file(shown), params)
        written[shown] = {"file": adapter_file(shown), "targets": targets, "ranks": sorted(ranks),
                          "config": model.peft_config[name].to_peft_dict()}
    return written


def _base_weight(model, lo: LoraInput):
    """The float base weight at a DoRA site (what its ``g`` is taken against); None elsewhere."""
    return model.base.get_submodule(lo.path).weight if lo.dora else None


def generation_facts(base, layout) -> dict[str, Any]:
    """What ``AdapterSession.generate`` needs besides the graph: cache shapes, special tokens, context length."""
    config = base.config
    gen = getattr(base, "generation_config", None)

    def ids(value):
        if value is None:
            return []
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]

    eos = ids(getattr(gen, "eos_token_id", None)) or ids(getattr(config, "eos_token_id", None))
    pad = ids(getattr(gen, "pad_token_id", None)) or ids(getattr(config, "pad_token_id", None))
    return {"layers": layout.layers, "kv_heads": list(layout.key_heads), "key_dim": list(layout.key_dims),
            "value_dim": list(layout.value_dims), "cache_dtype": str(layout.dtype).removeprefix("torch."),
            "eos_token_id": eos, "pad_token_id": pad[0] if pad else None, "context_length": context_length(base),
            "vocab_size": int(getattr(config, "vocab_size", 0) or 0) or None,
            "bos_token_id": (ids(getattr(gen, "bos_token_id", None)) or ids(getattr(config, "bos_token_id", None))
                             or [None])[0],
            "attention_heads": getattr(config, "num_attention_heads", None),
            "hidden_size": getattr(config, "hidden_size", None)}


def _input_entry(lo: LoraInput) -> dict:
    """The manifest's record of one adapted module's inputs."""
    entry = {"path": lo.path, "kind": lo.kind, "in": lo.in_features, "out": lo.out_features}
    if lo.ia3:
        return {**entry, "ia3": lo.names[0], "scales": lo.ia3}
    return {**entry, "a": onnx_input_names(lo.path)[0], "b": onnx_input_names(lo.path)[1],
            **({"dora": onnx_dora_name(lo.path)} if lo.dora else {})}


def _describe(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        out.append({"name": v.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(),
                    "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
    return out


def write_manifest(directory: Path, model, loras, adapters: dict, *, merged: str | None, source: str | None,
                   tokenizer: bool, kv_cache: bool, extra: dict | None = None) -> None:
    proto = onnx.load(str(directory / MODEL_FILE), load_external_data=False)
    lora_names = {n for lo in loras for n in lo.names}
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": MODEL_FILE,
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "source": {"model": source, "class": type(model.base).__name__,
                   "model_type": getattr(model.base.config, "model_type", None)},
        "inputs": [v for v in _describe(proto.graph.input) if v["name"] not in lora_names],
        "outputs": _describe(proto.graph.output),
        "lora_inputs": [_input_entry(lo) for lo in loras],
        "adapters": adapters,
        "merged_adapter": merged,
        "kv_cache": kv_cache,
        "tokenizer": tokenizer,
        **(extra or {}),
        "files": {p.relative_to(directory).as_posix(): file_digest(p) for p in sorted(directory.rglob("*"))
                  if p.is_file() and p.name != MANIFEST},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
