"""The quantized linear ops: opaque to torch.export, with their own backward over the packed weight.

torch.export cannot trace bitsandbytes' tensor subclasses, so a quantized linear is one custom op,
``surgeon::linear_4bit`` or ``surgeon::linear_8bit``, over plain tensors (the packed weight and its
quantization state). The captured graph holds one node per frozen linear with the packed weight as a
``get_attr``; autograd saves only the packed weight (the backward dequantizes again).
bitsandbytes is imported where an op runs (``_bnb``): it costs seconds to import and only
quantized models need it.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch.nn import functional as F


def _bnb(module: str = "bitsandbytes"):
    """bitsandbytes (or one of its modules), imported on first use: a slow import only quantized models need."""
    return importlib.import_module(module)


def _state(absmax, code, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, quant_type, dtype):
    QuantState = _bnb("bitsandbytes.functional").QuantState

    state2 = None
    if nested_absmax is not None:
        state2 = QuantState(absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize, dtype=torch.float32)
    return QuantState(absmax=absmax, shape=torch.Size(shape), code=code, blocksize=blocksize, quant_type=quant_type,
                      dtype=dtype, offset=offset, state2=state2)

@torch.library.custom_op("surgeon::linear_4bit", mutates_args=())
def linear_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                bias: Optional[torch.Tensor], nested_absmax: Optional[torch.Tensor],
                nested_code: Optional[torch.Tensor], offset: Optional[torch.Tensor], shape: list[int], blocksize: int,
                nested_blocksize: int, quant_type: str, compute_dtype: torch.dtype) -> torch.Tensor:
    """``x @ dequant(packed).T + bias`` in ``compute_dtype`` with bitsandbytes' own 4-bit matmul."""
    bnb = _bnb()
    state = _state(absmax, code, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, quant_type,
                   compute_dtype)
    with torch.no_grad():
        out = bnb.matmul_4bit(x.to(compute_dtype), packed.t(), quant_state=state,
                              bias=None if bias is None else bias.to(compute_dtype))
    return out.to(x.dtype)


@linear_4bit.register_fake
def _(x, packed, absmax, code, bias, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize,
      quant_type, compute_dtype):
    return x.new_empty((*x.shape[:-1], shape[0]))


def dequantize_4bit_weight(packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
                           nested_blocksize, quant_type, dtype) -> torch.Tensor:
    dequantize_4bit = _bnb("bitsandbytes.functional").dequantize_4bit
    state = _state(absmax, code, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, quant_type,
                   dtype)
    return dequantize_4bit(packed, state).to(dtype)


def _setup_4bit(ctx, inputs, output):
    x, packed, absmax, code, bias, nested_absmax, nested_code, offset, *meta = inputs
    ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)  # packed: no fp weight kept
    ctx.meta = meta
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _backward_4bit(ctx, grad):
    packed, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
    shape, blocksize, nested_blocksize, quant_type, compute_dtype = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_4bit_weight(packed, absmax, code, nested_absmax, nested_code, offset, shape, blocksize,
                                   nested_blocksize, quant_type, compute_dtype)
        grad_x = (grad.to(compute_dtype) @ w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None, None, None, None, None, None


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


@torch.library.custom_op("surgeon::linear_8bit", mutates_args=())
def linear_8bit(x: torch.Tensor, weight_int8: torch.Tensor, row_scale: torch.Tensor, bias: Optional[torch.Tensor],
                compute_dtype: torch.dtype) -> torch.Tensor:
    """``x @ (int8 weight * row_scale / 127).T + bias`` in ``compute_dtype`` (LLM.int8 vector-wise scales)."""
    w = dequantize_8bit_weight(weight_int8, row_scale, compute_dtype)
    return F.linear(x.to(compute_dtype), w, None if bias is None else bias.to(compute_dtype)).to(x.dtype)


@linear_8bit.register_fake
def _(x, weight_int8, row_scale, bias, compute_dtype):
    return x.new_empty((*x.shape[:-1], weight_int8.shape[0]))


def dequantize_8bit_weight(weight_int8: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight_int8.float() * (row_scale.float() / 127.0).unsqueeze(1)).to(dtype)


def _setup_8bit(ctx, inputs, output):
    x, weight_int8, row_scale, bias, compute_dtype = inputs
    ctx.save_for_backward(weight_int8, row_scale)
    ctx.compute_dtype, ctx.x_dtype, ctx.has_bias = compute_dtype, x.dtype, bias is not None


def _backward_8bit(ctx, grad):
    weight_int8, row_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_8bit_weight(weight_int8, row_scale, ctx.compute_dtype)
        grad_x = (grad.to(ctx.compute_dtype) @ w).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias, None


linear_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)

# op -> index of its packed weight argument: the site-op table matching extends with these
QUANT_SITE_OPS = {torch.ops.surgeon.linear_4bit.default: 1, torch.ops.surgeon.linear_8bit.default: 1}
