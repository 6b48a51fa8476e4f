"""Merged checkpoints: base + adapters -> a directory ``AutoModelFor*.from_pretrained`` loads.

Written through ``surgeon.outputs.write_dir_atomically`` (a temporary directory beside OUT renamed
into place; never over an input); the base directory is only read.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from surgeon.adapters import read_adapter_dir
from surgeon.errors import ExportFileError, SurgeonError
from surgeon.hub import copy_tokenizer_files, model_dir
from surgeon.model import SurgeonModel
from surgeon.onnx.export import export_onnx
from surgeon.outputs import check_out, write_dir_atomically
from surgeon.quant import load_base, requantize_checkpoint


def load_with_adapters(model: str, adapter_dirs: Sequence[str], weights: Sequence[float] | None = None,
                       bits: int | None = None):
    """``(SurgeonModel, name)``: the base with each adapter, and the one to fold (a weighted sum when several)."""
    if not adapter_dirs:
        raise SurgeonError("fold needs at least one adapter directory")
    weights = list(weights) if weights else [1.0] * len(adapter_dirs)
    if len(weights) != len(adapter_dirs):
        raise SurgeonError(f"--weights has {len(weights)} values for {len(adapter_dirs)} adapters")
    first_config, _ = read_adapter_dir(adapter_dirs[0])
    task = first_config.task_type.value if first_config.task_type else None
    return with_adapters(load_base(model, bits, task=task), adapter_dirs, weights)


def with_adapters(base, adapter_dirs: Sequence[str], weights: Sequence[float]):
    """``(SurgeonModel, name)`` on ``base``: adapters ``a0``, ``a1``, ... and, when several or weighted, their exact
    weighted sum ``merged``, active. What fold writes and what check rebuilds from a fold's recipe."""
    weights = list(weights)
    peft_model = SurgeonModel.from_pretrained(base, adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], start=1):
        peft_model.load_adapter(d, adapter_name=f"a{i}")
    name = "a0"
    if len(adapter_dirs) > 1 or weights[0] != 1.0:
        name = "merged"
        peft_model.add_weighted_adapter([f"a{i}" for i in range(len(adapter_dirs))], weights, name)
    peft_model.set_adapter(name)
    return peft_model, name


def fold_checkpoint(model: str, adapter_dirs: Sequence[str], out: str | os.PathLike, *,
                    weights: Sequence[float] | None = None, force: bool = False, dtype: str | None = None,
                    bits: int | None = None, requantize: bool = False, on_report=None) -> Path:
    """Load ``model``, add each adapter (weighted sum when several), merge, write a checkpoint to ``out``.

    ``bits`` loads the base quantized as the adapter was trained (QLoRA); the merge then goes into the
    dequantized weights, so the checkpoint is float (``dtype``, default the compute dtype fp32).
    """
    check_out(out, [model_dir(model), *adapter_dirs], force=force)  # before the minutes of loading and merging
    peft_model, _ = load_with_adapters(model, adapter_dirs, weights, bits=bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dequantize warning: here it is what was asked for
        merged = peft_model.merge_and_unload(safe_merge=True)
    if dtype:
        check_cast(merged, getattr(torch, dtype))
        merged = merged.to(getattr(torch, dtype))

    report: dict = {}

    def fill(tmp: Path) -> None:
        if requantize:
            report.update(requantize_checkpoint(merged, tmp, bits=bits or 4))
        else:
            merged.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer_files(model_dir(model), tmp)

    written = write_dir_atomically(out, fill, force=force, inputs=[model_dir(model), *adapter_dirs])
    if on_report is not None and report:
        on_report(report)
    return written


def check_cast(model, dtype) -> None:
    """Refuse a cast that would turn finite weights into inf (float16 tops out at 65504), naming the modules."""
    if not dtype.is_floating_point:
        return
    limit = torch.finfo(dtype).max
    over = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and torch.finfo(p.dtype).max > limit:
            top = float(p.detach().abs().max()) if p.numel() else 0.0
            if top > limit:
                over[name.rsplit(".", 1)[0]] = max(top, over.get(name.rsplit(".", 1)[0], 0.0))
    if over:
        worst = max(over, key=over.get)
        raise SurgeonError(f"--dtype {str(dtype).removeprefix('torch.')}: {len(over)} modules hold values beyond its "
                           f"range ({limit:g}) and would become inf: {', '.join(sorted(over)[:5])}"
                           f"{', ...' if len(over) > 5 else ''}; largest {over[worst]:.4g} in {worst}. Keep float32 "
                           "or use bfloat16 (float32's range)")


def fold_onnx(model: str, adapter_dirs: Sequence[str], out: str | os.PathLike, *,
              weights: Sequence[float] | None = None, force: bool = False, source: str | None = None,
              kv_cache: bool = False) -> Path:
    """Like ``fold_checkpoint`` but writes a merged ONNX export (the fold pass, then the exporter)."""
    check_out(out, [model_dir(model), *adapter_dirs], force=force)
    peft_model, name = load_with_adapters(model, adapter_dirs, weights)
    sources = {name: adapter_dirs[0]} if name == "a0" else None
    recipe = None if name == "a0" else {"adapters": [str(Path(d).resolve()) for d in adapter_dirs],
                                        "weights": [float(w) for w in (weights or [1.0] * len(adapter_dirs))]}
    return export_onnx(peft_model, out, [name], merged=True, force=force, source=source or model, adapter_sources=sources,
                       kv_cache=kv_cache, merge_recipe=recipe)


def set_weights(model, weights: dict[str, np.ndarray]) -> None:
    """Each named parameter replaced by a new one (so a head tied to the embeddings is untied, as in the export)."""
    for name, value in weights.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path)
        old = getattr(owner, leaf)
        if tuple(old.shape) != value.shape:
            raise ExportFileError(f"{name}: the export's 4-bit weight is {value.shape}, the model's {tuple(old.shape)}")
        setattr(owner, leaf, torch.nn.Parameter(torch.from_numpy(value).to(old.dtype), requires_grad=False))
