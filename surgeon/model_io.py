"""Adapter state and files for ``SurgeonModel``: PEFT keys, save/load, hotswap.

A mixin so ``model.py`` keeps the forward path and this file keeps the file formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.adapters import check_name, check_ranks, check_tensors, peft_keys, peft_saved_key, read_adapter_dir, write_adapter_dir
from surgeon.config import LoraConfig
from surgeon.compat import check_kwargs, params_of, refuse_peft_load_flags, refuse_value
from surgeon.errors import AdapterError, UnknownArgumentError
from surgeon.layers import LoraLayer, SavedTensor
from surgeon.matching import match, resolve_modules_to_save


class AdapterIO:
    """Methods of ``SurgeonModel`` that read and write adapter tensors."""

    # ---- PEFT-keyed state ------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors under PEFT's keys (what ``adapter_model.safetensors`` holds)."""
        name = adapter_name or self.active_adapter
        config = self.peft_config[name]
        out: dict[str, torch.Tensor] = {}
        for module in self._registry().values():
            if isinstance(module, LoraLayer) and name in module.adapters:
                key_a, key_b = peft_keys(module.path, module.kind)
                adapter = module.adapters[name]
                out[key_a], out[key_b] = adapter.lora_A[: adapter.r], adapter.lora_B[:, : adapter.r]
            elif isinstance(module, SavedTensor) and name in module.copies:
                out[peft_saved_key(module.path)] = module.copies[name]
        for pname, p in self._bias_parameters(config):
            out[peft_saved_key(pname)] = p
        return out

    def _bias_parameters(self, config: LoraConfig):
        if config.bias == "none":
            return []
        targets = {t.path for t in match(self._any_graph(), config).targets}
        return [(n, p) for n, p in self.base.named_parameters()
                if n.endswith("bias") and (config.bias == "all" or n.rsplit(".", 1)[0] in targets)]

    def _device(self) -> torch.device:
        return next((p.device for p in self.base.parameters()), torch.device("cpu"))

    def _any_graph(self):
        return next(iter(self._graphs.values()))

    def expected_shapes(self, config: LoraConfig) -> dict[str, tuple[int, ...]]:
        """PEFT keys and shapes an adapter file for ``config`` must hold on this base model."""
        graph = self._any_graph()
        out: dict[str, tuple[int, ...]] = {}
        for t in match(graph, config).targets:
            key_a, key_b = peft_keys(t.path, t.kind)
            out[key_a], out[key_b] = (t.r, t.in_features), (t.out_features, t.r)
        for path in resolve_modules_to_save(config, graph.meta["surgeon"]):
            for pname, p in self.base.get_submodule(path).named_parameters(remove_duplicate=False):
                out[peft_saved_key(f"{path}.{pname}")] = tuple(p.shape)
        for pname, p in self._bias_parameters(config):
            out[peft_saved_key(pname)] = tuple(p.shape)
        return out

    def state_dict(self, *args, destination: dict | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """What training changes: the active adapter under PEFT's keys (the base stays in its own files).

        ``Trainer.save_model`` writes this as ``model.safetensors``; ``save_pretrained`` writes an
        adapter directory PEFT reads.
        """
        if args:
            raise UnknownArgumentError("state_dict: pass destination, prefix and keep_vars by name (torch deprecated "
                                       "positional arguments)")
        out = destination if destination is not None else {}
        for k, v in self.adapter_state_dict().items():
            out[prefix + k] = v if keep_vars else v.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        refuse_value("load_state_dict", "assign", assign, [False], "adapter tensors are copied into place")
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if strict:
            check_tensors({k: tuple(v.shape) for k, v in own.items()}, state_dict, "state dict")
        with torch.no_grad():
            for key in set(own) & set(state_dict):
                own[key].copy_(state_dict[key])
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    # ---- directories ---------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        is_main_process: bool = True, **kwargs: Any) -> None:
        """Write each adapter in PEFT's format: ``default`` in the directory, others in subdirectories.

        ``is_main_process=False`` writes nothing (PEFT's meaning, for all but one rank of a distributed job).
        """
        check_kwargs("save_pretrained", kwargs, params_of(AdapterIO.save_pretrained))
        refuse_value("save_pretrained", "safe_serialization", safe_serialization, [True],
                     "surgeon writes safetensors only")
        refuse_value("save_pretrained", "save_embedding_layers", save_embedding_layers, ["auto", False],
                     "surgeon saves embeddings only through modules_to_save")
        if not is_main_process:
            return
        for name in selected_adapters or list(self.peft_config):
            self._known(name)
            if name != "default":
                check_name(name, "adapter name (saved as a subdirectory)")
            target = Path(save_directory) if name == "default" else Path(save_directory) / name
            write_adapter_dir(target, self._config_to_save(name), self.adapter_state_dict(name))

    def _config_to_save(self, name: str) -> LoraConfig:
        config = self.peft_config[name]
        changes: dict[str, Any] = {"inference_mode": True}
        if config.base_model_name_or_path is None:
            changes["base_model_name_or_path"] = getattr(self.base.config, "_name_or_path", None) or None
        kinds = {m.kind for m in self._registry().values() if isinstance(m, LoraLayer) and name in m.adapters}
        if "conv1d" in kinds:
            changes["fan_in_fan_out"] = True  # what PEFT records for GPT-2's Conv1D
        return config.replace(**changes)

    def load_adapter(self, model_id: str, adapter_name: str = "default", is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     low_cpu_mem_usage: bool = False, hotswap: bool = False, **kwargs: Any) -> None:
        """Load a PEFT adapter directory as ``adapter_name``; with ``hotswap`` overwrite that adapter in place."""
        check_kwargs("load_adapter", kwargs, params_of(AdapterIO.load_adapter))
        refuse_peft_load_flags("load_adapter", autocast_adapter_dtype, low_cpu_mem_usage)
        if torch_device is not None and torch.device(torch_device) != self._device():
            raise UnknownArgumentError(f"load_adapter: torch_device={torch_device!r} differs from the model's device "
                                       f"{self._device()}; adapters live on the base's device: move the model with .to()")
        config, tensors = read_adapter_dir(model_id)
        if hotswap:
            self._hotswap(model_id, adapter_name, config, tensors)
            return
        if adapter_name in self.peft_config:
            raise AdapterError(f"an adapter named {adapter_name!r} exists already; pick another adapter_name, "
                               "delete it first, or pass hotswap=True to overwrite its weights")
        check_tensors(self.expected_shapes(config), tensors, str(Path(model_id)))
        self._add(adapter_name, config, trainable=is_trainable)
        with torch.no_grad():
            own = self.adapter_state_dict(adapter_name)
            for key, value in tensors.items():
                own[key].copy_(value)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, **kwargs: Any):
        """``PeftModel.from_pretrained``: wrap ``model`` with the adapter stored in ``model_id``.

        ``config`` (a ``LoraConfig``) replaces the directory's ``adapter_config.json``, as in PEFT.
        """
        check_kwargs("PeftModel.from_pretrained", kwargs, params_of(cls.from_pretrained))
        refuse_peft_load_flags("PeftModel.from_pretrained", autocast_adapter_dtype, low_cpu_mem_usage)
        file_config, tensors = read_adapter_dir(model_id)
        if config is not None and not isinstance(config, LoraConfig):
            raise AdapterError(f"PeftModel.from_pretrained: config must be a surgeon.LoraConfig, got {type(config).__name__}")
        if config is not None:
            check_ranks(config, tensors, str(Path(model_id)))
        config = config or file_config
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            peft_model = cls(model, config, adapter_name, is_trainable=is_trainable)
            check_tensors(peft_model.expected_shapes(config), tensors, str(Path(model_id)))
        except Exception:
            for p, flag in flags:  # leave the caller's model as it came
                p.requires_grad_(flag)
            raise
        with torch.no_grad():
            own = peft_model.adapter_state_dict(adapter_name)
            for key, value in tensors.items():
                own[key].copy_(value)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    # ---- hotswap -------------------------------------------------------------------------------
    def prepare_for_hotswap(self, target_rank: int) -> None:
        """Pad every adapter to ``target_rank`` so later hotswaps of rank <= it change no shape.

        Call before ``torch.compile``; the scale is a tensor already, so swapping alphas is free too.
        """
        for module in self._registry().values():
            if isinstance(module, LoraLayer):
                for adapter in module.adapters.values():
                    adapter.pad_to(target_rank)

    def _hotswap(self, model_id: str, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        self._known(name)
        layers = {m.path: m for m in self._registry().values() if isinstance(m, LoraLayer) and name in m.adapters}
        new_targets = {t.path: t for t in match(self._any_graph(), config).targets}
        extra = sorted(set(new_targets) - set(layers))
        if extra:
            raise AdapterError(f"{model_id}: hotswap needs the same targets, but it adapts modules {name!r} does not: "
                               f"{', '.join(extra)}; load it as a new adapter instead")
        check_tensors(self.expected_shapes(config), tensors, str(Path(model_id)))
        too_big = sorted(f"{p} (r={t.r} > {layers[p].adapters[name].lora_A.shape[0]})" for p, t in new_targets.items()
                         if t.r > layers[p].adapters[name].lora_A.shape[0])
        if too_big:
            raise AdapterError(f"{model_id}: rank larger than the loaded adapter's capacity at {', '.join(too_big)}; "
                               "call prepare_for_hotswap(target_rank=...) with the largest rank before compiling")
        for path, layer in layers.items():
            adapter = layer.adapters[name]
            if path in new_targets:
                t = new_targets[path]
                key_a, key_b = peft_keys(path, t.kind)
                adapter.swap_in(tensors[key_a], tensors[key_b], t.scale)
            else:  # the new adapter leaves this module alone
                adapter.swap_in(adapter.lora_A[:0], adapter.lora_B[:, :0], 0.0)
        self.peft_config[name] = config
