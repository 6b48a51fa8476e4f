"""``surgeon export --int4``: the base's frozen linears as ONNX Runtime's ``com.microsoft.MatMulNBits`` (4-bit
blocks), quantized by ONNX Runtime's own ``MatMulNBitsQuantizer``; the LoRA inputs stay float and switchable.

Before quantizing, the exported graph is put in the form the quantizer reads: a ``Gemm`` with a constant weight
(GPT-2's Conv1D) becomes ``MatMul`` + ``Add``, and an output head that reads a transposed constant (a head tied to
the embeddings) gets its own transposed copy, so the head is quantized while the embedding table stays float (what
onnxruntime-genai's model builder does by default for int4). Every node that reads an adapter input is excluded:
left alone, the quantizer would take the rank-0 default initializers for constant weights, quantize the LoRA
matmuls and drop the adapter inputs.

Methods: ``rtn`` (ONNX Runtime's default blockwise round-to-nearest, symmetric) and ``hqq`` (half-quadratic,
ONNX Runtime's ``HQQWeightOnlyQuantConfig``). GPTQ in ONNX Runtime runs through Intel Neural Compressor and needs
calibration data; it is refused by name.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from surgeon.errors import ConfigError
from surgeon.names import EXTERNAL_DATA_SUFFIX

METHODS = ("rtn", "hqq")
BLOCK_SIZES = (16, 32, 64, 128)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
# surgeon check, relative to max |logit|: against the torch model holding the export's dequantized weights (keyed
# by accuracy level 4: int8 activations, else float compute), and against the float model (4-bit error included)
INT4_RTOL = {False: 1e-5, True: 2e-2}  # measured on tiny GPT-2: 6e-7 and 6e-3
INT4_FLOAT_RTOL = 0.3  # measured up to 0.2 (tiny GPT-2, merged then quantized)


@dataclasses.dataclass(frozen=True)
class Int4Spec:
    method: str = "rtn"
    block_size: int = 32
    accuracy_level: int = 4

    def __post_init__(self):
        if self.method == "gptq":
            raise ConfigError("--int4-method gptq: ONNX Runtime's GPTQ runs through Intel Neural Compressor with "
                              "calibration data, which surgeon does not ship; use rtn or hqq")
        if self.method not in METHODS:
            raise ConfigError(f"--int4-method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"--block-size {self.block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"--accuracy-level {self.accuracy_level}: choose one of 0, 1, 2, 3, 4")


def quantize_int4(path: Path, spec: Int4Spec, adapter_inputs: set[str], linears: dict[str, tuple[str, str]]) -> dict:
    """Quantize ``path`` (an exported model.onnx) in place; returns the manifest's ``int4`` entry. ``linears``:
    every name of a linear weight in the base -> (the linear's weight name, ``out_in`` for ``nn.Linear`` or
    ``in_out`` for GPT-2's Conv1D); the entry's
    ``weights`` says which weight each MatMulNBits holds (read from the exporter's node metadata), for ``surgeon
    check``."""
    proto = onnx.load(str(path))
    _matmul_form(proto)
    sources = _weight_sources(proto, linears)
    exclude = [n.name for n in proto.graph.node if adapter_inputs & set(n.input)]
    constants = {i.name for i in proto.graph.initializer} - adapter_inputs
    targets = [n.name for n in proto.graph.node
               if n.op_type == "MatMul" and n.name not in exclude and n.input[1] in constants]
    quantized_model = _run_quantizer(proto, spec, exclude)
    got = {n.name for n in quantized_model.graph.node if n.op_type == "MatMulNBits"}
    inputs = {i.name for i in quantized_model.graph.input}
    if not adapter_inputs <= inputs:  # the quantizer must have left every adapter input alone
        raise ConfigError(f"int4 quantization dropped adapter inputs {sorted(adapter_inputs - inputs)[:3]}")
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    if data.exists():  # a large model: its weights beside it, as they were
        data.unlink()
        onnx.save(quantized_model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name)
    else:
        onnx.save(quantized_model, str(path))
    return {"bits": 4, "onnx_op": "com.microsoft.MatMulNBits", "method": spec.method, "block_size": spec.block_size,
            "accuracy_level": spec.accuracy_level, "quantizer": "onnxruntime MatMulNBitsQuantizer",
            "quantized_matmuls": len(got), "float_matmuls": sorted(set(targets) - {_source(n) for n in got}),
            "embeddings": "float", "adapters": "float inputs",
            "weights": {n: list(sources[_source(n)]) for n in sorted(got) if _source(n) in sources}}


def _weight_sources(proto: onnx.ModelProto, linears: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """MatMul node -> the base weight it multiplies by, from the exporter's ``pkg.torch.onnx.fx_node`` metadata (the
    aten call and its parameter arguments); a weight folded with an adapter (``--merged``) has none."""
    by_flat = {"p_body_" + name.replace(".", "_"): linear for name, linear in linears.items()}
    out = {}
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.fx_node", "")
        found = [by_flat[w] for w in re.findall(r"%(p_body_\w+)", meta) if w in by_flat]
        if node.op_type == "MatMul" and len(found) == 1:
            out[node.name] = found[0]
    return out


def _source(name: str) -> str:
    """The MatMul a MatMulNBits node came from (the quantizer appends ``_Q4``)."""
    return name[: -len("_Q4")] if name.endswith("_Q4") else name


def _run_quantizer(proto: onnx.ModelProto, spec: Int4Spec, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq  # deferred: heavy, only --int4 needs it

    if spec.method == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=4)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=True,
                                                  accuracy_level=spec.accuracy_level, bits=4)
    quantizer = mnq.MatMulNBitsQuantizer(proto, bits=4, block_size=spec.block_size, is_symmetric=True,
                                         accuracy_level=spec.accuracy_level, nodes_to_exclude=exclude,
                                         algo_config=config)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # its INFO line per node
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    model = quantizer.model.model
    if spec.method == "hqq":  # HQQ writes no accuracy level of its own
        for node in model.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(helper.make_attribute("accuracy_level", spec.accuracy_level))
    return model


def _matmul_form(proto: onnx.ModelProto) -> None:
    """Gemm with a constant weight -> MatMul (+ Add); MatMul over Transpose(constant) -> MatMul over its own copy."""
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    for node in proto.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and node.input[1] in inits and attrs.get("transA", 0) == 0
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            weight = node.input[1]
            if attrs.get("transB", 0):
                weight = _transposed_copy(proto, inits, weight)
            product = f"{node.output[0]}.matmul" if len(node.input) > 2 else node.output[0]
            matmul = helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name)
            matmul.metadata_props.extend(node.metadata_props)  # the exporter's record of the aten call: its weight
            nodes.append(matmul)
            if len(node.input) > 2:
                nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
            continue
        source = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if (source is not None and source.op_type == "Transpose" and source.input[0] in inits
                and list(helper.get_attribute_value(source.attribute[0])) == [1, 0]):
            node.input[1] = _transposed_copy(proto, inits, source.input[0])
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    _drop_unused(proto)


def _transposed_copy(proto: onnx.ModelProto, inits: dict, name: str) -> str:
    new = f"{name}.T"
    if new not in inits:
        array = np.ascontiguousarray(numpy_helper.to_array(inits[name]).T)
        inits[new] = numpy_helper.from_array(array, new)
        proto.graph.initializer.append(inits[new])
    return new


def _drop_unused(proto: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nobody reads (the bypassed Transposes) and initializers no node reads."""
    outputs = {o.name for o in proto.graph.output}
    while True:
        used = {i for n in proto.graph.node for i in n.input} | outputs
        dead = [n for n in proto.graph.node if n.output and not set(n.output) & used]
        if not dead:
            break
        for n in dead:
            proto.graph.node.remove(n)
    used = {i for n in proto.graph.node for i in n.input} | {i.name for i in proto.graph.input}
    keep = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def dequantized_weights(proto: onnx.ModelProto, weights: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The float weight each ``MatMulNBits`` of an export stands for, under the source model's parameter name and in
    its layout (``weights``: the manifest's node -> [name, layout]): what ``surgeon check`` puts into the torch
    reference to compare at a tight tolerance."""
    inits = {i.name: i for i in proto.graph.initializer}
    out: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits" or node.name not in weights:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        packed = numpy_helper.to_array(inits[node.input[1]])  # [N, blocks, block / 2]: two 4-bit values a byte
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1, block).astype(np.float32)
        zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] in inits else None
        if zp is not None and zp.dtype != np.uint8:  # HQQ: a float zero point per block
            zero = zp.reshape(n, -1).astype(np.float32)
        elif zp is not None:  # asymmetric RTN: packed 4-bit zero points, one per block
            zp = zp.reshape(n, -1)
            zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, : q.shape[1]].astype(np.float32)
        else:
            zero = np.full(q.shape[:2], 8.0, np.float32)
        w_t = ((q - zero[..., None]) * scales[..., None]).reshape(n, -1)[:, :k]  # [N, K]
        name, layout = weights[node.name]
        out[name] = w_t if layout == "out_in" else np.ascontiguousarray(w_t.T)
    return out
