"""Copying graphs so passes never edit their input."""

from __future__ import annotations

import copy
import warnings

from torch import fx


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
