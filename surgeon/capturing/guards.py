"""torch.export's input guards as plain graph nodes, so a captured graph can be written to the capture cache.

``ep.module()`` checks a graph's inputs (``attention_mask.size()[1] == input_ids.size()[1]``, ``use_cache ==
False``, ``input_ids.size()[1] <= 64``...) in a ``GuardsFn`` module whose forward is generated Python code. The
cache writes no code, so ``guards_as_nodes`` rewrites each guard from its text into ``sym_size``, Python
arithmetic and comparisons and ``torch._assert(cond, "Guard failed: <text>")``, torch's own message. The texts
are read from the generated function's constants: if torch changes how it keeps them, ``NotPortable`` is
raised and the graph is just not cached.
"""

from __future__ import annotations

import ast
import operator

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.export._unlift import GuardsFn

from surgeon.graphs import copy_graph


class NotPortable(Exception):
    """A guard this module cannot rewrite."""


def guards_as_nodes(template: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``template`` whose ``torch.export`` input guards (a ``GuardsFn`` module running generated code) are
    graph nodes instead: ``sym_size``, Python arithmetic and comparisons, ``torch._assert(cond, "Guard failed: ...")``,
    rebuilt from each guard's text (read from the generated function's constants; if torch changes how it keeps
    them, the graph is simply not stored)."""
    gm = copy_graph(template)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), GuardsFn) or node.users:
            continue
        texts = _guard_texts(gm.get_submodule(node.target))
        info = gm.graph._codegen.pytree_info
        args, kwargs = pytree.tree_unflatten(list(node.args), info.in_spec)
        names = dict(zip(info.orig_args, [*args, *kwargs.values()])) if not args else None
        if names is None or len(names) != len(info.orig_args):
            raise NotPortable("guard inputs")
        with gm.graph.inserting_before(node):
            for text in texts:
                gm.graph.call_function(torch._assert, (_emit(gm.graph, ast.parse(text, mode="eval").body, names),
                                                       f"Guard failed: {text}"))
        gm.graph.erase_node(node)
        delattr(gm, node.target)
    gm.graph.lint()
    return gm


def _guard_texts(module: GuardsFn) -> list[str]:
    forward = vars(module).get("forward")
    if forward is None:
        return []
    fns = [c.cell_contents for c in (getattr(forward, "__closure__", None) or ()) if hasattr(c.cell_contents, "__code__")]
    if len(fns) != 1:
        raise NotPortable("guards")
    prefix = "Guard failed: "
    texts = [c[len(prefix):] for c in fns[0].__code__.co_consts if isinstance(c, str) and c.startswith(prefix)]
    calls = sum(1 for name in fns[0].__code__.co_names if name == "_assert")
    if not calls and texts:
        raise NotPortable("guards")
    return texts


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
            ast.GtE: operator.ge}


def _emit(graph: fx.Graph, tree: ast.AST, names: dict):
    """Graph nodes computing a guard expression over the graph's inputs (sizes, ints, bools); NotPortable otherwise."""
    if isinstance(tree, ast.Constant) and isinstance(tree.value, (bool, int)) or (
            isinstance(tree, ast.Constant) and tree.value is None):
        return tree.value
    if isinstance(tree, ast.Name) and tree.id in names:
        return names[tree.id]
    if isinstance(tree, ast.Subscript) and isinstance(tree.slice, ast.Constant) and isinstance(tree.slice.value, int):
        inner = tree.value
        if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute) and inner.func.attr == "size" \
                and not inner.args and not inner.keywords:
            return graph.call_function(torch.ops.aten.sym_size.int, (_emit(graph, inner.func.value, names), tree.slice.value))
        container = _emit(graph, inner, names)
        if isinstance(container, (list, tuple)):
            return container[tree.slice.value]
    if isinstance(tree, ast.BinOp) and type(tree.op) in _BINARY:
        return graph.call_function(_BINARY[type(tree.op)], (_emit(graph, tree.left, names), _emit(graph, tree.right, names)))
    if isinstance(tree, ast.UnaryOp) and isinstance(tree.op, (ast.USub, ast.Not)):
        return graph.call_function(operator.neg if isinstance(tree.op, ast.USub) else operator.not_,
                                   (_emit(graph, tree.operand, names),))
    if isinstance(tree, ast.BoolOp) and isinstance(tree.op, (ast.And, ast.Or)):
        out = _emit(graph, tree.values[0], names)
        for value in tree.values[1:]:
            out = graph.call_function(operator.and_ if isinstance(tree.op, ast.And) else operator.or_,
                                      (out, _emit(graph, value, names)))
        return out
    if isinstance(tree, ast.Compare) and all(type(op) in _COMPARE for op in tree.ops):
        left, out = _emit(graph, tree.left, names), None
        for op, right_tree in zip(tree.ops, tree.comparators):
            right = _emit(graph, right_tree, names)
            test = graph.call_function(_COMPARE[type(op)], (left, right))
            out = test if out is None else graph.call_function(operator.and_, (out, test))
            left = right
        return out
    raise NotPortable(f"guard expression {ast.dump(tree)[:80]}")
