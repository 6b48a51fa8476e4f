"""Quantized layers in ONNX, through the exporter's translation table.

``TRANSLATION`` maps each quantized op to ONNX as the layer stores it: ``surgeon::linear_4bit`` to
``com.microsoft.MatMulBnb4`` (nf4/fp4 blocks exactly as bitsandbytes packs them, block scales as
fp32), ``surgeon::linear_8bit`` to ``DequantizeLinear`` (int8 + LLM.int8 row scales) feeding a
``MatMul``. A 4-bit layer whose input size is not a multiple of its block size keeps an exact
float ``MatMul`` (MatMulBnb4's blocks run down each column; bitsandbytes' cross rows there).

The buffers carry no values while a translation runs, so the arithmetic on them (double
quantization undone, nibbles unpacked) is emitted as ONNX nodes marked ``FOLD`` and folded into
initializers by ``finish`` after export, at any size.
"""

from __future__ import annotations

import numpy as np
import onnxscript
import onnxscript.optimizer
import torch
from onnx.defs import OpSchema
from onnxscript import ir
from onnxscript import opset18 as op
from torch import nn

from surgeon.quant.layer import QuantLinear, quantized_linears

FOLD = "surgeon.fold"  # node metadata: computes from constants only, fold at any size
NAMES = "surgeon.names"  # node meta: (buffer value, {input index: role}) to name the folded initializers
# `surgeon check` on a quantized export: max |ORT - torch| / max |torch| allowed. The ONNX model holds the same
# packed weights, so the difference is fp32 accumulation order: measured <= 1e-6 relative.
CHECK_RTOL = {4: 1e-4, 8: 1e-4}

_INT = OpSchema.AttrType.INT
_BNB4 = OpSchema(  # onnx ships no schema for this ONNX Runtime contrib op; the exporter's recorder needs one
    "MatMulBnb4", "com.microsoft", 1,
    inputs=[OpSchema.FormalParameter("A", "T1"), OpSchema.FormalParameter("B", "T2"),
            OpSchema.FormalParameter("absmax", "T1")],
    outputs=[OpSchema.FormalParameter("Y", "T1")],
    type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""), ("T2", ["tensor(uint8)"], "")],
    attributes=[OpSchema.Attribute(n, _INT, "") for n in ("K", "N", "block_size", "quant_type")])
MatMulBnb4 = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulBnb4", _BNB4)


def _fold(value: ir.Value) -> ir.Value:
    value.producer().metadata_props[FOLD] = "1"
    return value


def _const(array) -> ir.Value:
    return _fold(op.Constant(value=ir.tensor(np.asarray(array))))


def _named(out: ir.Value, buffer: ir.Value, roles: dict[int, str]) -> ir.Value:
    out.producer().meta[NAMES] = (buffer, roles)  # the exporter names `buffer` after its module path later
    return out


