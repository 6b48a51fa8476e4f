"""Graph plumbing every stage shares: copying a graph so passes never edit their input, walking
higher-order-op subgraphs, and reading or writing dotted attributes."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import torch
from torch import fx, nn


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with its own graph (and own nested subgraphs); tensors and other modules shared."""
    with warnings.catch_warnings():  # torch's pytree deprecation notice when copying the codegen
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    for name, child in list(new.named_children()):
        if isinstance(child, fx.GraphModule):
            setattr(new, name, copy_graph(child))
    new.train(gm.training)
    return new


def graphs_of(gm: fx.GraphModule) -> Iterator[tuple[str, fx.GraphModule]]:
    """The top graph and every higher-order-op subgraph, as (attribute path, GraphModule)."""
    yield "", gm
    for name, sub in gm.named_modules():
        if name and isinstance(sub, fx.GraphModule):
            yield name, sub


def recompile_all(gm: fx.GraphModule) -> None:
    """Drop dead nodes, check and regenerate the code of the top graph and every subgraph."""
    for _, sub in graphs_of(gm):
        sub.graph.eliminate_dead_code()
        sub.graph.lint()
        sub.recompile()


def module_path_of(node: fx.Node) -> str | None:
    """The eager module a node was traced from (its innermost ``nn_module_stack`` entry)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].")


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(name)


def subgraph(gm: fx.GraphModule, path: str) -> fx.GraphModule:
    return gm.get_submodule(path) if path else gm


def existing(root: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at ``dotted``, or None."""
    try:
        return root.get_submodule(dotted)
    except AttributeError:
        return None


def fetch_attr(gm: nn.Module, target: str) -> torch.Tensor:
    """The tensor at a dotted ``get_attr`` target (tied names included, which ``get_parameter`` can miss)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def set_nested(root: nn.Module, dotted: str, value: nn.Module | nn.Parameter) -> None:
    """Register a module or parameter at ``dotted``, creating empty parent modules on the way."""
    owner = root
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.add_module(leaf, value)
