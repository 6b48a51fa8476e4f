"""Matching: ``(graph, config) -> Match``: which modules get LoRA, where in the graph, and why not the rest.

Semantics are PEFT's (list: exact path or ``.suffix``; string: ``re.fullmatch`` on the path;
``"all-linear"``; ``exclude_modules``; ``layers_to_transform`` / ``layers_pattern``), with stricter
errors: every listed name must match a module, and a match on a module LoRA cannot wrap is an error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from torch import fx

from surgeon.capturing import SUPPORTED_KINDS, CaptureInfo, ModuleInfo
from surgeon.config import CLASSIFIER_HEADS, LoraConfig, TaskType
from surgeon.errors import ConfigError, TargetNotFoundError, UnsupportedModuleError, suggest
from surgeon.graphs import graphs_of, module_path_of
from surgeon.quant import QUANT_SITE_OPS

ATEN = torch.ops.aten
# op -> (kind of module it computes, index of the weight argument, index of the LoRA input)
SITE_OPS = {
    ATEN.linear.default: ("linear", 1, 0),
    ATEN.addmm.default: ("conv1d", 2, 1),
    ATEN.embedding.default: ("embedding", 0, 1),
}
SITE_OPS.update({op: ("linear", w, 0) for op, w in QUANT_SITE_OPS.items()})  # quantized linears (packed weight)
_BIAS_ARG = {ATEN.linear.default: 2, ATEN.addmm.default: 0}  # where a float site's bias is, if it has one


def site_bias(site: fx.Node) -> fx.Node | None:
    """The bias argument of a float linear site (``linear(x, W, b)``, GPT-2's ``addmm(b, x, W)``), or None."""
    b = _BIAS_ARG.get(site.target)
    return site.args[b] if b is not None and len(site.args) > b else None


def branch_args(site: fx.Node, layer) -> tuple:
    """The arguments of a LoRA branch on ``site``: ``(x, y)``, and the site's weight and bias (or None) when
    ``layer`` holds a DoRA adapter (its update depends on them)."""
    x = site.args[SITE_OPS[site.target][2]]
    if not getattr(layer, "dora", False):
        return x, site
    return x, site, site.args[SITE_OPS[site.target][1]], site_bias(site)


SUPPORTED_TYPES = "torch.nn.Linear, transformers Conv1D (GPT-2), torch.nn.Embedding"

# What PEFT targets when target_modules is None (same facts as PEFT's defaults).
DEFAULT_TARGETS = {
    "gpt2": ("c_attn",), "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"), "opt": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",), "phi": ("q_proj", "v_proj"), "bert": ("query", "value"),
    "roberta": ("query", "value"), "distilbert": ("q_lin", "v_lin"), "t5": ("q", "v"),
    "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"), "falcon": ("query_key_value",),
    "gpt_neox": ("query_key_value",), "bloom": ("query_key_value",), "mixtral": ("q_proj", "v_proj"),
}


@dataclasses.dataclass(frozen=True)
class Site:
    """One call of a target module in the graph: the graph (by submodule path) and the node name."""

    graph_path: str  # "" for the top graph, else the higher-order-op subgraph's attribute path
    node: str


@dataclasses.dataclass(frozen=True)
class Target:
    path: str
    kind: str
    in_features: int
    out_features: int
    r: int
    alpha: float
    scale: float
    sites: tuple[Site, ...]


@dataclasses.dataclass(frozen=True)
class Skip:
    path: str
    kind: str
    in_features: int
    out_features: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Match:
    targets: tuple[Target, ...]
    skipped: tuple[Skip, ...]
    modules_to_save: tuple[str, ...]


def find_sites(gm: fx.GraphModule) -> dict[str, list[Site]]:
    """Module path -> the graph nodes computing that module's linear/addmm/embedding."""
    sites: dict[str, list[Site]] = {}
    for gpath, sub in graphs_of(gm):
        for node in sub.graph.nodes:
            if node.op == "call_function" and node.target in SITE_OPS:
                path = module_path_of(node)
                w = node.args[SITE_OPS[node.target][1]]
                if path is not None and isinstance(w, fx.Node) and w.op == "get_attr":
                    sites.setdefault(path, []).append(Site(gpath, node.name))
    return sites


