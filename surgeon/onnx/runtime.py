"""``AdapterSession``: one ONNX Runtime session, adapters switched per ``run`` (this module never imports torch).

The session is created once; ``.onnx_adapter`` files are loaded on first use and checked against
the model's adapter inputs (names and dtypes). ``run`` builds its own ``RunOptions``, so calls
with different adapters may run concurrently from several threads.
"""

from __future__ import annotations

import ctypes
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from surgeon.errors import AdapterError, AdapterFileError, did_you_mean

MANIFEST = "manifest.json"  # the same names surgeon.onnx.export writes (kept here so torch stays out)
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(double)": np.float64, "tensor(bfloat16)": None}


def cuda_available() -> bool:
    """True when a CUDA driver answers with at least one device (asked without creating a session)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def default_providers() -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda_available() else ["CPUExecutionProvider"]


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise AdapterFileError(f"{out_dir}: no {MANIFEST}; is this a `surgeon export` directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: not valid JSON ({err})") from None


class AdapterSession:
    """Run an exported model with any of its adapters, or none (the base model)."""

    def __init__(self, out_dir: str | Path, providers: list[str] | None = None, *, intra_op_threads: int | None = None):
        self.dir = Path(out_dir)
        self.manifest = read_manifest(self.dir)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # adapter inputs with default initializers are intended: no warnings
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.providers = providers or default_providers()
        self.session = ort.InferenceSession(str(self.dir / self.manifest["model"]), options, providers=self.providers)
        # Adapter inputs carry rank-0 default initializers, so ORT lists them as overridable initializers.
        overridable = list(self.session.get_overridable_initializers()) + list(self.session.get_inputs())
        self.lora_inputs = {i.name: i for i in overridable if i.name.endswith((".lora_A.weight", ".lora_B.weight"))}
        self.input_names = [i.name for i in self.session.get_inputs() if i.name not in self.lora_inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._adapters: dict[str, ort.LoraAdapter] = {}
        self._lock = threading.Lock()

    @property
    def adapters(self) -> list[str]:
        return sorted(self.manifest.get("adapters", {}))

    def adapter(self, name: str) -> ort.LoraAdapter:
        """The loaded adapter ``name`` (loaded and checked on first use)."""
        with self._lock:
            if name not in self._adapters:
                self._adapters[name] = self._load(name)
            return self._adapters[name]

    def add_adapter_file(self, name: str, path: str | Path) -> None:
        """Use an extra ``.onnx_adapter`` file (written by ``surgeon export`` for the same base) under ``name``."""
        with self._lock:
            self._adapters[name] = self._load(name, Path(path))

    def _load(self, name: str, path: Path | None = None) -> ort.LoraAdapter:
        if path is None:
            entry = self.manifest.get("adapters", {}).get(name)
            if entry is None:
                raise AdapterError(f"no adapter named {name!r}{did_you_mean(name, self.adapters)}; "
                                   f"adapters in {self.dir}: {', '.join(self.adapters) or 'none'}")
            path = self.dir / entry["file"]
        if not path.is_file():
            raise AdapterFileError(f"{path}: missing adapter file")
        try:
            params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as err:  # onnxruntime raises its own RuntimeError types
            raise AdapterFileError(f"{path}: not a readable .onnx_adapter file ({err})") from None
        self._check(path, params)
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        return adapter

    def _check(self, path: Path, params: dict[str, Any]) -> None:
        unknown = sorted(set(params) - set(self.lora_inputs))
        if unknown:
            hints = "; ".join(f"{n}{did_you_mean(n, self.lora_inputs)}" for n in unknown[:5])
            raise AdapterError(f"{path}: {len(unknown)} parameters are not adapter inputs of this model: {hints}. "
                               f"The model's adapter inputs are like {sorted(self.lora_inputs)[:2]}; was it exported "
                               "for another base or another export?")
        wrong = []
        for key, value in params.items():
            want, have = ORT_DTYPES.get(self.lora_inputs[key].type), value.numpy().dtype
            if want is not None and have != want:
                wrong.append(f"{key}: {have} vs model {np.dtype(want)}")
        if wrong:
            raise AdapterError(f"{path}: dtype mismatch: {'; '.join(wrong[:5])}; re-export the adapter for this model")

    def run(self, feeds: dict[str, np.ndarray], adapter: str | None = None,
            output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run with ``adapter`` active (None: the base model); returns outputs by name."""
        options = ort.RunOptions()
        if adapter is not None:
            options.add_active_adapter(self.adapter(adapter))
        names = output_names or self.output_names
        values = self.session.run(names, feeds, options)
        return dict(zip(names, values))
