"""Checks of an export directory, for ``surgeon check`` and tests: structure, names, and numbers vs torch.

Each check is a ``Check(name, passed, detail, value)``; ``passed=None`` means it could not run
(the reason is in ``detail``) and counts as a failure only with ``strict``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from surgeon.onnx.runtime import AdapterSession, empty_past, read_manifest

DEFAULT_ATOL = 1e-4


@dataclasses.dataclass
class Check:
    name: str
    passed: bool | None
    detail: str
    value: float | None = None


@dataclasses.dataclass
class Report:
    out_dir: str
    atol: float
    checks: list[Check] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def add(self, name: str, passed: bool | None, detail: str, value: float | None = None) -> Check:
        check = Check(name, passed, detail, value)
        self.checks.append(check)
        return check

    def to_json(self) -> str:
        return json.dumps({"out_dir": self.out_dir, "atol": self.atol, "passed": self.passed,
                           "checks": [dataclasses.asdict(c) for c in self.checks]}, indent=2) + "\n"

    def text(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}
        lines = [f"{mark[c.passed]}  {c.name}: {c.detail}" for c in self.checks]
        failed = sum(c.passed is False for c in self.checks)
        lines.append(f"{len(self.checks) - failed} passed, {failed} failed")
        return "\n".join(lines)


def run_checks(out_dir: str | Path, reference: str | None = None, atol: float = DEFAULT_ATOL) -> Report:
    """Every check on ``out_dir``; numbers compare ONNX Runtime with the torch reference model."""
    out_dir = Path(out_dir)
    report = Report(str(out_dir), atol)
    manifest = read_manifest(out_dir)
    _structure(out_dir, manifest, report)
    try:
        session = AdapterSession(out_dir, providers=["CPUExecutionProvider"])
    except Exception as err:  # any load failure is the finding
        report.add("session_loads", False, f"ONNX Runtime could not load the model: {err}")
        return report
    report.add("session_loads", True, f"inputs {session.input_names}, outputs {session.output_names}")
    _names(out_dir, manifest, session, report)
    _numbers(manifest, session, reference or manifest["source"].get("model"), report)
    return report


def _structure(out_dir: Path, manifest: dict, report: Report) -> None:
    import onnx

    model_path = out_dir / manifest["model"]
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
        report.add("onnx_checker", True, "onnx.checker (full) accepts the model")
    except Exception as err:
        report.add("onnx_checker", False, f"onnx.checker: {str(err).splitlines()[0]}")
    proto = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    missing = []
    for lo in manifest.get("lora_inputs", []):
        if inits.get(lo["a"]) != [lo["in"], 0] or inits.get(lo["b"]) != [0, lo["out"]]:
            missing.append(lo["path"])
    report.add("rank0_defaults", not missing,
               "every adapter input has a rank-0 default initializer" if not missing
               else f"no rank-0 default for {', '.join(missing[:5])}")


def _names(out_dir: Path, manifest: dict, session: AdapterSession, report: Report) -> None:
    import onnxruntime as ort

    declared = {n for lo in manifest.get("lora_inputs", []) for n in (lo["a"], lo["b"])}
    absent = sorted(declared - set(session.lora_inputs))
    report.add("manifest_inputs", not absent, "manifest adapter inputs exist in the model" if not absent
               else f"in the manifest but not the model: {', '.join(absent[:5])}")
    for name, entry in sorted(manifest.get("adapters", {}).items()):
        path = out_dir / entry["file"]
        try:
            params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as err:
            report.add(f"adapter_file[{name}]", False, f"{path}: unreadable ({err})")
            continue
        extra = sorted(set(params) - set(session.lora_inputs))
        report.add(f"adapter_names[{name}]", not extra, f"{len(params)} tensors, all named like model inputs"
                   if not extra else f"names not in the model: {', '.join(extra[:5])}")


def _numbers(manifest: dict, session: AdapterSession, reference: str | None, report: Report) -> None:
    if not reference:
        report.add("reference", None, "no reference model in the manifest; pass --reference MODEL")
        return
    try:
        ref = _reference_model(reference, manifest, session)
    except Exception as err:
        report.add("reference", False, f"could not build the torch reference from {reference}: {err}")
        return
    causal = manifest["source"].get("class", "").endswith(("ForCausalLM", "LMHeadModel"))
    cases = [(None, "base")] + [(name, f"adapter[{name}]") for name in sorted(manifest.get("adapters", {}))]
    if manifest.get("merged_adapter"):
        cases = [(manifest["merged_adapter"], f"merged[{manifest['merged_adapter']}]")]
    kv = bool(manifest.get("kv_cache"))
    quantized = manifest.get("quantization")
    for adapter, label in cases:
        worst = step_worst = scale = 0.0
        for b, s in ((1, 7), (3, 12)):
            feeds = _feeds(ref.base.config, session.input_names, b, s, causal)
            run_adapter = None if manifest.get("merged_adapter") else adapter
            out = session.run({**feeds, **empty_past(manifest['generation'], b)} if kv else feeds, adapter=run_adapter)
            want = _torch_logits(ref, feeds, adapter)
            scale = max(scale, float(np.abs(want).max()))
            worst = max(worst, _max_diff(out["logits"], want, feeds["attention_mask"]))
            if kv:
                step_worst = max(step_worst, _decode_step_diff(session, ref, feeds, out, run_adapter, adapter))
        tol, how = report.atol, f"atol {report.atol:g}"
        if quantized:  # MatMulNBits re-quantizes the weights: a tolerance relative to the logits' scale
            from surgeon.quant import CHECK_RTOL

            rtol = CHECK_RTOL[quantized["bits"]]
            tol, how = max(tol, rtol * scale), f"{quantized['bits']}-bit re-quantized: {rtol:g} x max |logit| {scale:.3g}"
        report.add(f"{label}_vs_torch", worst <= tol,
                   f"max |ORT - torch| = {worst:.3g} on real tokens ({how}, batch 1x7 and 3x12)", worst)
        if kv:
            report.add(f"{label}_decode_vs_torch", step_worst <= tol,
                       f"one decode step on the KV cache: max |ORT - torch| = {step_worst:.3g} ({how})", step_worst)


def _decode_step_diff(session: AdapterSession, ref, feeds: dict, prefill: dict, run_adapter, adapter) -> float:
    """Feed one more token with the prefill's presents; compare with torch on the whole sequence, last position."""
    b = feeds["input_ids"].shape[0]
    token = np.full((b, 1), 5, np.int64)
    mask = np.concatenate([feeds["attention_mask"], np.ones((b, 1), np.int64)], axis=1)
    past = {k.replace("present.", "past_key_values.", 1): v for k, v in prefill.items() if k.startswith("present.")}
    step = {"input_ids": token, "attention_mask": mask, "position_ids": np.cumsum(mask, 1)[:, -1:] - 1, **past}
    got = session.run(step, adapter=run_adapter)["logits"][:, -1]
    whole = {"input_ids": np.concatenate([feeds["input_ids"], token], axis=1), "attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None)}
    want = _torch_logits(ref, whole, adapter)[:, -1]
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


def _feeds(config, names: list[str], b: int, s: int, causal: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(b * 100 + s)
    ids = rng.integers(3, config.vocab_size, (b, s), dtype=np.int64)
    mask = np.ones((b, s), np.int64)
    if b > 1:  # pad one row: left for decoders, right for encoders
        mask[0, : s // 3] = 0 if causal else 1
        if not causal:
            mask[0, s - s // 3:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in names:
        feeds["position_ids"] = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids)
    return {k: v for k, v in feeds.items() if k in names}


def _max_diff(got: np.ndarray, want: np.ndarray, mask: np.ndarray) -> float:
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if diff.ndim == 3:
        diff = diff[mask.astype(bool)]
    return float(diff.max())


def _reference_model(reference: str, manifest: dict, session: AdapterSession):
    """The torch model the export came from: base + adapters rebuilt from the shipped files."""
    import onnxruntime as ort
    import torch

    from surgeon.config import LoraConfig
    from surgeon.hub import load_model
    from surgeon.model import SurgeonModel

    task = "SEQ_CLS" if "SequenceClassification" in manifest["source"].get("class", "") else None
    quantized = manifest.get("quantization")
    if quantized:
        from surgeon.quant import load_quantized

        base = load_quantized(reference, bits=quantized["bits"], task=task)
    else:
        base = load_model(reference, task=task)
    merged = manifest.get("merged_adapter")
    if merged:
        source = manifest.get("merged_source")
        if not source or not Path(source).is_dir():
            raise FileNotFoundError(f"merged adapter source {source!r} is not available")
        return SurgeonModel.from_pretrained(base, source, adapter_name=merged).eval()
    model = None
    for name, entry in sorted(manifest.get("adapters", {}).items()):
        config = LoraConfig.from_peft_dict(entry["config"])
        model = SurgeonModel(base, config, name) if model is None else (model.add_adapter(name, config) or model)
        params = ort.AdapterFormat.read_adapter(str(session.dir / entry["file"])).get_parameters()
        layers = {m.path: m for m in model._registry().values() if hasattr(m, "adapters")}
        with torch.no_grad():
            for lo in manifest["lora_inputs"]:
                if lo["a"] in params and name in layers[lo["path"]].adapters:
                    adapter = layers[lo["path"]].adapters[name]
                    adapter.lora_A.copy_(torch.from_numpy(params[lo["a"]].numpy()).t())
                    adapter.lora_B.copy_(torch.from_numpy(params[lo["b"]].numpy()).t() / adapter.scaling)
    return model.eval()


def _torch_logits(model, feeds: dict[str, np.ndarray], adapter: str | None) -> np.ndarray:
    import contextlib

    import torch

    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                return model(**inputs).logits.numpy()
        if adapter in model.peft_config:
            model.set_adapter(adapter)
        with contextlib.nullcontext():
            return model(**inputs).logits.numpy()
