"""PEFT's merge methods: they change the eager base weights in place, as PEFT does.

``merge`` adds ``scale * B @ A`` (fp32, cast back) and records the factors it added; ``unmerge``
subtracts exactly those, even if the adapter changed since. For a merge that leaves its input alone,
use the graph pass ``surgeon.fold``. Tied weights touched by a merge are untied first, with a warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from surgeon.compat import is_conv1d
from surgeon.config import LoraConfig
from surgeon.errors import AdapterError, FoldError
from surgeon.passes.merge_kernel import factors_of, write_merged
from surgeon.quant import dequantize, is_quantized


def merge(model, names: tuple[str, ...], safe_merge: bool) -> None:
    for name in names:
        model.adapter_state.known(name)
    dequantize_base(model)
    shared = shared_names(model.base)  # one walk for tied weights, not one per layer
    if model.adapter_state.ia3_layers():
        return merge_ia3(model, names, safe_merge, shared)
    plan = []
    for layer in model.adapter_state.lora_layers():
        todo = tuple(n for n in names if n in layer.adapters and n not in layer.merged)
        if todo:
            w = own_param(model, f"{layer.path}.weight", shared)
            plan.append((layer, todo, factors_of(layer, todo, weight=w), w))
    if safe_merge:  # check every merged weight before writing any (chunk by chunk: no extra memory)
        for layer, _, factors, w in plan:
            write_merged(w, factors, layer.kind, layer.path, check_only=True)
    done = []
    with torch.no_grad():
        try:
            for layer, todo, factors, w in plan:
                write_merged(w.data, factors, layer.kind, layer.path, dst=w.data)  # in place, W read and written once
                layer.merged += todo
                layer.merged_factors.update(zip(todo, ((f,) for f in factors)))
                done.append((layer, todo, factors, w))
        except Exception:
            for layer, todo, factors, w in done:  # roll back (within fp32 rounding; safe_merge never gets here)
                write_merged(w.data, factors, layer.kind, layer.path, dst=w.data, sign=-1.0)
                layer.merged = tuple(n for n in layer.merged if n not in todo)
                for n in todo:
                    layer.merged_factors.pop(n, None)
            raise


def merge_ia3(model, names: tuple[str, ...], safe_merge: bool, shared: set[str]) -> None:
    """PEFT's IA3 merge: the weight times the vector (and an output site's bias too), each adapter in turn."""
    plan = []
    for layer in model.adapter_state.ia3_layers():
        for name in (n for n in names if n in layer.adapters and n not in layer.merged):
            vector = layer.adapters[name].ia3_l.detach().flatten().float().clone()
            if safe_merge and not torch.isfinite(vector).all():
                raise FoldError(f"merging IA3 adapter {name!r} into {layer.path}: its vector holds NaN/Inf")
            plan.append((layer, name, vector))
    with torch.no_grad():
        for layer, name, vector in plan:
            _scale_base(model, layer, vector, shared)
            layer.merged += (name,)
            layer.merged_factors[name] = vector


def _scale_base(model, layer, vector: torch.Tensor, shared: set[str], divide: bool = False) -> None:
    w = own_param(model, f"{layer.path}.weight", shared)
    factor = layer.weight_factor(vector).to(w.device)
    w.data.copy_((w.data.float() / factor if divide else w.data.float() * factor).to(w.dtype))
    bias = getattr(model.base.get_submodule(layer.path), "bias", None)
    if bias is not None and not layer.feedforward:
        b = vector.to(bias.device)
        bias.data.copy_((bias.data.float() / b if divide else bias.data.float() * b).to(bias.dtype))


def unmerge(model) -> None:
    """Subtract what each merge added (its recorded factors) from the base weights."""
    shared = shared_names(model.base)
    with torch.no_grad():
        for layer in model.adapter_state.ia3_layers():
            for name in reversed(layer.merged):  # divide by exactly what each merge multiplied by
                _scale_base(model, layer, layer.merged_factors.pop(name), shared, divide=True)
            layer.merged = ()
        for layer in model.adapter_state.lora_layers():
            if layer.merged:
                w = own_param(model, f"{layer.path}.weight", shared)
                factors = tuple(f for n in layer.merged for f in layer.merged_factors.get(n, factors_of(layer, (n,), w)))
                write_merged(w.data, factors, layer.kind, layer.path, dst=w.data, sign=-1.0)
                layer.merged, layer.merged_factors = (), {}


def write_saved_copies(model) -> None:
    """``modules_to_save``: the active copies become the base's own parameters (merge_and_unload)."""
    for module in model.adapter_state.saved_tensors():
        copy = module()
        if copy is not module.original:
            own_param(model, module.path).data.copy_(copy.detach())


