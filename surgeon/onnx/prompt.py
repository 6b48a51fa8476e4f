"""Prompt tuning in an export: the virtual tokens as a switchable graph input, ``prompt_embeddings`` [n, dim].

A rewrite of the exported base graph, in ONNX: every reader of ``input_ids`` reads it with n zeros in front, so
the graph sees n + s positions throughout (the shapes it derives its sequence length from included), and the
embedding lookup's first n rows are replaced by the prompt (``Concat(Expand(prompt), lookup[:, n:])``). The default is a [0, dim] tensor: fed nothing, the graph is the base model. A runtime feeds
the prompt on the prefill only, with the attention mask and the position ids covering the n virtual positions;
the decode steps feed nothing, the KV cache holding the virtual tokens already (``AdapterSession.generate``).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from surgeon.errors import ExportFileError
from surgeon.names import PROMPT_KEY as PROMPT_INPUT


def add_prompt_input(proto, ids: str = "input_ids") -> int:
    """Rewrite ``proto`` in place; returns the embedding width."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    derived = {ids}  # input_ids and its reshapes / casts (GPT-2 looks up a view of it)
    for node in graph.node:
        if node.op_type in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten") and node.input[0] in derived:
            derived.update(node.output)
    lookups = [n for n in graph.node if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in derived
               and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]
    if len(lookups) != 1:
        raise ExportFileError(f"prompt tuning: expected one embedding lookup of {ids} in the exported graph, found "
                              f"{len(lookups)}; this architecture's export is not supported for prompt tuning yet")
    lookup = lookups[0]
    table = inits[lookup.input[0]]
    dim = int(table.dims[1])
    out = lookup.output[0]
    dtype = table.data_type
    graph.input.append(helper.make_tensor_value_info(PROMPT_INPUT, dtype, ["prompt_tokens", dim]))
    graph.initializer.append(helper.make_tensor(PROMPT_INPUT, dtype, [0, dim], []))
    k = f"{PROMPT_INPUT}.rw"
    const = {f"{k}.zero": np.array([0], np.int64), f"{k}.one": np.array([1], np.int64),
             f"{k}.dim": np.array([dim], np.int64), f"{k}.big": np.array([np.iinfo(np.int64).max], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in const.items())
    head = [  # [b], [n]; the padded ids [b, n + s]
        helper.make_node("Shape", [ids], [f"{k}.ids_shape"]),
        helper.make_node("Slice", [f"{k}.ids_shape", f"{k}.zero", f"{k}.one"], [f"{k}.batch"]),
        helper.make_node("Shape", [PROMPT_INPUT], [f"{k}.prompt_shape"]),
        helper.make_node("Slice", [f"{k}.prompt_shape", f"{k}.zero", f"{k}.one"], [f"{k}.n"]),
        helper.make_node("Concat", [f"{k}.batch", f"{k}.n"], [f"{k}.pad_shape"], axis=0),
        helper.make_node("ConstantOfShape", [f"{k}.pad_shape"], [f"{k}.pad"],
                         value=helper.make_tensor("zero", TensorProto.INT64, [1], [0])),
        helper.make_node("Concat", [f"{k}.pad", ids], [f"{k}.ids"], axis=1),
    ]
    tail = [  # the prompt [b, n, dim] in place of the lookup's first n rows (the padding's)
        helper.make_node("Unsqueeze", [PROMPT_INPUT, f"{k}.zero"], [f"{k}.prompt1"]),
        helper.make_node("Concat", [f"{k}.batch", f"{k}.n", f"{k}.dim"], [f"{k}.expand_shape"], axis=0),
        helper.make_node("Expand", [f"{k}.prompt1", f"{k}.expand_shape"], [f"{k}.prompt_rows"]),
        helper.make_node("Slice", [out, f"{k}.n", f"{k}.big", f"{k}.one"], [f"{k}.rest"]),
        helper.make_node("Concat", [f"{k}.prompt_rows", f"{k}.rest"], [f"{k}.embeds"], axis=1),
    ]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == ids:
                node.input[i] = f"{k}.ids"
            elif name == out:
                node.input[i] = f"{k}.embeds"
    for value in graph.output:
        if value.name == out:  # the lookup's output is itself a graph output (not in a decoder): keep the name
            raise ExportFileError("prompt tuning: the embedding lookup is a graph output; not supported")
    nodes = list(graph.node)
    at = nodes.index(lookup) + 1
    del graph.node[:]
    graph.node.extend(head + nodes[:at] + tail + nodes[at:])
    return dim
