"""Checks of an export directory, for ``surgeon check`` and tests: manifest, file hashes, structure, names, and
numbers vs torch (base and each adapter rebuilt from its source, never from the files under test).

Each check is a ``Check(name, passed, detail, value)``; ``passed=None`` means it could not run
(the reason is in ``detail``) and counts as a failure only with ``strict``. A broken export is a
failed check, not an exception: only "this is not an export directory" raises.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch

from surgeon.errors import ExportFileError, did_you_mean
from surgeon.model import SurgeonModel
from surgeon.workflows.prompt_check import prompt_logits, with_virtual
from surgeon.jsonfile import read_json
from surgeon.names import ADAPTER_IDS, GENAI_CONFIG, LOGITS, MANIFEST, past_of_present
from surgeon.onnx.decoding import empty_past
from surgeon.onnx.genai import check_genai_config
from surgeon.onnx.int4 import INT4_FLOAT_RTOL, INT4_RTOL, dequantized_weights
from surgeon.onnx.manifest import changed_files, export_path, read_manifest
from surgeon.onnx.runtime import AdapterSession
from surgeon.quant import load_base
from surgeon.quant.to_onnx import CHECK_RTOL
from surgeon.workflows.bank_check import bank_matches_adapters
from surgeon.workflows.checkpoint import set_weights, with_adapters
from surgeon.workflows.report import Check, Report  # noqa: F401 (Check: part of the report API)

DEFAULT_ATOL = 1e-4


def run_checks(out_dir: str | Path, reference: str | None = None, atol: float = DEFAULT_ATOL, *,
               adapters: dict[str, str] | None = None, strict: bool = False) -> Report:
    """Every check on ``out_dir``; numbers compare ONNX Runtime with the torch reference model.

    The reference is the source model (``reference`` or the manifest's) with each adapter read from its source PEFT
    directory (``adapters[name]`` or the manifest's ``adapter_sources``), never from the files under test. A
    comparison that cannot be made is reported as not run (``passed=None``), which ``strict`` counts as a failure.
    Raises only when ``out_dir`` is not an export at all (no directory, no manifest.json).
    """
    out_dir = Path(out_dir)
    if not math.isfinite(atol) or atol < 0:
        raise ExportFileError(f"atol={atol!r}: give a finite tolerance >= 0 (default {DEFAULT_ATOL:g})")
    report = Report(str(out_dir), atol, strict)
    if not out_dir.is_dir() or not (out_dir / MANIFEST).is_file():
        read_manifest(out_dir)  # raises the "not an export" error
    try:
        manifest = read_manifest(out_dir)
    except ExportFileError as err:
        report.add("manifest", False, str(err))
        return report
    report.add("manifest", True, f"{MANIFEST} is well formed; every path it names is inside the export")
    unknown = sorted(set(adapters or {}) - set(manifest.get("adapters") or {}) - {manifest.get("merged_adapter")})
    if unknown:
        raise ExportFileError(f"--adapter {unknown[0]}=...: the export has no adapter named {unknown[0]!r}"
                              f"{did_you_mean(unknown[0], manifest.get('adapters') or {})}")
    for name, directory in sorted((adapters or {}).items()):
        if not Path(directory).is_dir():
            raise ExportFileError(f"--adapter {name}={directory}: no such directory; give the PEFT adapter directory "
                                  f"{name!r} was exported from")
    _files(out_dir, manifest, report)
    if not _structure(out_dir, manifest, report):
        return report
    _genai(out_dir, manifest, report)
    try:
        session = AdapterSession(out_dir, providers=["CPUExecutionProvider"])
    except Exception as err:  # any load failure is the finding
        report.add("session_loads", False, f"ONNX Runtime could not load the model: {err}")
        return report
    report.add("session_loads", True, f"inputs {session.input_names}, outputs {session.output_names}")
    _names(out_dir, manifest, session, report)
    _numbers(manifest, session, reference or (manifest.get("source") or {}).get("model"), report,
             _adapter_sources(manifest, adapters or {}))
    return report


def _adapter_sources(manifest: dict, given: dict[str, str]) -> dict[str, str | None]:
    recorded = dict(manifest.get("adapter_sources") or {})
    if manifest.get("merged_adapter"):
        recorded = {manifest["merged_adapter"]: manifest.get("merged_source")}
    return {name: given.get(name) or recorded.get(name) for name in (manifest.get("adapters") or recorded)}


def _files(out_dir: Path, manifest: dict, report: Report) -> None:
    if "files" not in manifest:
        report.add("file_hashes", None, "the manifest lists no sha256 per file (an export from before surgeon recorded "
                                        "them): files cannot be verified; re-export")
        return
    changed = changed_files(out_dir, manifest)
    report.add("file_hashes", not changed, f"sha256 of all {len(manifest['files'])} listed files match the manifest"
               if not changed else f"{len(changed)} files differ from the export: {', '.join(changed[:8])}")


def _structure(out_dir: Path, manifest: dict, report: Report) -> bool:
    """The checker and the rank-0 defaults; False when the model file cannot even be parsed."""
    model_path = out_dir / manifest["model"]
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
        report.add("onnx_checker", True, "onnx.checker (full) accepts the model")
    except Exception as err:
        report.add("onnx_checker", False, f"onnx.checker: {(str(err).strip().splitlines() or [type(err).__name__])[0]}")
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as err:
        report.add("model_file", False, f"{model_path}: not a readable ONNX model ({type(err).__name__}: {err})")
        return False
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    missing = []
    slot = [1] if manifest.get("bank") else []  # a bank's defaults are one-slot banks of rank 0
    for lo in manifest.get("lora_inputs", []):
        if "ia3" in lo:  # an (IA)^3 vector's default: ones, the base
            size = lo["in"] if lo.get("scales") == "input" else lo["out"]
            if inits.get(lo["ia3"]) != slot + [size]:
                missing.append(lo["path"])
        elif inits.get(lo["a"]) != slot + [lo["in"], 0] or inits.get(lo["b"]) != slot + [0, lo["out"]]:
            missing.append(lo["path"])
    if slot and inits.get(ADAPTER_IDS) != [1]:
        missing.append(f"{ADAPTER_IDS} (its default [0]: every row the base)")
    report.add("rank0_defaults", not missing,
               "every adapter input has a rank-0 default initializer" if not missing
               else f"no rank-0 default for {', '.join(missing[:5])}")
    return True


def _genai(out_dir: Path, manifest: dict, report: Report) -> None:
    """A KV-cache export's ``genai_config.json`` against its graph: names, layer count, cache dims, vocabulary."""
    if not manifest.get("kv_cache"):
        return
    recorded = manifest.get("genai") or {}
    if not recorded.get("config"):
        report.add("genai_config", None, f"no {GENAI_CONFIG}: " + (recorded.get("why") or "an export from before "
                                                                   "surgeon wrote it; re-export"))
        return
    path = export_path(out_dir, recorded["config"], f"{out_dir / MANIFEST}: genai.config")
    try:
        config = read_json(path, ExportFileError, "re-export")
    except ExportFileError as err:
        report.add("genai_config", False, str(err))
        return
    proto = onnx.load(str(out_dir / manifest["model"]), load_external_data=False)
    problems = check_genai_config(config, proto, manifest["generation"], manifest["model"])
    report.add("genai_config", not problems, f"{GENAI_CONFIG} fits the graph (names, {manifest['generation']['layers']} "
               "layers, cache heads and head size, vocabulary, context, special tokens)" if not problems
               else f"{GENAI_CONFIG}: {'; '.join(problems[:4])}")


def _names(out_dir: Path, manifest: dict, session: AdapterSession, report: Report) -> None:
    declared = {lo[k] for lo in manifest.get("lora_inputs", []) for k in ("a", "b", "dora", "ia3") if k in lo}
    absent = sorted(declared - set(session.lora_inputs))
    report.add("manifest_inputs", not absent, "manifest adapter inputs exist in the model" if not absent
               else f"in the manifest but not the model: {', '.join(absent[:5])}")
    for name in sorted(manifest.get("adapters", {})):
        try:
            session.adapter(name)  # reads, checks names, dtypes and shapes, loads
        except Exception as err:
            report.add(f"adapter_file[{name}]", False, " ".join(str(err).split()))
            continue
        report.add(f"adapter_file[{name}]", True, "readable; names, dtypes and shapes fit the model's adapter inputs")
    if session.bank is not None:
        report.add("bank", *bank_matches_adapters(out_dir, manifest, session))


def _numbers(manifest: dict, session: AdapterSession, reference: str | None, report: Report,
             sources: dict[str, str | None]) -> None:
    if not reference:
        report.add("reference", None, "no reference model in the manifest; pass --reference MODEL")
        return
    merged = manifest.get("merged_adapter")
    usable = _usable_sources(manifest, sources, report)
    try:
        ref = _reference_model(reference, manifest, usable)
    except Exception as err:
        report.add("reference", False, f"could not build the torch reference from {reference}: {' '.join(str(err).split())}")
        return
    cases = [(None, "base")] + [(name, f"adapter[{name}]") for name in sorted(manifest.get("adapters", {}))
                                if name in usable]
    if merged:
        cases = [(merged, f"merged[{merged}]")] if merged in usable else []
    refs = [(ref, "", None)]
    if manifest.get("int4"):  # tight against the export's own 4-bit weights, loose against the float model
        refs = [(ref, "_float", INT4_FLOAT_RTOL)]
        if not merged:  # a merged export's weights hold the fold: no base weight to put them in
            proto = onnx.load(str(export_path(session.dir, manifest["model"], "model")))
            exact = _reference_model(reference, manifest, usable, dequantized_weights(proto, manifest["int4"]["weights"]))
            refs.insert(0, (exact, "", INT4_RTOL[manifest["int4"]["accuracy_level"] == 4]))
    for adapter, label in cases:
        for model, suffix, rtol in refs:
            _compare(manifest, session, model, adapter, label + suffix, report, rtol)


def _usable_sources(manifest: dict, sources: dict[str, str | None], report: Report) -> dict:
    """Adapter name -> its source directory (or a fold's recipe) where one is here; the others reported as not run."""
    merged = manifest.get("merged_adapter")
    usable = {n: d for n, d in sources.items() if d and Path(d).is_dir()}
    recipe = manifest.get("merge_recipe")
    if merged and merged not in usable and _recipe_ok(recipe):
        usable[merged] = recipe  # a weighted merge: rebuilt from its adapters and weights
    for name in sorted(set(sources) - set(usable)):
        why = f"its source {sources[name]} is not a directory here" if sources[name] else "no source directory recorded"
        report.add(f"{'merged' if merged else 'adapter'}[{name}]_vs_torch", None,
                   f"could not compare adapter {name!r} with torch: {why}; pass --adapter {name}=PEFT_DIR")
    return usable


def _compare(manifest: dict, session: AdapterSession, ref, adapter: str | None, label: str, report: Report,
             rtol: float | None = None) -> None:
    """ORT against torch for one adapter (None: the base) at two shapes, plus one decode step with a KV cache."""
    causal = manifest["source"].get("class", "").endswith(("ForCausalLM", "LMHeadModel"))
    kv, quantized = bool(manifest.get("kv_cache")), manifest.get("quantization")
    run_adapter = None if manifest.get("merged_adapter") else adapter
    worst = step_worst = scale = 0.0
    bad: list[str] = []
    n = session.prompt_tokens.get(run_adapter, 0)  # a prompt-tuning adapter's virtual tokens (prompt_check.py)
    for b, s in ((1, 7), (3, 12)):
        feeds = with_virtual(_feeds(getattr(ref, "base", ref).config, session.input_names, b, s, causal), n)
        out = session.run({**feeds, **empty_past(manifest["generation"], b)} if kv else feeds, adapter=run_adapter)
        bad += [f"ORT {k} at {b}x{s}" for k, v in out.items() if not np.isfinite(v).all()]
        want = prompt_logits(ref, feeds, adapter) if n else _torch_logits(ref, feeds, adapter)
        bad += [f"torch logits at {b}x{s}"] if not np.isfinite(want).all() else []
        scale = max(scale, float(np.abs(want).max()))
        worst = max(worst, _max_diff(out[LOGITS], want, feeds["attention_mask"]))
        if kv:
            step_worst = max(step_worst, _decode_step_diff(session, ref, feeds, out, run_adapter, adapter, n))
    tol, how = report.atol, f"atol {report.atol:g}"
    if rtol is not None:  # int4: a tolerance relative to the logits' scale
        what = "the float model" if label.endswith("_float") else "its dequantized 4-bit weights"
        tol, how = max(tol, rtol * scale), f"int4 against {what}: {rtol:g} x max |logit| {scale:.3g}"
    elif quantized:  # the export's own quantized ops: a tolerance relative to the logits' scale
        rtol = CHECK_RTOL[quantized["bits"]]
        tol, how = max(tol, rtol * scale), f"{quantized['bits']}-bit packed weights: {rtol:g} x max |logit| {scale:.3g}"
    if bad:
        report.add(f"{label}_finite", False, f"non-finite values (NaN/Inf) in {', '.join(bad[:4])}")
    report.add(f"{label}_vs_torch", worst <= tol,
               f"max |ORT - torch| = {worst:.3g} on real tokens ({how}, batch 1x7 and 3x12)", _finite_or_none(worst))
    if kv:
        report.add(f"{label}_decode_vs_torch", step_worst <= tol,
                   f"one decode step on the KV cache: max |ORT - torch| = {step_worst:.3g} ({how})",
                   _finite_or_none(step_worst))


def _recipe_ok(recipe) -> bool:
    return (isinstance(recipe, dict) and isinstance(recipe.get("adapters"), list) and isinstance(recipe.get("weights"), list)
            and len(recipe["adapters"]) == len(recipe["weights"]) > 0
            and all(isinstance(d, str) and Path(d).is_dir() for d in recipe["adapters"])
            and all(isinstance(w, (int, float)) and math.isfinite(w) for w in recipe["weights"]))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _decode_step_diff(session: AdapterSession, ref, feeds: dict, prefill: dict, run_adapter, adapter, n: int) -> float:
    """One more token on the prefill's presents (a prompt enters the prefill only) against torch on the whole."""
    b = feeds["input_ids"].shape[0]
    token = np.full((b, 1), 5, np.int64)
    mask = np.concatenate([feeds["attention_mask"], np.ones((b, 1), np.int64)], axis=1)
    feeds_for = past_of_present(session.generation["layers"])
    past = {feeds_for[k]: v for k, v in prefill.items() if k in feeds_for}
    step = {"input_ids": token, "attention_mask": mask, "position_ids": np.cumsum(mask, 1)[:, -1:] - 1, **past}
    got = session.run(step, adapter=None if n else run_adapter)[LOGITS][:, -1]
    whole = {"input_ids": np.concatenate([feeds["input_ids"], token], axis=1), "attention_mask": mask,
             "position_ids": np.clip(np.cumsum(mask, 1) - 1, 0, None)}
    want = (prompt_logits(ref, whole, adapter) if n else _torch_logits(ref, whole, adapter))[:, -1]
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(diff.max()) if np.isfinite(diff).all() else math.inf


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
    """Largest difference at real positions; ``inf`` when either side has a NaN or Inf there (max() would drop NaN)."""
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if diff.ndim == 3:
        diff = diff[mask.astype(bool)]
    return float(diff.max()) if np.isfinite(diff).all() else math.inf


def _reference_model(reference: str, manifest: dict, sources: dict[str, str], weights: dict | None = None):
    """The torch model the export came from: the source base + each adapter from its source PEFT directory.
    ``weights`` (an int4 export's dequantized weights) replace the base's."""
    task = "SEQ_CLS" if "SequenceClassification" in manifest["source"].get("class", "") else None
    base = load_base(reference, (manifest.get("quantization") or {}).get("bits"), task=task)
    merged = manifest.get("merged_adapter")
    if weights is not None:
        set_weights(base, weights)
    if merged and isinstance(sources.get(merged), dict):  # the weighted merge fold wrote, made again from its recipe
        model, name = with_adapters(base, sources[merged]["adapters"], sources[merged]["weights"])
        if name != merged:
            raise ExportFileError(f"merge_recipe rebuilds adapter {name!r}, but the export folded {merged!r}")
        return model.eval()
    model = None
    for name, directory in sorted(sources.items()):
        if model is None:
            model = SurgeonModel.from_pretrained(base, directory, adapter_name=name)
        else:
            model.load_adapter(directory, adapter_name=name)
    return (model if model is not None else base).eval()  # no adapter to compare: the plain base


def _torch_logits(model, feeds: dict[str, np.ndarray], adapter: str | None) -> np.ndarray:
    inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if not hasattr(model, "peft_config"):  # the plain base model (no adapter had a source)
            return model(**inputs).logits.numpy()
        if adapter is None:
            with model.disable_adapter():
                return model(**inputs).logits.numpy()
        model.set_adapter(adapter)
        return model(**inputs).logits.numpy()
