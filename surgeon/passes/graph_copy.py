"""Copying graphs so passes never edit their input, and reading/writing dotted attributes."""

from __future__ import annotations

import copy
import warnings

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


def node_named(gm: fx.GraphModule, name: str) -> fx.Node:
    for node in gm.graph.nodes:
        if node.name == name:
            return node
    raise KeyError(name)


def subgraph(gm: fx.GraphModule, path: str) -> fx.GraphModule:
    return gm.get_submodule(path) if path else gm


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
