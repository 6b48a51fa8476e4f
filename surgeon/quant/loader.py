"""``load_quantized``: a float safetensors checkpoint loaded with its linear layers quantized as read.

The model is built with parameters on the meta device, then the safetensors files are read one
tensor at a time, quantizing each linear weight as it arrives: the whole float model is never in
memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from torch import nn

from surgeon.compat import is_conv1d
from surgeon.errors import ModelFileError, QuantizationError
from surgeon.hub import load_model, model_dir, read_model_config, weight_files
from surgeon.quant.layer import DTYPES, QuantLinear, QuantSpec, quant_method, quantizable, set_module

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


def check_not_prequantized(config, directory: Path) -> None:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return
    method = quant_method(qc)
    raise QuantizationError(f"{directory}: the checkpoint is already quantized ({method}); surgeon quantizes float "
                            "checkpoints while loading (bitsandbytes 4/8-bit) and does not support "
                            f"{str(method).upper()} checkpoints yet; use the float checkpoint")


def load_quantized(directory: str | Path, bits: int = 4, *, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: str | torch.dtype = "float32", task: str | None = None) -> nn.Module:
    """Load a float safetensors checkpoint with its linear layers quantized as they are read.

    ``bits`` 4 (``quant_type`` nf4 or fp4, ``double_quant``) or 8; output heads stay float. Peak memory
    is the quantized model plus one float tensor at a time.
    """
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
        raise ModelFileError(f"{directory / 'config.json'}: transformers cannot read it "
                             f"({(str(err).strip().splitlines() or [type(err).__name__])[0]})") from None
    check_not_prequantized(config, directory)
    auto = transformers.AutoModelForSequenceClassification if task == "SEQ_CLS" else transformers.AutoModelForCausalLM
    with params_on_meta():
        model = auto.from_config(config)
    targets = {path: m for path, m in model.named_modules() if path and quantizable(path, m)}
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
    conv1d = is_conv1d(module)
    if conv1d:
        weight = weight.t()  # Conv1D stores [in, out]
    layer = QuantLinear.from_weight(weight, tensors.get("bias"), spec)
    layer.source = "Conv1D" if conv1d else "Linear"
    set_module(model, path, layer)



def load_base(name: str, bits: int | None = None, *, task: str | None = None) -> nn.Module:
    """The base model ``name``: quantized while read when ``bits`` is 4 or 8, else as stored (fp32).

    The one place that chooses between the two loaders (CLI, fold, check and generate all call it).
    """
    if bits:
        return load_quantized(name, bits=int(bits), task=task)
    return load_model(name, task=task)
