"""Quantized bases (bitsandbytes 4-bit nf4/fp4, 8-bit): opaque ops over packed weights, and a loader.

torch.export cannot trace bitsandbytes' tensor subclasses, so a quantized linear is a
``QuantLinear`` module whose forward is one custom op, ``surgeon::linear_4bit`` or
``surgeon::linear_8bit``, over plain tensors (the packed weight and its quantization state). The
captured graph therefore holds one node per frozen linear, with the packed weight as a
``get_attr``: matching finds it like an ``aten.linear`` site, the inject pass adds LoRA after it,
and autograd saves only the packed weight (the backward dequantizes again).

``load_quantized(dir, bits=4)`` builds the model with parameters on the meta device, then reads
the safetensors files one tensor at a time, quantizing each linear weight as it is read: the
whole fp32 model is never in memory. ``from_bitsandbytes(model)`` turns a model that transformers
loaded with ``BitsAndBytesConfig`` into the same form (sharing the packed storage).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from surgeon.errors import ConfigError, SurgeonError

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# heads stay in float, as transformers' bitsandbytes integration keeps them
SKIP = ("lm_head", "score", "classifier", "qa_outputs", "embed_out")


class QuantizationError(SurgeonError):
    """A quantized model or setting surgeon does not support."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32
    blocksize: int = 64

    def __post_init__(self):
        if self.bits not in BITS:
            raise QuantizationError(f"bits={self.bits} is not supported; use 4 (nf4 or fp4) or 8")
        if self.bits == 4 and self.quant_type not in QUANT_TYPES:
            raise QuantizationError(f"quant_type={self.quant_type!r}; use one of {QUANT_TYPES}")


# ---- the ops ------------------------------------------------------------------------------------
def _state(absmax, code, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize, quant_type, dtype):
    from bitsandbytes.functional import QuantState

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
    import bitsandbytes as bnb

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
    from bitsandbytes.functional import dequantize_4bit

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

QUANT_SITE_OPS = {torch.ops.surgeon.linear_4bit.default: 1, torch.ops.surgeon.linear_8bit.default: 1}


# ---- the module ---------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A frozen linear layer stored quantized; ``forward`` is one ``surgeon::linear_*bit`` op."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self.meta4: tuple = ()
        self.source = "Linear"  # "Conv1D" when it replaced GPT-2's transposed linear (for dequantize)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec) -> QuantLinear:
        """Quantize ``weight`` [out, in] (any float dtype)."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, spec, bias)
        if spec.bits == 4:
            from bitsandbytes.functional import quantize_4bit

            packed, state = quantize_4bit(weight.detach().float().contiguous(), blocksize=spec.blocksize,
                                          compress_statistics=spec.double_quant, quant_type=spec.quant_type)
            layer.set_4bit(packed, state)
        else:
            from bitsandbytes.functional import int8_vectorwise_quant

            cb, scb, _ = int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
            layer.register_buffer("weight_int8", cb)
            layer.register_buffer("row_scale", scb.float())
        return layer

    def set_4bit(self, packed: torch.Tensor, state) -> None:
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        nested = state.state2 is not None
        self.register_buffer("nested_absmax", state.state2.absmax if nested else None)
        self.register_buffer("nested_code", state.state2.code if nested else None)
        self.register_buffer("offset", torch.as_tensor(state.offset, dtype=torch.float32) if nested else None)
        self.meta4 = (list(state.shape), state.blocksize, state.state2.blocksize if nested else 0, state.quant_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.spec.compute_dtype
        if self.spec.bits == 4:
            shape, blocksize, nested_blocksize, quant_type = self.meta4
            return torch.ops.surgeon.linear_4bit(x, self.packed, self.absmax, self.code, self.bias, self.nested_absmax,
                                                 self.nested_code, self.offset, shape, blocksize, nested_blocksize,
                                                 quant_type, cd)
        return torch.ops.surgeon.linear_8bit(x, self.weight_int8, self.row_scale, self.bias, cd)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] as the op sees it."""
        if self.spec.bits == 4:
            shape, blocksize, nested_blocksize, quant_type = self.meta4
            return dequantize_4bit_weight(self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code,
                                          self.offset, shape, blocksize, nested_blocksize, quant_type, dtype)
        return dequantize_8bit_weight(self.weight_int8, self.row_scale, dtype)

    def packed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        kind = f"{self.spec.bits}-bit" + (f" {self.spec.quant_type}" if self.spec.bits == 4 else "")
        return f"in={self.in_features}, out={self.out_features}, {kind}, compute {self.spec.compute_dtype}"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def _quantizable(path: str, module: nn.Module) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in SKIP:
        return False
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# ---- the loader ---------------------------------------------------------------------------------
@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with parameters on the meta device and buffers (rotary tables, masks) real."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _quant_method(qc) -> str | None:
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return getattr(method, "value", method)


