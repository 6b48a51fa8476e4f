"""A model's adapters under PEFT's keys, and adapter directories in and out (save, load, hotswap)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from surgeon.adapters import check_name, check_tensors, read_adapter_dir, write_adapter_dir
from surgeon.config import LoraConfig
from surgeon.errors import AdapterError
from surgeon.layers import IA3Layer, LoraLayer, PromptEmbeddings, SavedTensor
from surgeon.matching import match, resolve_modules_to_save
from surgeon.names import PROMPT_KEY, peft_ia3_key, peft_keys, peft_magnitude_key, peft_saved_key


def bias_parameters(model, config: LoraConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """The base biases ``config.bias`` trains ('all', or 'lora_only': those of targeted modules)."""
    if config.bias == "none":
        return []
    targets = {t.path for t in match(model.graphs.any(), config).targets}
    return [(n, p) for n, p in model.base.named_parameters()
            if n.endswith("bias") and (config.bias == "all" or n.rpartition(".")[0] in targets)]


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's keys (what ``adapter_model.safetensors`` holds); live, not copies."""
    out: dict[str, torch.Tensor] = {}
    for module in model.adapter_state.registry().values():
        if isinstance(module, LoraLayer) and name in module.adapters:
            key_a, key_b = peft_keys(module.path, module.kind)
            adapter = module.adapters[name]
            out[key_a], out[key_b] = adapter.lora_A[: adapter.r], adapter.lora_B[:, : adapter.r]
            if adapter.dora:
                out[peft_magnitude_key(module.path)] = adapter.magnitude
        elif isinstance(module, PromptEmbeddings) and name in module.adapters:
            out[PROMPT_KEY] = module.adapters[name]
        elif isinstance(module, IA3Layer) and name in module.adapters:
            out[peft_ia3_key(module.path)] = module.adapters[name].ia3_l
        elif isinstance(module, SavedTensor) and name in module.copies:
            out[peft_saved_key(module.path)] = module.copies[name]
    for pname, p in bias_parameters(model, model.peft_config[name]):
        out[peft_saved_key(pname)] = p
    return out


def expected_shapes(model, config: LoraConfig) -> dict[str, tuple[int, ...]]:
    """PEFT keys and shapes an adapter file for ``config`` must hold on this base model."""
    if config.peft_type == "PROMPT_TUNING":
        return {PROMPT_KEY: (config.num_virtual_tokens, model.base.get_input_embeddings().embedding_dim)}
    graph = model.graphs.any()
    out: dict[str, tuple[int, ...]] = {}
    for t in match(graph, config).targets:
        if config.peft_type == "IA3":
            ff = config.is_feedforward(t.path, graph.meta["surgeon"].model_type)
            out[peft_ia3_key(t.path)] = (1, t.in_features) if ff else (t.out_features, 1)
            continue
        key_a, key_b = peft_keys(t.path, t.kind)
        out[key_a], out[key_b] = (t.r, t.in_features), (t.out_features, t.r)
        if config.use_dora:
            out[peft_magnitude_key(t.path)] = (t.out_features,)
    for path in resolve_modules_to_save(config, graph.meta["surgeon"]):
        for pname, p in model.base.get_submodule(path).named_parameters(remove_duplicate=False):
            out[peft_saved_key(f"{path}.{pname}")] = tuple(p.shape)
    for pname, p in bias_parameters(model, config):
        out[peft_saved_key(pname)] = tuple(p.shape)
    return out


def copy_in(model, name: str, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        own = adapter_tensors(model, name)
        for key, value in tensors.items():
            own[key].copy_(value)


def config_to_save(model, name: str) -> LoraConfig:
    config = model.peft_config[name]
    changes: dict[str, Any] = {"inference_mode": True}
    if config.base_model_name_or_path is None:
        changes["base_model_name_or_path"] = getattr(model.base.config, "_name_or_path", None) or None
    layers = model.adapter_state.lora_layers() + model.adapter_state.ia3_layers()
    if any(layer.kind == "conv1d" and name in layer.adapters for layer in layers):
        changes["fan_in_fan_out"] = True  # what PEFT records for GPT-2's Conv1D
    return config.replace(**changes)


def save_adapters(model, directory: str, names: list[str]) -> None:
    """Each adapter in PEFT's format: ``default`` in ``directory``, others in subdirectories named after them."""
    for name in names:
        model.adapter_state.known(name)
        if name != "default":
            check_name(name, "adapter name (saved as a subdirectory)")
        target = Path(directory) if name == "default" else Path(directory) / name
        write_adapter_dir(target, config_to_save(model, name), adapter_tensors(model, name))


def load_adapter_dir(model, directory: str, name: str, *, trainable: bool, hotswap: bool) -> None:
    config, tensors = read_adapter_dir(directory)
    if hotswap:
        if config.peft_type != "LORA":
            raise AdapterError(f"{directory}: hotswap is for LoRA adapters (as in PEFT); this one is "
                               f"{config.peft_type}: load it under a new adapter_name instead")
        swap_in(model, directory, name, config, tensors)
        return
    if name in model.peft_config:
        raise AdapterError(f"an adapter named {name!r} exists already; pick another adapter_name, "
                           "delete it first, or pass hotswap=True to overwrite its weights")
    check_tensors(expected_shapes(model, config), tensors, str(Path(directory)))
    model.add_adapter(name, config, trainable=trainable)
    copy_in(model, name, tensors)


def pad_for_hotswap(model, target_rank: int) -> None:
    for layer in model.adapter_state.lora_layers():
        for adapter in layer.adapters.values():
            adapter.pad_to(target_rank)


def swap_in(model, directory: str, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite adapter ``name``'s weights (and scales) in place: no shape changes, so no recompilation."""
    model.adapter_state.known(name)
    layers = {m.path: m for m in model.adapter_state.lora_layers() if name in m.adapters}
    new_targets = {t.path: t for t in match(model.graphs.any(), config).targets}
    extra = sorted(set(new_targets) - set(layers))
    if extra:
        raise AdapterError(f"{directory}: hotswap needs the same targets, but it adapts modules {name!r} does not: "
                           f"{', '.join(extra)}; load it as a new adapter instead")
    check_tensors(expected_shapes(model, config), tensors, str(Path(directory)))
    was = model.peft_config[name].use_dora
    if config.use_dora != was:
        raise AdapterError(f"{directory}: hotswap replaces weights in place, but this adapter has use_dora="
                           f"{config.use_dora} and {name!r} has use_dora={was}; load it as a new adapter instead")
    too_big = sorted(f"{p} (r={t.r} > {layers[p].adapters[name].lora_A.shape[0]})" for p, t in new_targets.items()
                     if t.r > layers[p].adapters[name].lora_A.shape[0])
    if too_big:
        raise AdapterError(f"{directory}: rank larger than the loaded adapter's capacity at {', '.join(too_big)}; "
                           "call prepare_for_hotswap(target_rank=...) with the largest rank before compiling")
    for path, layer in layers.items():
        adapter = layer.adapters[name]
        if path in new_targets:
            t = new_targets[path]
            key_a, key_b = peft_keys(path, t.kind)
            adapter.swap_in(tensors[key_a], tensors[key_b], t.scale, tensors.get(peft_magnitude_key(path)))
        else:  # the new adapter leaves this module alone (DoRA: a magnitude of the weight's norm gives the base)
            adapter.swap_in(adapter.lora_A[:0], adapter.lora_B[:, :0], 0.0)
            if adapter.dora:
                adapter.init_magnitude(model.base.get_submodule(path).weight)
    model.peft_config[name] = config
