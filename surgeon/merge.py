"""PEFT's merge methods for ``SurgeonModel``: they change the eager base weights in place, as PEFT does.

``merge_adapter`` / ``unmerge_adapter`` add and subtract ``scale * B @ A`` (fp32, cast back) and
keep the adapters; ``merge_and_unload`` also writes ``modules_to_save`` copies into the base and
returns the plain transformers model. For a merge that leaves its input alone, use the graph pass
``surgeon.fold``. Tied weights touched by a merge are untied first, with a warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from surgeon.config import LoraConfig
from surgeon.errors import AdapterError
from surgeon.layers import LoraLayer, SavedTensor
from surgeon.passes.fold import write_merged


class MergeOps:
    """Mixin of ``SurgeonModel``."""

    def _lora_layers(self) -> list[LoraLayer]:
        return [m for m in self._registry().values() if isinstance(m, LoraLayer)]

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the adapters (default: the active one) into the base weights; the branches skip them."""
        names = tuple(adapter_names or self.active_adapters)
        for name in names:
            self._known(name)
        self._dequantize_base()
        shared = _shared_names(self.base)  # one walk for tied weights, not one per layer
        plan = []
        for layer in self._lora_layers():
            todo = tuple(n for n in names if n in layer.adapters and n not in layer.merged)
            if todo:
                plan.append((layer, todo, self._own_weight(layer.path, shared)))
        if safe_merge:  # check every merged weight before writing any (chunk by chunk: no extra memory)
            for layer, todo, w in plan:
                write_merged(w, layer, todo, check_only=True)
        done = []
        with torch.no_grad():
            try:
                for layer, todo, w in plan:
                    write_merged(w.data, layer, todo, dst=w.data)  # in place, W read and written once
                    layer.merged += todo
                    done.append((layer, todo, w))
            except Exception:
                for layer, todo, w in done:  # roll back (within fp32 rounding; safe_merge never gets here)
                    write_merged(w.data, layer, todo, dst=w.data, sign=-1.0)
                    layer.merged = tuple(n for n in layer.merged if n not in todo)
                raise

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights again (exact within fp32 rounding)."""
        shared = _shared_names(self.base)
        with torch.no_grad():
            for layer in self._lora_layers():
                if layer.merged:
                    w = self._own_weight(layer.path, shared)
                    write_merged(w.data, layer, layer.merged, dst=w.data, sign=-1.0)
                    layer.merged = ()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge and return the plain transformers model (its own class; ``generate`` works)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        for module in self._registry().values():
            if isinstance(module, SavedTensor):
                copy = module()
                if copy is not module.original:
                    self._own_param(module.path).data.copy_(copy.detach())
        for p in self.base.parameters():
            p.requires_grad_(False)
        return self.base

    def _dequantize_base(self) -> None:
        """Merging into 4/8-bit weights ruins them; a quantized base is first dequantized (compute dtype)."""
        from surgeon.quant import dequantize, is_quantized

        if is_quantized(self.base):
            count = dequantize(self.base)
            for layer in self._lora_layers():  # GPT-2's layers are Conv1D again: [in, out] weights
                if type(self.base.get_submodule(layer.path)).__name__ == "Conv1D":
                    layer.kind = "conv1d"
                    for adapter in layer.adapters.values():
                        adapter.kind = "conv1d"
            warnings.warn(f"merge: the base is quantized; {count} layers were dequantized to their compute dtype and "
                          "the adapters are merged into those float weights", stacklevel=3)
            self._graphs.clear()  # the graphs read the packed weights: capture again on next use

    def unload(self) -> nn.Module:
        """The base model without adapters (nothing merged)."""
        self.unmerge_adapter()
        return self.base

    def _own_param(self, param_path: str, shared: set[str] | None = None) -> nn.Parameter:
        """The base parameter at ``param_path``, untied from any other module that shares it."""
        owner_path, _, leaf = param_path.rpartition(".")
        owner = self.base.get_submodule(owner_path)
        param = getattr(owner, leaf)
        if shared is not None and param_path not in shared:
            return param
        sharers = [n for n, p in self.base.named_parameters(remove_duplicate=False) if p is param and n != param_path]
        if sharers:
            warnings.warn(f"merge: {param_path} is tied to {', '.join(sharers)}; untying it so only {owner_path} changes",
                          stacklevel=3)
            param = nn.Parameter(param.detach().clone(), requires_grad=False)
            setattr(owner, leaf, param)
            if getattr(self.base.config, "tie_word_embeddings", False):
                self.base.config.tie_word_embeddings = False
            self._graphs.clear()  # captured graphs read the old shared tensor: capture again on next use
        return param

    def _own_weight(self, module_path: str, shared: set[str] | None = None) -> nn.Parameter:
        return self._own_param(f"{module_path}.weight", shared)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "cat", svd_rank: int | None = None) -> None:
        """A new adapter equal to ``sum w_i * adapter_i``.

        ``"cat"`` is exact: ranks add up (A stacked, B stacked with ``w_i * scale_i`` folded in, scale 1).
        ``"svd"`` truncates the summed delta to ``svd_rank`` (default: the largest input rank).
        """
        if combination_type not in ("cat", "svd"):
            raise AdapterError(f"combination_type={combination_type!r}: use 'cat' (exact) or 'svd' (truncated)")
        if len(adapters) != len(weights) or not adapters:
            raise AdapterError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
        for name in adapters:
            self._known(name)
        parts = {}
        for layer in self._lora_layers():
            pairs = [(layer.adapters[n], w) for n, w in zip(adapters, weights) if n in layer.adapters]
            if pairs:
                parts[layer.path] = (layer, _combine(pairs, combination_type, svd_rank))
        ranks = {p: ab[0].shape[0] for p, (_, ab) in parts.items()}
        config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=sorted(parts),
                            rank_pattern=ranks, alpha_pattern=dict(ranks), task_type=self.peft_config[adapters[0]].task_type,
                            base_model_name_or_path=self.peft_config[adapters[0]].base_model_name_or_path)
        self._add(adapter_name, config)
        with torch.no_grad():
            for layer, (a, b) in parts.values():
                target = layer.adapters[adapter_name]
                target.lora_A.copy_(a)
                target.lora_B.copy_(b)


def _shared_names(base: nn.Module) -> set[str]:
    """Names of parameters that another module holds too (tied weights), in one walk."""
    seen: dict[int, str] = {}
    shared: set[str] = set()
    for name, p in base.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            shared.update((name, seen[id(p)]))
        else:
            seen[id(p)] = name
    return shared


def _combine(pairs, combination_type: str, svd_rank: int | None):
    if combination_type == "cat":
        a = torch.cat([ad.lora_A[: ad.r].detach() for ad, _ in pairs])
        b = torch.cat([ad.lora_B[:, : ad.r].detach() * (w * ad.scaling) for ad, w in pairs], dim=1)
        return a, b
    delta = sum((ad.lora_B[:, : ad.r].detach().float() @ ad.lora_A[: ad.r].detach().float()) * (w * ad.scaling) for ad, w in pairs)
    rank = svd_rank or max(ad.r for ad, _ in pairs)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]), (u[:, :rank] * root[None, :])
