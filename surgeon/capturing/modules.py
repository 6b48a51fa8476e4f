"""What matching needs to know about the eager model's modules, recorded at capture."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

from surgeon.compat import is_conv1d
from surgeon.quant import quantized_linear_shape

SUPPORTED_KINDS = ("linear", "conv1d", "embedding")


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """One module of the eager model."""

    path: str
    type_name: str
    kind: str | None  # "linear", "conv1d", "embedding", or None when LoRA cannot wrap it
    in_features: int = 0
    out_features: int = 0


@dataclasses.dataclass(frozen=True)
class CaptureInfo:
    """Facts about the source model, stored on a captured graph as ``graph.meta["surgeon"]``."""

    signature: tuple
    modules: Mapping[str, ModuleInfo]
    output_embedding: str | None
    model_type: str | None
    model_class: str


def describe_module(path: str, module: nn.Module) -> ModuleInfo:
    type_name = type(module).__name__
    quantized = quantized_linear_shape(module)  # a frozen quantized linear: one op in the graph, LoRA goes after
    if quantized is not None:
        return ModuleInfo(path, type_name, "linear", *quantized)
    if isinstance(module, nn.Linear):
        return ModuleInfo(path, type_name, "linear", module.in_features, module.out_features)
    if is_conv1d(module):
        return ModuleInfo(path, type_name, "conv1d", module.weight.shape[0], module.weight.shape[1])
    if isinstance(module, nn.Embedding):
        return ModuleInfo(path, type_name, "embedding", module.num_embeddings, module.embedding_dim)
    return ModuleInfo(path, type_name, None)


def module_table(model: nn.Module) -> dict[str, ModuleInfo]:
    return {path: describe_module(path, m) for path, m in model.named_modules() if path}


def output_embedding_path(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((p for p, m in model.named_modules() if m is head), None) if head is not None else None


def capture_info(model: nn.Module, signature: tuple) -> CaptureInfo:
    config = getattr(model, "config", None)
    return CaptureInfo(signature=signature, modules=module_table(model), output_embedding=output_embedding_path(model),
                       model_type=getattr(config, "model_type", None), model_class=type(model).__name__)
