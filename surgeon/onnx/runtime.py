"""``AdapterSession``: one ONNX Runtime session, adapters switched per ``run`` (the ONNX Runtime side: no torch).

The session is created once; ``.onnx_adapter`` files are loaded on first use and checked against
the model's adapter inputs (names and dtypes). ``run`` builds its own ``RunOptions``, so calls
with different adapters may run concurrently from several threads.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from surgeon.errors import AdapterError, AdapterFileError, ExportFileError, did_you_mean
from surgeon.names import ADAPTER_IDS, LOGITS, parse_onnx_input
from surgeon.onnx.decoding import check_prompt, decode, empty_past, pick_tokens
from surgeon.onnx.manifest import changed_files, export_path, file_digest, read_manifest
from surgeon.sampling import check_sampling

__all__ = ["AdapterSession", "changed_files", "cuda_available", "default_providers", "empty_past", "file_digest",
           "pick_tokens", "read_manifest"]
BANK_KEY = "<bank>"  # the bank file among the loaded adapters (no adapter name has angle brackets)
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(double)": np.float64, "tensor(bfloat16)": None}


def _rows(feeds: dict) -> int:
    first = feeds.get("input_ids", next(iter(feeds.values()), None))
    if first is None or not getattr(first, "shape", None):
        raise AdapterError("per-row adapters need input_ids in the feeds, to know the batch")
    return first.shape[0]


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
        self.lora_inputs = {i.name: i for i in overridable if parse_onnx_input(i.name) is not None}
        self.input_names = [i.name for i in self.session.get_inputs() if i.name not in self.lora_inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._adapters: dict[str, ort.LoraAdapter] = {}
        self._paths: dict[str, Path] = {}
        self._values: dict[tuple[str, str], dict[str, ort.OrtValue]] = {}
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

    def _adapter_values(self, name: str, device: str) -> dict[str, ort.OrtValue]:
        """Adapter ``name``'s tensors as ONNX Runtime values on ``device``, for IOBinding (made once per device)."""
        if name != BANK_KEY:
            self.adapter(name)  # loaded and checked
        with self._lock:
            key = (name, device)
            if key not in self._values:
                read = ort.AdapterFormat.read_adapter(str(self._paths[name]))  # its values live as long as it does
                self._values[key] = {k: ort.OrtValue.ortvalue_from_numpy(np.array(v.numpy()), device)
                                     for k, v in read.get_parameters().items()}
            return self._values[key]

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
            read = ort.AdapterFormat.read_adapter(str(path))  # held: its parameters' memory is its own
            params = read.get_parameters()
        except Exception as err:  # onnxruntime raises its own RuntimeError types
            raise AdapterFileError(f"{path}: not a readable .onnx_adapter file ({err})") from None
        self._check(path, params)
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self._paths[name] = path
        for key in [k for k in self._values if k[0] == name]:  # a replaced file: its bound values are stale
            del self._values[key]
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
            module, part = parse_onnx_input(key)
            if part in ("G", "L", "P"):  # DoRA's factor, an (IA)^3 vector, a prompt: no rank to agree on
                continue
            ranks.setdefault(module, {})[part] = shape[-1] if part == "A" else shape[-2]  # a bank's lead with slots
        bad += [f"{m}: rank {r.get('A')} in lora_A but {r.get('B')} in lora_B"
                for m, r in sorted(ranks.items()) if len(r) == 2 and len(set(r.values())) > 1]
        bad += [f"{m}: only lora_{next(iter(r))} is there" for m, r in sorted(ranks.items()) if len(r) == 1]
        if bad:
            raise AdapterError(f"{path}: {len(bad)} tensors do not fit the model's adapter inputs: {'; '.join(bad[:5])}; "
                               "the adapter is for another model or was altered: re-export it")

    def run(self, feeds: dict[str, np.ndarray], adapter: str | None = None,
            output_names: list[str] | None = None, *, adapters: list[str | None] | None = None) -> dict[str, np.ndarray]:
        """Run with ``adapter`` active (None: the base model); returns outputs by name.

        ``adapters`` (an adapter-bank export): one adapter name per row of the batch, None for the base model.
        """
        options = ort.RunOptions()
        if adapters is not None:
            feeds = {**feeds, ADAPTER_IDS: self.slots(adapters, _rows(feeds), adapter)}
            options.add_active_adapter(self._bank_adapter())
        elif adapter is not None:
            options.add_active_adapter(self.adapter(adapter))
        names = output_names or self.output_names
        values = self.session.run(names, feeds, options)
        return dict(zip(names, values))

    # ---- adapter banks (exported with --bank): one adapter per row ---------------------------
    @property
    def bank(self) -> dict | None:
        """The manifest's bank entry (file, slots: slot 0 is the base model), or None for other exports."""
        return self.manifest.get("bank")

    def slots(self, adapters, batch: int, adapter: str | None = None) -> np.ndarray:
        """``adapter_ids`` for per-row adapter names (None: the base), or the error naming what is wrong."""
        if self.bank is None:
            raise AdapterError(f"{self.dir}: per-row adapters need an adapter-bank export; re-export with "
                               "`surgeon export MODEL ADAPTER_DIR... -o OUT --bank`")
        if adapter is not None:
            raise AdapterError("pass either adapter= (every row) or adapters= (one per row), not both")
        if isinstance(adapters, str) or not all(a is None or isinstance(a, str) for a in adapters):
            raise AdapterError(f"adapters must be a list with one adapter name (or None) per row, got {adapters!r}")
        if len(adapters) != batch:
            raise AdapterError(f"{len(adapters)} adapters for a batch of {batch} rows; give one name (or None) per row")
        names = self.bank["slots"]
        unknown = sorted({a for a in adapters if a is not None and a not in names})
        if unknown:
            known = [n for n in names if n is not None]
            raise AdapterError(f"adapters not in this bank: {', '.join(repr(u) + did_you_mean(u, known) for u in unknown)}; "
                               f"the bank holds {known} (None: the base model)")
        return np.array([names.index(a) for a in adapters], dtype=np.int64)

    def _bank_adapter(self) -> ort.LoraAdapter:
        with self._lock:
            if BANK_KEY not in self._adapters:
                self._adapters[BANK_KEY] = self._load(BANK_KEY, export_path(self.dir, self.bank["file"], "bank.file"))
            return self._adapters[BANK_KEY]

    # ---- generation (models exported with --kv-cache) -------------------------------------
    def _step(self, adapter: str | None, slots: np.ndarray | None = None):
        """One decode step through IOBinding: ``present.*`` stay ONNX Runtime values (on the provider's device) and
        go straight back in as the next step's past, with no copy to numpy; only the logits come back as numpy.
        ``slots``: the bank's rows (``adapter_ids``)."""
        device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        # run_with_iobinding does not apply RunOptions' active adapters (onnxruntime 1.2x): bind their tensors instead
        if slots is not None:
            self._bank_adapter()
            weights = {**self._adapter_values(BANK_KEY, device),
                       ADAPTER_IDS: ort.OrtValue.ortvalue_from_numpy(slots, device)}
        else:
            weights = self._adapter_values(adapter, device) if adapter is not None else {}

        prompt = self.prompt_tokens.get(adapter, 0)

        def run(feeds: dict, first: bool = True) -> dict:
            binding = self.session.io_binding()
            for name, value in (weights.items() if first or not prompt else ()):  # a prompt enters the prefill only
                binding.bind_ortvalue_input(name, value)
            held = []  # bind_cpu_input keeps a pointer, not the array: hold the contiguous copies until the run ends
            for name, value in feeds.items():
                if isinstance(value, ort.OrtValue):
                    binding.bind_ortvalue_input(name, value)
                else:
                    held.append(np.ascontiguousarray(value))
                    binding.bind_cpu_input(name, held[-1])
            for name in self.output_names:
                binding.bind_output(name, "cpu" if name == LOGITS else device)
            self.session.run_with_iobinding(binding)
            out = dict(zip(self.output_names, binding.get_outputs()))
            out[LOGITS] = out[LOGITS].numpy()
            return out

        return run

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
                 on_tokens=None, adapters: list[str | None] | None = None) -> np.ndarray:
        """Prefill + decode with the KV cache in ONNX Runtime; returns ``[batch, prompt + new]`` token ids.

        Batches are left-padded (``attention_mask`` 0 on the left), as with transformers. Greedy by default;
        ``do_sample=True`` samples with ``temperature``, ``top_k``, ``top_p`` from ``numpy``'s generator seeded with
        ``seed``. A row stops at an end-of-sequence token and is then filled with ``pad_token_id``. ``on_tokens``
        is called with each step's new tokens (``[batch]``), for streaming. ``adapters`` (an adapter-bank export):
        one adapter name (None: the base) per row, instead of ``adapter`` for all.
        """
        facts = self.generation
        sampling = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p}
        check_sampling({**sampling, "max_new_tokens": max_new_tokens}, "AdapterSession.generate")
        ids, mask = check_prompt(input_ids, attention_mask, facts, max_new_tokens)
        slots = self.slots(adapters, ids.shape[0], adapter) if adapters is not None else None
        if adapter is not None:
            self.adapter(adapter)  # unknown names fail here, before any work
        return decode(self._step(adapter, slots), facts, ids, mask, max_new_tokens=max_new_tokens,
                      sampling=sampling, seed=seed, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      on_tokens=on_tokens, prefix=self.prompt_tokens.get(adapter, 0))

    @property
    def prompt_tokens(self) -> dict[str, int]:
        """Prompt-tuning adapters -> their number of virtual tokens (the manifest's ``prompt``)."""
        return dict((self.manifest.get("prompt") or {}).get("tokens") or {})
