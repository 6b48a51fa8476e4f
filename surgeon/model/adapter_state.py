"""The adapters of one model, owned in one place: their modules (shared by every graph of the model),
their configs, which one is active, and which of them train."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import fx, nn

from surgeon.config import LoraConfig
from surgeon.errors import AdapterError, did_you_mean
from surgeon.graphs import set_nested
from surgeon.names import PROMPT_ATTR
from surgeon.layers import IA3Layer, LoraLayer, PromptEmbeddings, SavedTensor
from surgeon.matching import match
from surgeon.passes.lora import new_adapter_modules


BASE_ROW = "__base__"  # PEFT's name for a row with no adapter


class AdapterState:
    """Registry of ``LoraLayer`` / ``SavedTensor`` modules (under the model's ``adapter_modules``) and configs."""

    def __init__(self, modules: nn.Module):
        self.modules = modules
        self.configs: dict[str, LoraConfig] = {}  # the model's peft_config
        self.trainable: dict[str, bool] = {}
        self.active: str | None = None

    # ---- reading ---------------------------------------------------------------------------------
    def registry(self) -> dict[str, nn.Module]:
        """Graph attribute -> module, for every adapter module of the model."""
        return {n: m for n, m in self.modules.named_modules()
                if isinstance(m, (LoraLayer, IA3Layer, SavedTensor, PromptEmbeddings))}

    def prompts(self) -> PromptEmbeddings | None:
        """The prompt-tuning adapters' embeddings (one module for all of them), if the model has any."""
        return next((m for m in self.registry().values() if isinstance(m, PromptEmbeddings)), None)

    def lora_layers(self) -> list[LoraLayer]:
        return [m for m in self.registry().values() if isinstance(m, LoraLayer)]

    def ia3_layers(self) -> list[IA3Layer]:
        return [m for m in self.registry().values() if isinstance(m, IA3Layer)]

    def saved_tensors(self) -> list[SavedTensor]:
        return [m for m in self.registry().values() if isinstance(m, SavedTensor)]

    def known(self, name: str) -> None:
        if name not in self.configs:
            raise AdapterError(f"no adapter named {name!r}{did_you_mean(name, self.configs)}; "
                               f"adapters: {sorted(self.configs)}")

    # ---- changing ----------------------------------------------------------------------------------
    def add(self, name: str, config: LoraConfig, graph: fx.GraphModule | None, *, trainable: bool = True,
            prompt: torch.Tensor | None = None) -> None:
        """Create adapter ``name``'s tensors at every target ``config`` selects in ``graph`` (any graph of the model);
        a prompt-tuning adapter holds ``prompt`` (its virtual tokens' embeddings) instead."""
        self._check_new(name, config)
        if prompt is not None:
            module = self.prompts()
            if module is None:
                module = PromptEmbeddings()
                set_nested(self.modules, PROMPT_ATTR, module)
            module.adapters[name] = nn.Parameter(prompt)
        else:
            registry = self.registry()
            for attr, module in new_adapter_modules(graph, match(graph, config), config, name, into=registry).items():
                if attr not in registry:
                    set_nested(self.modules, attr, module)
        self.configs[name] = config
        self.trainable[name] = trainable
        self.activate(self.active if self.active in self.configs else name)

    def _check_new(self, name: str, config) -> None:
        if name in self.configs:
            raise AdapterError(f"an adapter named {name!r} exists already; adapters: {sorted(self.configs)}")
        if not isinstance(name, str) or "." in name:  # torch's ModuleDict refuses dots (PEFT's names do too)
            raise AdapterError(f"adapter name {name!r}: must be a string without '.', e.g. 'my-adapter'")
        kinds = {type(c).__name__ for c in self.configs.values()} - {type(config).__name__}
        if kinds:
            raise AdapterError(f"adapter {name!r} is a {type(config).__name__} but this model holds {sorted(kinds)[0]} "
                               "adapters; surgeon keeps one method per model (PEFT needs its PeftMixedModel for "
                               "mixing): put it on a model of its own")

    def delete(self, name: str) -> None:
        self.known(name)
        for module in self.registry().values():
            store = module.copies if isinstance(module, SavedTensor) else module.adapters
            if name in store:
                del store[name]
        del self.configs[name]
        self.trainable.pop(name, None)
        if self.active == name and self.configs:
            self.activate(next(iter(self.configs)))

    def activate(self, name: str) -> None:
        """Activate ``name`` everywhere; only its tensors train (if it was loaded trainable)."""
        train = self.trainable.get(name, True)
        for module in self.registry().values():
            module.active = (name,)
            tensors = module.copies if isinstance(module, SavedTensor) else module.adapters
            for other, tensor in tensors.items():
                tensor.requires_grad_(train and other == name)
        self.active = name

    def rows(self, adapter_names, inputs: torch.Tensor | None, training: bool, where: str):
        """The context in which row ``i`` runs adapter ``adapter_names[i]`` (None: every row the active adapter)."""
        if adapter_names is None:
            return contextlib.nullcontext()
        if inputs is None:
            raise AdapterError(f"{where}: adapter_names needs input_ids (or inputs_embeds) to know the batch")
        return self.per_row(self.check_rows(adapter_names, inputs.shape[0], training, where), inputs.device)

    @contextlib.contextmanager
    def per_row(self, adapter_names: Sequence[str], device) -> Iterator[None]:
        """For the block, row ``i`` of every call runs adapter ``adapter_names[i]`` (``BASE_ROW``: none)."""
        names = tuple(dict.fromkeys(n for n in adapter_names if n != BASE_ROW))
        slot = torch.tensor([names.index(n) if n != BASE_ROW else -1 for n in adapter_names], dtype=torch.long,
                            device=device)
        layers = self.lora_layers()
        for layer in layers:
            layer.rows = (names, slot)
        try:
            yield
        finally:
            for layer in layers:
                layer.rows = None

    def check_rows(self, adapter_names, batch: int, training: bool, where: str) -> list[str]:
        """PEFT's refusals for ``adapter_names``; returns them as a list of names."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) \
                or not all(isinstance(n, str) for n in adapter_names):
            raise AdapterError(f"{where}: adapter_names must be a list of adapter names, one per row "
                               f"({BASE_ROW!r} for the base model), got {adapter_names!r}")
        names = list(adapter_names)
        if training:
            raise AdapterError(f"{where}: adapter_names cannot be used in training mode (each row's adapter would get "
                               "gradients from the others' loss); call model.eval() first")
        if len(names) != batch:
            raise AdapterError(f"{where}: {len(names)} adapter_names for a batch of {batch} rows; give one name per row")
        unknown = sorted({n for n in names if n != BASE_ROW and n not in self.configs})
        if unknown:
            raise AdapterError(f"{where}: adapter_names has unknown adapters "
                               f"{', '.join(repr(n) + did_you_mean(n, self.configs) for n in unknown)}; adapters: "
                               f"{sorted(self.configs)} (or {BASE_ROW!r} for the base model)")
        merged = sorted({m for layer in self.lora_layers() for m in layer.merged})
        if merged:
            raise AdapterError(f"{where}: adapter_names cannot be used while adapters are merged ({merged}); call "
                               "unmerge_adapter() first")
        other = sorted({n for n in names if getattr(self.configs.get(n), "peft_type", "LORA") != "LORA"})
        if other:
            raise AdapterError(f"{where}: adapter_names is for LoRA adapters; {other} are "
                               f"{self.configs[other[0]].peft_type} (PEFT has no per-row form of it either): run one "
                               "such adapter per batch")
        dora = sorted({n for layer in self.lora_layers() for n, a in layer.adapters.items() if a.dora and n in names})
        if dora:
            raise AdapterError(f"{where}: adapter_names cannot mix rows of DoRA adapters ({dora}) in one batch (PEFT "
                               "refuses it too); run them one adapter per batch, or as plain LoRA")
        saved = sorted({n for t in self.saved_tensors() for n in t.copies if n in names})
        if saved:
            raise AdapterError(f"{where}: adapters {saved} have modules_to_save copies, which hold one tensor for the "
                               "whole batch; run their rows in a batch of their own")
        return names

    def set_enabled(self, enabled: bool) -> None:
        for module in self.registry().values():
            module.enabled = enabled