def dequantize_base(model) -> None:
    """Merging into 4/8-bit weights ruins them; a quantized base is first dequantized (compute dtype)."""
    if not is_quantized(model.base):
        return
    count = dequantize(model.base)
    for layer in model.adapter_state.lora_layers():  # GPT-2's layers are Conv1D again: [in, out] weights
        if is_conv1d(model.base.get_submodule(layer.path)):
            layer.kind = "conv1d"
            for adapter in layer.adapters.values():
                adapter.kind = "conv1d"
    warnings.warn(f"merge: the base is quantized; {count} layers were dequantized to their compute dtype and "
                  "the adapters are merged into those float weights", stacklevel=4)
    model.graphs.clear()  # the graphs read the packed weights: capture again on next use


def own_param(model, param_path: str, shared: set[str] | None = None) -> nn.Parameter:
    """The base parameter at ``param_path``, untied from any other module that shares it."""
    base = model.base
    owner_path, _, leaf = param_path.rpartition(".")
    owner = base.get_submodule(owner_path)
    param = getattr(owner, leaf)
    if shared is not None and param_path not in shared:
        return param
    sharers = [n for n, p in base.named_parameters(remove_duplicate=False) if p is param and n != param_path]
    if sharers:
        warnings.warn(f"merge: {param_path} is tied to {', '.join(sharers)}; untying it so only {owner_path} changes",
                      stacklevel=4)
        param = nn.Parameter(param.detach().clone(), requires_grad=False)
        setattr(owner, leaf, param)
        if getattr(base.config, "tie_word_embeddings", False):
            base.config.tie_word_embeddings = False
        model.graphs.clear()  # captured graphs read the old shared tensor: capture again on next use
    return param


def shared_names(base: nn.Module) -> set[str]:
    """Names of parameters that another module holds too (tied weights), in one walk."""
    seen: dict[int, str] = {}
    shared: set[str] = set()
    for name, p in base.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            shared.update((name, seen[id(p)]))
        else:
            seen[id(p)] = name
    return shared


def weighted_adapter(model, adapters: list[str], weights: list[float], combination_type: str,
                     svd_rank: int | None) -> tuple[LoraConfig, dict]:
    """The config and per-layer ``(A, B)`` of ``sum w_i * adapter_i`` (``"cat"`` exact, ``"svd"`` truncated)."""
    if combination_type not in ("cat", "svd"):
        raise AdapterError(f"combination_type={combination_type!r}: use 'cat' (exact) or 'svd' (truncated)")
    if len(adapters) != len(weights) or not adapters:
        raise AdapterError(f"add_weighted_adapter: {len(adapters)} adapters but {len(weights)} weights")
    for name in adapters:
        model.adapter_state.known(name)
    if any(model.peft_config[n].peft_type != "LORA" for n in adapters):
        kinds = sorted({model.peft_config[n].peft_type for n in adapters} - {"LORA"})
        raise AdapterError(f"add_weighted_adapter combines LoRA adapters; these are {', '.join(kinds)}: merge them "
                           "one at a time")
    dora = [n for n in adapters if model.peft_config[n].use_dora]
    if dora:
        raise AdapterError(f"add_weighted_adapter: {dora} are DoRA adapters, whose change depends on the weight's norm "
                           "and does not add up; merge them one at a time (merge_adapter / surgeon fold)")
    parts = {}
    for layer in model.adapter_state.lora_layers():
        pairs = [(layer.adapters[n], w) for n, w in zip(adapters, weights) if n in layer.adapters]
        if pairs:
            parts[layer.path] = _combine(pairs, combination_type, svd_rank)
    ranks = {p: ab[0].shape[0] for p, ab in parts.items()}
    first = model.peft_config[adapters[0]]
    config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=sorted(parts),
                        rank_pattern=ranks, alpha_pattern=dict(ranks), task_type=first.task_type,
                        base_model_name_or_path=first.base_model_name_or_path)
    return config, parts


def _combine(pairs, combination_type: str, svd_rank: int | None):
    if combination_type == "cat":
        a = torch.cat([ad.lora_A[: ad.r].detach() for ad, _ in pairs])
        b = torch.cat([ad.lora_B[:, : ad.r].detach() * (w * ad.scaling) for ad, w in pairs], dim=1)
        return a, b
    delta = sum((ad.lora_B[:, : ad.r].detach().float() @ ad.lora_A[: ad.r].detach().float()) * (w * ad.scaling)
                for ad, w in pairs)
    rank = svd_rank or max(ad.r for ad, _ in pairs)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]), (u[:, :rank] * root[None, :])