def _fp32_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize) -> ir.Value:
    """Block scales as fp32: double quantization undone as bitsandbytes does (code[a] * nested[i // n] + offset)."""
    if nested_absmax is None:
        return _fold(op.Cast(absmax, to=ir.DataType.FLOAT))
    blocks = absmax.shape[0]  # the buffer's shape is static
    scale = _fold(op.Gather(nested_absmax, _const(np.arange(blocks, dtype=np.int64) // nested_blocksize)))
    value = _fold(op.Gather(nested_code, _fold(op.Cast(absmax, to=ir.DataType.INT64))))
    return _fold(op.Add(_fold(op.Mul(value, scale)), offset))


def _float_weight_t(packed_1d, absmax_f, blocks: int, code, shape, blocksize: int) -> ir.Value:
    """The exact float weight as [K, N], from bitsandbytes' flat row-major 4-bit blocks (all folded)."""
    n, k = shape
    numel = n * k  # values made inside a translation have no shape: sizes come from the arguments
    hi = _fold(op.BitShift(packed_1d, _const(np.uint8(4)), direction="RIGHT"))
    lo = _fold(op.BitwiseAnd(packed_1d, _const(np.uint8(15))))
    pairs = _fold(op.Concat(_fold(op.Unsqueeze(hi, _const([1]))), _fold(op.Unsqueeze(lo, _const([1]))), axis=1))
    values = _fold(op.Gather(code, _fold(op.Cast(_fold(op.Reshape(pairs, _const([-1]))), to=ir.DataType.INT64))))
    values = _fold(op.Slice(values, _const([0]), _const([numel])))
    if blocks * blocksize > numel:  # the last block is partial
        values = _fold(op.Concat(values, _const(np.zeros(blocks * blocksize - numel, np.float32)), axis=0))
    w = _fold(op.Mul(_fold(op.Reshape(values, _const([blocks, blocksize]))), _fold(op.Unsqueeze(absmax_f, _const([1])))))
    w = _fold(op.Slice(_fold(op.Reshape(w, _const([-1]))), _const([0]), _const([numel])))
    return _fold(op.Transpose(_fold(op.Reshape(w, _const([n, k]))), perm=[1, 0]))


def _in_compute_dtype(value, dtype):
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def linear_4bit(x, packed, absmax, code, bias, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize,
                quant_type, compute_dtype):
    """Tensors arrive as ``ir.Value`` (None stays None), the other arguments as Python values (dtype: ir.DataType)."""
    n, k = shape
    xc = _in_compute_dtype(x, compute_dtype)
    absmax_f = _fp32_absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    packed_1d = _fold(op.Reshape(packed, _const([-1])))
    if k % blocksize == 0:
        y = _named(MatMulBnb4(xc, packed_1d, absmax_f, K=k, N=n, block_size=blocksize,
                              quant_type=1 if quant_type == "nf4" else 0), packed, {1: "packed", 2: "absmax"})
    else:
        y = _named(op.MatMul(xc, _float_weight_t(packed_1d, absmax_f, absmax.shape[0], code, shape, blocksize)),
                   packed, {1: "weight_t"})
    if bias is not None:
        y = op.Add(y, _in_compute_dtype(bias, compute_dtype))
    return _in_compute_dtype(y, x.dtype)


def linear_8bit(x, weight_int8, row_scale, bias, compute_dtype):
    xc = _in_compute_dtype(x, compute_dtype)
    scale = _fold(op.Div(_fold(op.Cast(row_scale, to=ir.DataType.FLOAT)), _const(np.float32(127.0))))
    w_t = _fold(op.Transpose(weight_int8, perm=[1, 0]))  # int8 [K, N]: folding keeps it int8
    w = _named(op.DequantizeLinear(w_t, scale, axis=1), weight_int8, {0: "int8", 1: "scale"})  # never folded
    y = op.MatMul(xc, _in_compute_dtype(w, compute_dtype))
    if bias is not None:
        y = op.Add(y, _in_compute_dtype(bias, compute_dtype))
    return _in_compute_dtype(y, x.dtype)


TRANSLATION = {torch.ops.surgeon.linear_4bit.default: linear_4bit, torch.ops.surgeon.linear_8bit.default: linear_8bit}


def finish(model: ir.Model) -> None:
    """Fold exactly the marked nodes (the default folder stops at 8192-element inputs), then name what they made
    ``<module path>.<role>`` instead of ``val_N``."""
    onnxscript.optimizer.fold_constants(model, output_size_limit=2**62,
                                        should_fold=lambda node: node.metadata_props.get(FOLD) == "1")
    ir.passes.common.RemoveUnusedNodesPass()(model)
    left = sorted({n.op_type for n in model.graph if n.metadata_props.get(FOLD) == "1"})
    if left:
        raise RuntimeError(f"quantized ONNX export: nodes {left} computing the packed weights were not folded")
    for node in model.graph:
        buffer, roles = node.meta.get(NAMES, (None, None))
        if buffer is None:
            continue
        prefix = buffer.name.rpartition(".")[0]
        for index, role in roles.items():
            value = node.inputs[index]
            if value.is_initializer() and len(value.uses()) == 1:
                value.name = f"{prefix}.{role}"


def export_facts(base: nn.Module) -> dict | None:
    """The manifest's ``quantization`` entry for a quantized base (None for a float one)."""
    layers: dict[str, QuantLinear] = quantized_linears(base)
    if not layers:
        return None
    bits = next(iter(layers.values())).spec.bits
    fallback = sorted(p for p, m in layers.items() if bits == 4 and m.in_features % m.meta4[1])
    return {"bits": bits, "onnx_op": "com.microsoft.MatMulBnb4" if bits == 4 else "DequantizeLinear + MatMul",
            "quantized_matmuls": len(layers) - len(fallback),
            "format": "bitsandbytes nf4/fp4 blocks" if bits == 4 else "int8 + row scales", "float_fallback": fallback,
            # ORT's QDQ optimizer would turn DequantizeLinear + MatMul into a matmul over dynamically quantized
            # activations (about 0.5% off); AdapterSession disables it for 8-bit exports
            "disabled_optimizers": ["QDQSelectorActionTransformer"] if bits == 8 else []}