def match(gm: fx.GraphModule, config: LoraConfig) -> Match:
    info: CaptureInfo = gm.meta["surgeon"]
    targets_spec = _resolve_targets(config, info)
    modules = info.modules
    saved = resolve_modules_to_save(config, info)
    sites = find_sites(gm)
    _check_every_name_matches(config, targets_spec, modules)
    targets, skipped = [], []
    for path, m in modules.items():
        hit = _matches(targets_spec, path) and not _excluded(config, path)
        if targets_spec == "all-linear" and m.kind not in ("linear", "conv1d"):
            hit = False
        reason = None
        if _excluded(config, path):
            reason = "excluded by exclude_modules"
        elif any(_in_module(s, path) for s in saved):
            reason, hit = "in modules_to_save", False
        elif hit and not _layer_ok(config, path):
            reason, hit = f"layer not in layers_to_transform={config.layers_to_transform}", False
        elif not hit:
            reason = "not in target_modules"
        if hit and m.kind is None:
            raise UnsupportedModuleError(
                f"target {path!r} is a {m.type_name}, which LoRA cannot wrap; supported: {SUPPORTED_TYPES}. "
                f"Target its layers instead, e.g. {_children_hint(path, modules)}"
            )
        if m.kind is None:
            continue
        if hit and targets_spec == "all-linear" and (m.kind == "embedding" or path == info.output_embedding):
            hit, reason = False, "output layer (all-linear skips it)" if path == info.output_embedding else "embedding (all-linear)"
        if hit and path not in sites:
            hit, reason = False, "not called in the captured graph"
        if hit:
            r, alpha = config.rank_for(path), config.alpha_for(path)
            targets.append(Target(path, m.kind, m.in_features, m.out_features, r, alpha, config.scale_for(path), tuple(sites[path])))
        else:
            skipped.append(Skip(path, m.kind, m.in_features, m.out_features, reason or "not targeted"))
    if not targets:
        raise TargetNotFoundError(
            f"target_modules={config.target_modules!r} selects no module LoRA can wrap in {info.model_class}; "
            f"nearest LoRA-able names: {_leaf_names(modules)[:12]}"
        )
    return Match(tuple(targets), tuple(skipped), saved)


def resolve_modules_to_save(config: LoraConfig, info: CaptureInfo) -> tuple[str, ...]:
    """Paths of modules copied as trainable; classifier heads are added for SEQ_CLS / TOKEN_CLS as PEFT does."""
    names = list(config.modules_to_save or ())
    auto = config.task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS)
    if auto:
        names += [h for h in CLASSIFIER_HEADS if h not in names]
    paths = []
    for name in names:
        found = [p for p in info.modules if names_match((name,), p)]
        if not found and not (auto and name in CLASSIFIER_HEADS):
            raise TargetNotFoundError(
                f"modules_to_save: {name!r} matches no module in {info.model_class}; "
                f"nearest: {suggest(name, info.modules) or _leaf_names(info.modules)[:8]}"
            )
        paths += found
    return tuple(dict.fromkeys(paths))


def _resolve_targets(config: LoraConfig, info: CaptureInfo):
    spec = config.target_modules
    if spec is None:
        defaults = getattr(config, "default_targets", DEFAULT_TARGETS)  # IA3Config has its own
        if info.model_type in defaults:
            return defaults[info.model_type]
        raise ConfigError(
            f"target_modules is not set and surgeon has no default for model_type={info.model_type!r}; "
            f"set it to some of: {_leaf_names(info.modules)[:12]}"
        )
    if spec == "all-linear" or spec == ("all-linear",):
        return "all-linear"
    return spec


def names_match(spec, path: str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole path; a list holds exact paths or ``.suffix`` names."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


def _matches(spec, path: str) -> bool:
    return spec == "all-linear" or names_match(spec, path)


def _excluded(config: LoraConfig, path: str) -> bool:
    return bool(config.exclude_modules) and names_match(config.exclude_modules, path)


def _in_module(module_path: str, path: str) -> bool:
    return path == module_path or path.startswith(module_path + ".")


def _layer_ok(config: LoraConfig, path: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == ():
        return True
    patterns = config.layers_pattern
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        found = None
        for pattern in ((patterns,) if isinstance(patterns, str) else patterns):
            found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
            if found:
                break
    if not found:
        return False
    index = int(found.group(1))
    return index == wanted if isinstance(wanted, int) else index in wanted


def _check_every_name_matches(config: LoraConfig, spec, modules: Mapping[str, ModuleInfo]) -> None:
    if spec == "all-linear":
        return
    if isinstance(spec, str):
        if not any(names_match(spec, p) for p in modules):
            raise TargetNotFoundError(
                f"target_modules regex {spec!r} matches no module path (re.fullmatch on paths such as "
                f"{next(iter(p for p, m in modules.items() if m.kind), '?')!r}); nearest names: {_leaf_names(modules)[:8]}"
            )
        return
    missing = [n for n in spec if not any(names_match((n,), p) for p in modules)]
    if missing:
        leaves = _leaf_names(modules)
        parts = [f"{n!r} (nearest: {', '.join(suggest(n, leaves)) or 'none'})" for n in missing]
        raise TargetNotFoundError(
            f"target_modules: {len(missing)} of {len(spec)} names match no module: {'; '.join(parts)}. "
            f"LoRA-able names in this model: {leaves[:12]}"
        )


def _leaf_names(modules: Mapping[str, ModuleInfo]) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p, m in modules.items() if m.kind in SUPPORTED_KINDS})


def _children_hint(path: str, modules: Mapping[str, ModuleInfo]) -> str:
    kids = sorted({p[len(path) + 1:].split(".")[0] for p, m in modules.items() if p.startswith(path + ".") and m.kind})
    return ", ".join(repr(k) for k in kids[:6]) or "its nn.Linear children"
