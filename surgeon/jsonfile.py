"""Reading the JSON files surgeon is handed (adapter configs, model configs, manifests): one way, one kind of message.

A file that is not UTF-8, not JSON, nested too deeply or holding an int past Python's 4300-digit limit becomes the
caller's error class, naming the file and the fix; never a raw ``UnicodeDecodeError`` or ``RecursionError``.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_json(path: Path, error: type[Exception], fix: str = "") -> object:
    suffix = f"; {fix}" if fix else ""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 ({err.reason} at byte {err.start}){suffix}") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5000-digit int, nesting too deep
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise error(f"{path}: not valid JSON ({reason}){suffix}") from None
