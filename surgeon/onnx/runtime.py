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
        disabled = (self.manifest.get("quantization") or {}).get("disabled_optimizers") or []
        self.session = ort.InferenceSession(str(self.dir / self.manifest["model"]), options, providers=self.providers,
                                            **({"disabled_optimizers": disabled} if disabled else {}))
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

    # ---- generation (models exported with --kv-cache) -------------------------------------
    @property
    def generation(self) -> dict:
        """The manifest's generation facts; a clear error when the model has no KV cache inputs."""
        if not self.manifest.get("kv_cache"):
            raise AdapterFileError(f"{self.dir}: this model was exported without a KV cache, so it cannot generate; "
                                   "re-export it with `surgeon export MODEL ADAPTER_DIR... -o OUT --kv-cache` "
                                   "(or export_onnx(..., kv_cache=True))")
        return self.manifest["generation"]

    def generate(self, input_ids, attention_mask=None, *, adapter: str | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 on_tokens=None) -> np.ndarray:
        """Prefill + decode with the KV cache in ONNX Runtime; returns ``[batch, prompt + new]`` token ids.

        Batches are left-padded (``attention_mask`` 0 on the left), as with transformers. Greedy by default;
        ``do_sample=True`` samples with ``temperature``, ``top_k``, ``top_p`` from ``numpy``'s generator seeded with
        ``seed``. A row stops at an end-of-sequence token and is then filled with ``pad_token_id``. ``on_tokens``
        is called with each step's new tokens (``[batch]``), for streaming.
        """
        facts = self.generation
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None, :]
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64).reshape(ids.shape)
        batch, prompt = ids.shape
        if prompt == 0:
            raise AdapterError("generate needs at least one prompt token")
        context = facts.get("context_length")
        if context and prompt + max_new_tokens > context:
            raise AdapterError(f"prompt of {prompt} tokens + max_new_tokens {max_new_tokens} exceeds the model's context "
                               f"of {context} positions; shorten the prompt to at most {max(context - max_new_tokens, 0)} "
                               f"tokens or lower max_new_tokens to {max(context - prompt, 0)}")
        if adapter is not None:
            self.adapter(adapter)  # unknown names fail here, before any work
        eos = set(facts.get("eos_token_id") or []) if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
        pad = pad_token_id if pad_token_id is not None else facts.get("pad_token_id")
        pad = pad if pad is not None else (min(eos) if eos else 0)
        rng = np.random.default_rng(seed)
        past = empty_past(facts, batch)
        tokens, step_ids = ids, ids
        done = np.zeros(batch, dtype=bool)
        for _ in range(max_new_tokens):
            seq = step_ids.shape[1]
            positions = np.where(mask == 0, 1, np.cumsum(mask, axis=1) - 1)[:, -seq:]
            out = self.run({"input_ids": step_ids, "attention_mask": mask, "position_ids": positions, **past}, adapter)
            nxt = pick_tokens(out["logits"][:, -1, :].astype(np.float32), rng, do_sample, temperature, top_k, top_p)
            nxt = np.where(done, pad, nxt)
            done |= np.isin(nxt, list(eos)) if eos else False
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            if on_tokens is not None:
                on_tokens(nxt)
            if done.all():
                break
            past = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k.startswith("present.")}
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            step_ids = nxt[:, None]
        return tokens


def empty_past(facts: dict, batch: int) -> dict[str, np.ndarray]:
    """The prefill's past: one zero-length ``past_key_values.{i}.key/value`` per layer (manifest ``generation`` facts)."""
    dtype = np.dtype(facts.get("cache_dtype", "float32"))
    past = {}
    for i in range(facts["layers"]):
        past[f"past_key_values.{i}.key"] = np.zeros((batch, facts["kv_heads"][i], 0, facts["key_dim"][i]), dtype)
        past[f"past_key_values.{i}.value"] = np.zeros((batch, facts["kv_heads"][i], 0, facts["value_dim"][i]), dtype)
    return past


def pick_tokens(logits: np.ndarray, rng: np.random.Generator, do_sample: bool, temperature: float, top_k: int,
                top_p: float) -> np.ndarray:
    """Greedy argmax, or a sample after temperature, top-k and top-p (nucleus) filtering, in that order."""
    if not do_sample:
        return logits.argmax(axis=-1)
    if temperature <= 0:
        raise AdapterError(f"temperature must be > 0 when sampling, got {temperature}")
    x = logits / temperature
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1)
        sorted_x = np.take_along_axis(x, order, axis=-1)
        probs = softmax(sorted_x)
        before = np.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # as transformers: keep the smallest set reaching top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        x = np.where(drop, -np.inf, x)
    probs = softmax(x)
    u = rng.random((x.shape[0], 1))
    picked = (np.cumsum(probs, axis=-1) < u).sum(axis=-1)
    return np.minimum(picked, x.shape[-1] - 1)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)
