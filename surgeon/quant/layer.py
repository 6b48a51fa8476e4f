"""``QuantLinear``: a frozen linear layer stored quantized (bitsandbytes 4-bit nf4/fp4 or 8-bit).

Its ``forward`` is one ``surgeon::linear_*bit`` op; ``from_bitsandbytes`` turns the layers of a model
transformers loaded with ``BitsAndBytesConfig`` into this form (sharing the packed storage), and
``dequantize`` turns them back into float layers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from transformers.pytorch_utils import Conv1D

from surgeon.compat import is_conv1d
from surgeon.errors import ConfigError, QuantizationError
from surgeon.quant.ops import _bnb, dequantize_4bit_weight, dequantize_8bit_weight

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# heads stay in float, as transformers' bitsandbytes integration keeps them
SKIP = ("lm_head", "score", "classifier", "qa_outputs", "embed_out")


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
            packed, state = _bnb("bitsandbytes.functional").quantize_4bit(weight.detach().float().contiguous(), blocksize=spec.blocksize,
                                          compress_statistics=spec.double_quant, quant_type=spec.quant_type)
            layer.set_4bit(packed, state)
        else:
            cb, scb, _ = _bnb("bitsandbytes.functional").int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
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


def quantizable(path: str, module: nn.Module) -> bool:
    leaf = path.rsplit(".", 1)[-1]
    if leaf in SKIP:
        return False
    return isinstance(module, nn.Linear) or is_conv1d(module)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)



def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every ``QuantLinear`` by the float layer it came from (``nn.Linear`` or ``Conv1D``), weights
    dequantized to ``dtype`` (default: the layer's compute dtype). Returns how many were replaced."""
    count = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear):
            continue
        dt = dtype or module.spec.compute_dtype
        w = module.dequantized(torch.float32)
        bias = module.bias.detach().to(dt) if module.bias is not None else None
        if module.source == "Conv1D":
            layer = Conv1D(module.out_features, module.in_features)
            layer.weight = nn.Parameter(w.t().contiguous().to(dt), requires_grad=False)
            layer.bias = nn.Parameter(bias if bias is not None else torch.zeros(module.out_features, dtype=dt),
                                      requires_grad=False)
        else:
            layer = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            layer.weight = nn.Parameter(w.to(dt), requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias, requires_grad=False)
        set_module(model, path, layer)
        count += 1
    if hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    return count


def quant_bits(model: nn.Module) -> int | None:
    """4 or 8 when ``model`` has ``QuantLinear`` layers (all of one width), else None."""
    widths = {m.spec.bits for m in model.modules() if isinstance(m, QuantLinear)}
    if len(widths) > 1:
        raise QuantizationError(f"the model mixes {sorted(widths)}-bit layers; export supports one width")
    return widths.pop() if widths else None



def from_bitsandbytes(model: nn.Module) -> int:
    """Replace bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` modules by ``QuantLinear`` (same packed storage).

    Returns how many were replaced. The model computes the same outputs afterwards.
    """
    bnb = _bnb()
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
        set_module(model, path, layer)
        count += 1
    return count


def has_bitsandbytes_layers(model: nn.Module) -> bool:
    if not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        return False  # no need to import it to know
    bnb = _bnb()
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def check_quant_config(value) -> None:
    """Reject quantization configs other than bitsandbytes with the name of what was found."""
    if value is None:
        return
    method = quant_method(value)
    if method not in (None, "bitsandbytes"):
        raise ConfigError(f"quantization {method!r} is not supported yet (surgeon supports bitsandbytes 4-bit and 8-bit)")


def quant_method(qc) -> str | None:
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return getattr(method, "value", method)


def quantized_linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a quantized linear, None for any other module: how capture describes it."""
    return (module.in_features, module.out_features) if isinstance(module, QuantLinear) else None


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, QuantLinear)}
