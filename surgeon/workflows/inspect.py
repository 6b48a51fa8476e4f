"""A readable summary of an adapter directory (``surgeon inspect``)."""

from __future__ import annotations

from pathlib import Path

import torch

from surgeon.adapters import read_adapter_dir
from surgeon.names import CONFIG_NAME, PROMPT_KEY, WEIGHTS_NAME, parse_peft_key


def describe_adapter(directory: str) -> str:
    config, tensors = read_adapter_dir(directory)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    saved, vectors = [], {}
    for key, value in tensors.items():
        path, part = parse_peft_key(key)
        if key == PROMPT_KEY:  # prompt tuning: one table of virtual-token embeddings
            vectors = {f"virtual token {i}": row for i, row in enumerate(value.float())}
        elif part in ("A", "B", "M"):
            pairs.setdefault(path, {})[part] = value
        elif part == "L":
            vectors[path] = value.float()  # [1, in]: scales the input; [out, 1]: the output
        else:
            saved.append((f"{path}.{part}", tuple(value.shape)))
    rows = [("module", "r", "alpha", "scale", "|scale*B@A|")]
    if PROMPT_KEY in tensors:
        rows = [("prompt_embeddings", "size", "norm")]
        rows += [(n, str(v.numel()), f"{torch.linalg.vector_norm(v).item():.4g}") for n, v in vectors.items()]
    elif vectors:  # (IA)^3: one vector per module; how far it is from ones says how much it changes the base
        rows = [("module", "scales", "size", "min", "max", "|l - 1|")]
        rows += [(p, "input" if v.shape[0] == 1 else "output", str(v.numel()), f"{v.min().item():.4g}",
                  f"{v.max().item():.4g}", f"{torch.linalg.vector_norm(v - 1).item():.4g}")
                 for p, v in sorted(vectors.items())]
    for path in sorted(pairs):
        a, b = pairs[path]["A"].float(), pairs[path]["B"].float()
        scale = config.scale_for(path)
        rows.append((path, str(a.shape[0]), f"{config.alpha_for(path):g}", f"{scale:g}",
                     f"{(scale * torch.linalg.matrix_norm(b @ a)).item():.4g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    d = Path(directory)
    size = (d / WEIGHTS_NAME).stat().st_size
    n_params = sum(t.numel() for t in tensors.values())
    lines = [
        f"adapter: {d}",
        f"base: {config.base_model_name_or_path}   task: {config.task_type.value if config.task_type else None}",
        _settings(config),
        "",
        table,
    ]
    if saved:
        lines += ["", "modules_to_save copies: " + ", ".join(f"{n} {s}" for n, s in saved)]
    lines += ["", f"{WEIGHTS_NAME}: {size:,d} bytes, {n_params:,d} parameters; {CONFIG_NAME}: "
              f"{(d / CONFIG_NAME).stat().st_size:,d} bytes"]
    return "\n".join(lines)


def _settings(config) -> str:
    if config.peft_type == "PROMPT_TUNING":
        return (f"prompt tuning: num_virtual_tokens={config.num_virtual_tokens} token_dim={config.token_dim} "
                f"init={config.prompt_tuning_init}")
    if config.peft_type == "IA3":
        return (f"IA3 target_modules={_show(config.target_modules)} feedforward_modules="
                f"{_show(config.feedforward_modules)} init_ia3_weights={config.init_ia3_weights}")
    return (f"r={config.r} lora_alpha={config.lora_alpha:g} dropout={config.lora_dropout:g} rslora={config.use_rslora} "
            f"{'dora=True (lora_magnitude_vector per module) ' if config.use_dora else ''}"
            f"bias={config.bias} target_modules={_show(config.target_modules)}")


def _show(value) -> str:
    return value if isinstance(value, str) or value is None else ",".join(value)