def check_not_prequantized(config, directory: Path) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return
    method = _quant_method(qc)
    raise QuantizationError(f"{directory}: the checkpoint is already quantized ({method}); surgeon quantizes float "
                            "checkpoints while loading (bitsandbytes 4/8-bit) and does not support "
                            f"{str(method).upper()} checkpoints yet; use the float checkpoint")


def load_quantized(directory: str | Path, bits: int = 4, *, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: str | torch.dtype = "float32", task: str | None = None) -> nn.Module:
    """Load a float safetensors checkpoint with its linear layers quantized as they are read.

    ``bits`` 4 (``quant_type`` nf4 or fp4, ``double_quant``) or 8; output heads stay float. Peak memory
    is the quantized model plus one float tensor at a time.
    """
    import transformers

    from surgeon.hub import model_dir, read_model_config, weight_files

    directory = model_dir(str(directory))
    read_model_config(directory)
    files = weight_files(directory)
    cd = DTYPES.get(compute_dtype, compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    if cd not in DTYPES.values():
        raise QuantizationError(f"compute_dtype={compute_dtype!r}; use one of {sorted(DTYPES)}")
    spec = QuantSpec(bits=bits, quant_type=quant_type, double_quant=double_quant, compute_dtype=cd)
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as err:
        from surgeon.errors import ModelFileError

        raise ModelFileError(f"{directory / 'config.json'}: transformers cannot read it "
                             f"({(str(err).strip().splitlines() or [type(err).__name__])[0]})") from None
    check_not_prequantized(config, directory)
    auto = transformers.AutoModelForSequenceClassification if task == "SEQ_CLS" else transformers.AutoModelForCausalLM
    with params_on_meta():
        model = auto.from_config(config)
    targets = {path: m for path, m in model.named_modules() if path and _quantizable(path, m)}
    params = dict(model.named_parameters())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for file in files:
        for key, tensor in read_tensors(file):
            name = _param_name(key, params)
            if name is None:
                continue
            owner, _, leaf = name.rpartition(".")
            if owner in targets:
                pending.setdefault(owner, {})[leaf] = tensor
                if "weight" in pending[owner] and ("bias" in pending[owner] or targets[owner].bias is None):
                    _swap(model, owner, targets[owner], pending.pop(owner), spec)
            else:
                _assign(model, name, tensor, params[name])
    for owner, got in pending.items():
        _swap(model, owner, targets[owner], got, spec)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise QuantizationError(f"{directory}: the checkpoint has no tensor for {', '.join(missing[:5])}")
    model.requires_grad_(False)
    return model.eval()


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a safetensors file, read with plain reads into its own buffer, in file order.

    No memory map: mapped file pages would count in the process's resident memory until the file is
    closed, which is the whole checkpoint; here only the tensor being quantized is resident.
    """
    import os

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        start = 8 + size
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        for key, entry in entries:
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise QuantizationError(f"{path}: tensor {key} has dtype {entry['dtype']}, which surgeon does not read")
            begin, end = entry["data_offsets"]
            buffer = bytearray(end - begin)
            view = memoryview(buffer)
            got = 0
            while got < len(buffer):
                n = os.preadv(f.fileno(), [view[got:]], start + begin + got)
                if n <= 0:
                    raise QuantizationError(f"{path}: truncated at tensor {key}")
                got += n
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield key, tensor.reshape(entry["shape"])


def _param_name(key: str, params: dict) -> str | None:
    if key in params:
        return key
    for prefix in ("transformer.", "model."):  # checkpoints saved from a base class without the head
        if prefix + key in params:
            return prefix + key
    return None


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, like: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    module._parameters[leaf] = nn.Parameter(tensor.to(like.dtype), requires_grad=False)


def _swap(model: nn.Module, path: str, module: nn.Module, tensors: dict[str, torch.Tensor], spec: QuantSpec) -> None:
    weight = tensors["weight"]
    conv1d = type(module).__name__ == "Conv1D"
    if conv1d:
        weight = weight.t()  # Conv1D stores [in, out]
    layer = QuantLinear.from_weight(weight, tensors.get("bias"), spec)
    layer.source = "Conv1D" if conv1d else "Linear"
    _set_module(model, path, layer)


def dequantize(model: nn.Module, dtype: torch.dtype | None = None, *, as_linear: bool = False,
               keep_config: bool = False) -> int:
    """Replace every ``QuantLinear`` by the float layer it came from (``nn.Linear`` or ``Conv1D``; ``as_linear``:
    always ``nn.Linear``), weights dequantized to ``dtype`` (default: the layer's compute dtype). Returns how many
    were replaced."""
    count = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        dt = dtype or module.spec.compute_dtype
        w = module.dequantized(torch.float32)
        bias = module.bias.detach().to(dt) if module.bias is not None else None
        if module.source == "Conv1D" and not as_linear:
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(module.out_features, module.in_features)
            layer.weight = nn.Parameter(w.t().contiguous().to(dt), requires_grad=False)
            layer.bias = nn.Parameter(bias if bias is not None else torch.zeros(module.out_features, dtype=dt),
                                      requires_grad=False)
        else:
            layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            layer.weight = nn.Parameter(w.to(dt), requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias, requires_grad=False)
        _set_module(model, path, layer)
        count += 1
    if not keep_config and hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    return count


def quant_bits(model: nn.Module) -> int | None:
    """4 or 8 when ``model`` has ``QuantLinear`` layers (all of one width), else None."""
    widths = {m.spec.bits for m in model.modules() if isinstance(m, QuantLinear)}
    if len(widths) > 1:
        raise QuantizationError(f"the model mixes {sorted(widths)}-bit layers; export supports one width")
    return widths.pop() if widths else None


@contextlib.contextmanager
def dequantized_view(peft_model) -> Iterator[dict[str, QuantLinear]]:
    """Within the block the base's quantized layers are float ``nn.Linear`` (fresh graphs); restored after."""
    base = peft_model.base
    saved = {path: m for path, m in base.named_modules() if isinstance(m, QuantLinear)}
    graphs = dict(peft_model._graphs)
    dequantize(base, torch.float32, as_linear=True, keep_config=True)
    peft_model._graphs.clear()
    try:
        yield saved
    finally:
        for path, module in saved.items():
            _set_module(base, path, module)
        peft_model._graphs.clear()
        peft_model._graphs.update(graphs)


# `surgeon check` on a quantized export: max |ORT - torch| / max |torch| allowed. The ONNX model holds the same
# packed weights (4-bit: com.microsoft.MatMulBnb4, nf4/fp4 as bitsandbytes packs them; 8-bit: DequantizeLinear
# with the LLM.int8 row scales), so the difference is fp32 accumulation order: measured <= 1e-6 relative.
CHECK_RTOL = {4: 1e-4, 8: 1e-4}


def _fp32_absmax(layer: QuantLinear) -> torch.Tensor:
    """Per-block scales as fp32 (double quantization undone exactly as bitsandbytes does)."""
    if layer.nested_absmax is None:
        return layer.absmax.float()
    from bitsandbytes.functional import QuantState, dequantize_blockwise

    _, _, nested_blocksize, _ = layer.meta4
    state2 = QuantState(absmax=layer.nested_absmax, code=layer.nested_code, blocksize=nested_blocksize,
                        dtype=torch.float32)
    return dequantize_blockwise(layer.absmax, state2) + layer.offset


def quantize_onnx_matmuls(path: Path, layers: dict[str, QuantLinear]) -> dict:
    """Give each base ``MatMul`` whose constant weight is a ``QuantLinear``'s dequantized weight that layer's own
    packed weight: 4-bit as ``com.microsoft.MatMulBnb4`` (nf4/fp4, bitsandbytes' layout), 8-bit as
    ``DequantizeLinear`` (int8 + row scales) feeding the ``MatMul``. Adapter matmuls and the head stay float."""
    import hashlib

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(path))  # with any external data
    by_value = {}
    for name, layer in layers.items():
        w = layer.dequantized(torch.float32).t().contiguous().numpy()
        by_value[(w.shape, hashlib.sha1(w.tobytes()).hexdigest())] = (name, layer)
    inits = {i.name: i for i in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, done, bits_seen, fallback = [], {}, set(), {}
    for node in proto.graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        hit = None
        if init is not None and len(init.dims) == 2:
            w = numpy_helper.to_array(init)
            hit = by_value.get((w.shape, hashlib.sha1(np.ascontiguousarray(w, dtype=np.float32).tobytes()).hexdigest()))
        if hit is None or hit[0] in done or hit[0] in fallback:
            nodes.append(node)
            continue
        module, layer = hit
        if layer.spec.bits == 4 and layer.in_features % layer.meta4[1]:
            # MatMulBnb4's blocks run along K within a column; bitsandbytes' blocks cross rows when K is not a
            # multiple of the block size: keep this layer's exact dequantized weight as a float MatMul
            fallback[module] = node.input[1]
            nodes.append(node)
            continue
        prefix = f"surgeon_q.{module}"
        k, n = layer.in_features, layer.out_features
        if layer.spec.bits == 4:
            shape, blocksize, _, quant_type = layer.meta4
            proto.graph.initializer.append(numpy_helper.from_array(layer.packed.reshape(-1).numpy(), f"{prefix}.packed"))
            proto.graph.initializer.append(numpy_helper.from_array(_fp32_absmax(layer).numpy(), f"{prefix}.absmax"))
            nodes.append(helper.make_node("MatMulBnb4", [node.input[0], f"{prefix}.packed", f"{prefix}.absmax"],
                                          list(node.output), name=f"{node.name}_bnb4", domain="com.microsoft",
                                          K=k, N=n, block_size=blocksize, quant_type=1 if quant_type == "nf4" else 0))
        else:
            weight_t = layer.weight_int8.t().contiguous().numpy()  # [K, N], the MatMul's B layout
            scale = (layer.row_scale.float() / 127.0).numpy()
            proto.graph.initializer.append(numpy_helper.from_array(weight_t, f"{prefix}.int8"))
            proto.graph.initializer.append(numpy_helper.from_array(scale, f"{prefix}.scale"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}.int8", f"{prefix}.scale"], [f"{prefix}.weight"],
                                          name=f"{node.name}_dq", axis=1))
            nodes.append(helper.make_node("MatMul", [node.input[0], f"{prefix}.weight"], list(node.output), name=node.name))
        done[module] = node.input[1]
        bits_seen.add(layer.spec.bits)
    missing = sorted(set(layers) - set(done) - set(fallback))
    if missing:
        raise QuantizationError(f"ONNX export: no MatMul found for quantized layers {', '.join(missing[:5])}")
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    dropped = {w for w in done.values() if uses.get(w, 0) == 1}
    kept = [i for i in proto.graph.initializer if i.name not in dropped]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    external = path.with_name(path.name + ".data")
    if external.exists():  # large models keep their weights beside the graph
        external.unlink()
        onnx.save(proto, str(path), save_as_external_data=True, location=external.name)
    else:
        onnx.save(proto, str(path))
    bits = bits_seen.pop() if len(bits_seen) == 1 else next(iter({m.spec.bits for m in layers.values()}))
    return {"bits": bits, "onnx_op": "com.microsoft.MatMulBnb4" if bits == 4 else "DequantizeLinear + MatMul",
            "quantized_matmuls": len(done), "format": "bitsandbytes nf4/fp4 blocks" if bits == 4 else "int8 + row scales",
            "float_fallback": sorted(fallback),
            # ORT's QDQ optimizer would turn DequantizeLinear + MatMul into a matmul over dynamically quantized
            # activations (about 0.5% off); AdapterSession disables it for 8-bit exports
            "disabled_optimizers": ["QDQSelectorActionTransformer"] if bits == 8 else []}


# ---- models transformers loaded with BitsAndBytesConfig ---------------------------------------------
def from_bitsandbytes(model: nn.Module) -> int:
    """Replace bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` modules by ``QuantLinear`` (same packed storage).

    Returns how many were replaced. The model computes the same outputs afterwards.
    """
    import bitsandbytes as bnb

    count = 0
    for path, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            cd = module.compute_dtype or torch.float32
            spec = QuantSpec(4, state.quant_type, state.nested, cd, state.blocksize)
            layer = QuantLinear(module.in_features, module.out_features, spec,
                                module.bias.data if module.bias is not None else None)
            layer.set_4bit(module.weight.data, state)
            layer.source = getattr(getattr(module, "source_cls", None), "__name__", "Linear")
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weight = module.weight
            scb = getattr(weight, "SCB", None)
            if scb is None:
                raise QuantizationError(f"{path}: Linear8bitLt has no SCB scales (not quantized yet?); move the "
                                        "model to its device first")
            spec = QuantSpec(8, compute_dtype=torch.float32)
            layer = QuantLinear(module.in_features, module.out_features, spec,
                                module.bias.data if module.bias is not None else None)
            layer.register_buffer("weight_int8", weight.data)
            layer.register_buffer("row_scale", scb.float())
            layer.source = getattr(getattr(module, "source_cls", None), "__name__", "Linear")
        else:
            continue
        _set_module(model, path, layer)
        count += 1
    return count


def has_bitsandbytes_layers(model: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def check_quant_config(value) -> None:
    """Reject quantization configs other than bitsandbytes with the name of what was found."""
    if value is None:
        return
    method = _quant_method(value)
    if method not in (None, "bitsandbytes"):
        raise ConfigError(f"quantization {method!r} is not supported yet (surgeon supports bitsandbytes 4-bit and 8-bit)")
