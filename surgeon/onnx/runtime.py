"""``AdapterSession``: one ONNX Runtime session, adapters switched per ``run`` (this module never imports torch).

The session is created once; ``.onnx_adapter`` files are loaded on first use and checked against
the model's adapter inputs (names and dtypes). ``run`` builds its own ``RunOptions``, so calls
with different adapters may run concurrently from several threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from surgeon.errors import AdapterError, AdapterFileError, ExportFileError, did_you_mean
from surgeon.jsonfile import read_json

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
    """``manifest.json`` of an export, checked: valid UTF-8 JSON, the fields surgeon reads, paths inside the export."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise AdapterFileError(f"{out_dir}: no such export directory (one holding {MANIFEST}, written by `surgeon export`)")
    path = out_dir / MANIFEST
    if not path.is_file():
        raise AdapterFileError(f"{out_dir}: no {MANIFEST}; is this a `surgeon export` directory?")
    manifest = read_json(path, ExportFileError, "re-export")
    check_manifest(manifest, out_dir)
    return manifest


def _field(manifest: dict, name: str, kind: type, where: str, required: bool = True):
    if name not in manifest:
        if required:
            raise ExportFileError(f"{where}: field {name!r} is missing; re-export with `surgeon export`")
        return None
    value = manifest[name]
    if not isinstance(value, kind):
        raise ExportFileError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}; re-export")
    return value


def check_manifest(manifest: object, out_dir: Path) -> None:
    """The fields readers use have their types, and every path it names resolves inside ``out_dir``."""
    where = str(out_dir / MANIFEST)
    if not isinstance(manifest, dict):
        raise ExportFileError(f"{where}: must hold a JSON object, got {type(manifest).__name__}; re-export")
    export_path(out_dir, _field(manifest, "model", str, where), f"{where}: 'model'")
    for name, entry in (_field(manifest, "adapters", dict, where, required=False) or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ExportFileError(f"{where}: adapters[{name!r}] needs a 'file' string; re-export")
        export_path(out_dir, entry["file"], f"{where}: adapters[{name!r}].file")
    for i, entry in enumerate(_field(manifest, "lora_inputs", list, where, required=False) or []):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("path", "a", "b"))
                and all(isinstance(entry.get(k), int) and entry[k] > 0 for k in ("in", "out"))):
            raise ExportFileError(f"{where}: lora_inputs[{i}] needs path/a/b names and positive in/out sizes; re-export")
    for rel in _field(manifest, "files", dict, where, required=False) or {}:
        export_path(out_dir, rel, f"{where}: files[{rel!r}]")
    _field(manifest, "source", dict, where, required=False)
    if manifest.get("kv_cache"):
        facts = _field(manifest, "generation", dict, where)
        layers = facts.get("layers")
        if not isinstance(layers, int) or layers <= 0 or not all(
                isinstance(facts.get(k), list) and len(facts[k]) == layers for k in ("kv_heads", "key_dim", "value_dim")):
            raise ExportFileError(f"{where}: generation needs 'layers' and per-layer kv_heads/key_dim/value_dim; re-export")


def export_path(out_dir: Path, rel: object, field: str) -> Path:
    """``out_dir / rel`` when ``rel`` is a relative path that stays inside ``out_dir``; otherwise an error."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise ExportFileError(f"{field}: {rel!r} is not a file name")
    if Path(rel).is_absolute():
        raise ExportFileError(f"{field}: {rel!r} is an absolute path; an export names its files relative to itself")
    root = Path(os.path.realpath(out_dir))
    target = Path(os.path.realpath(root / rel))
    if not target.is_relative_to(root) or target == root:
        raise ExportFileError(f"{field}: {rel!r} resolves outside the export ({target}); an export only reads "
                              "files inside its own directory")
    return out_dir / rel


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changed_files(out_dir: Path, manifest: dict) -> list[str]:
    """Each file the manifest lists whose sha256 differs or that is missing, as ``'name (why)'``."""
    problems = []
    for rel, want in sorted((manifest.get("files") or {}).items()):
        path = export_path(out_dir, rel, f"{out_dir / MANIFEST}: files[{rel!r}]")
        if not path.is_file():
            problems.append(f"{rel} (missing)")
        elif file_digest(path) != want:
            problems.append(f"{rel} (changed since export: sha256 differs)")
    return problems


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
        model_path = export_path(self.dir, self.manifest["model"], "model")
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=self.providers,
                                                **({"disabled_optimizers": disabled} if disabled else {}))
        except Exception as err:  # onnxruntime's own error types: a truncated, replaced or invalid model file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportFileError(f"{model_path}: ONNX Runtime cannot load it ({first}); the file is damaged or not "
                                  "this export's model: re-export") from None
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
            path = export_path(self.dir, entry["file"], f"adapters[{name!r}].file")
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
        bad, ranks = [], {}
        for key, value in params.items():
            shape = tuple(value.shape())  # no copy of the data
            want = self.lora_inputs[key].shape
            fixed = [(i, d) for i, d in enumerate(want) if isinstance(d, int)]
            if len(shape) != len(want) or any(shape[i] != d for i, d in fixed):
                bad.append(f"{key}: {list(shape)} vs model {list(want)}")
                continue
            module, part = key.rsplit(".lora_", 1)
            ranks.setdefault(module, {})[part] = shape[1] if part.startswith("A") else shape[0]
        bad += [f"{m}: rank {r.get('A.weight')} in lora_A but {r.get('B.weight')} in lora_B"
                for m, r in sorted(ranks.items()) if len(r) == 2 and len(set(r.values())) > 1]
        bad += [f"{m}: only lora_{next(iter(r))} is there" for m, r in sorted(ranks.items()) if len(r) == 1]
        if bad:
            raise AdapterError(f"{path}: {len(bad)} tensors do not fit the model's adapter inputs: {'; '.join(bad[:5])}; "
                               "the adapter is for another model or was altered: re-export it")

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
        from surgeon.sampling import check_sampling, check_token_ids

        facts = self.generation
        check_sampling({"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                        "max_new_tokens": max_new_tokens}, "AdapterSession.generate")
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        check_token_ids(ids, facts.get("vocab_size"), "AdapterSession.generate")
        if ids.ndim != 2:
            raise AdapterError(f"AdapterSession.generate: input_ids must be [batch, sequence], got shape {list(ids.shape)}")
        ids = ids.astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise AdapterError(f"AdapterSession.generate: attention_mask shape {list(mask.shape)} differs from "
                               f"input_ids {list(ids.shape)}")
        batch, prompt = ids.shape
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
    x = logits / temperature  # the settings were checked by surgeon.sampling.check_sampling
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, axis=-1)
        sorted_x = np.take_along_axis(x, order, axis=-1)
        probs = softmax(sorted_x)
        before = np.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= top_p  # as transformers: keep the smallest set reaching top_p
        drop_sorted[:, 0] = False  # and at least the most likely token (top_p=0: that one alone)
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
