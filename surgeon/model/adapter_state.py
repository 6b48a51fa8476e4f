"""The adapters of one model, owned in one place: their modules (shared by every graph of the model),
their configs, which one is active, and which of them train."""

from __future__ import annotations

from torch import fx, nn

from surgeon.config import LoraConfig
from surgeon.errors import AdapterError, did_you_mean
from surgeon.graphs import set_nested
from surgeon.layers import LoraLayer, SavedTensor
from surgeon.matching import match
from surgeon.passes.lora import new_adapter_modules


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
        return {n: m for n, m in self.modules.named_modules() if isinstance(m, (LoraLayer, SavedTensor))}

    def lora_layers(self) -> list[LoraLayer]:
        return [m for m in self.registry().values() if isinstance(m, LoraLayer)]

    def saved_tensors(self) -> list[SavedTensor]:
        return [m for m in self.registry().values() if isinstance(m, SavedTensor)]

    def known(self, name: str) -> None:
        if name not in self.configs:
            raise AdapterError(f"no adapter named {name!r}{did_you_mean(name, self.configs)}; "
                               f"adapters: {sorted(self.configs)}")

    # ---- changing ----------------------------------------------------------------------------------
    def add(self, name: str, config: LoraConfig, graph: fx.GraphModule, *, trainable: bool = True) -> None:
        """Create adapter ``name``'s tensors at every target ``config`` selects in ``graph`` (any graph of the model)."""
        if name in self.configs:
            raise AdapterError(f"an adapter named {name!r} exists already; adapters: {sorted(self.configs)}")
        if not isinstance(name, str) or "." in name:  # torch's ModuleDict refuses dots (PEFT's names do too)
            raise AdapterError(f"adapter name {name!r}: must be a string without '.', e.g. 'my-adapter'")
        registry = self.registry()
        for attr, module in new_adapter_modules(graph, match(graph, config), config, name, into=registry).items():
            if attr not in registry:
                set_nested(self.modules, attr, module)
        self.configs[name] = config
        self.trainable[name] = trainable
        self.activate(self.active if self.active in self.configs else name)

    def delete(self, name: str) -> None:
        self.known(name)
        for module in self.registry().values():
            store = module.adapters if isinstance(module, LoraLayer) else module.copies
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
            tensors = module.adapters if isinstance(module, LoraLayer) else module.copies
            for other, tensor in tensors.items():
                tensor.requires_grad_(train and other == name)
        self.active = name

    def set_enabled(self, enabled: bool) -> None:
        for module in self.registry().values():
            module.enabled = enabled
