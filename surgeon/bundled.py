"""What ships inside the package: the tiny GPT-2 and the bundled text (no torch: the CLI reads these first)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
BUILTIN = {"tiny-gpt2": ASSETS / "tiny-gpt2"}
# What `surgeon train` adapts on a built-in model when no -t is given (attention and MLP: a clear effect).
BUILTIN_TARGETS = {"tiny-gpt2": ("c_attn", "c_proj", "c_fc")}
DEFAULT_MODEL = "tiny-gpt2"
DEFAULT_DATA = ASSETS / "corpus" / "finetune.txt"
DEFAULT_HELDOUT = ASSETS / "corpus" / "finetune_heldout.txt"
