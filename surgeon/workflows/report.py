"""What ``surgeon check`` reports: one ``Check`` per comparison, as text for people and JSON for CI."""

from __future__ import annotations

import dataclasses
import json


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
    strict: bool = False
    checks: list[Check] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No check failed; with ``strict``, also none was skipped."""
        return all(c.passed is True or (c.passed is None and not self.strict) for c in self.checks)

    def add(self, name: str, passed: bool | None, detail: str, value: float | None = None) -> Check:
        check = Check(name, passed, detail, value)
        self.checks.append(check)
        return check

    def to_json(self) -> str:
        return json.dumps({"out_dir": self.out_dir, "atol": self.atol, "strict": self.strict, "passed": self.passed,
                           "checks": [dataclasses.asdict(c) for c in self.checks]}, indent=2, allow_nan=False,
                          default=str) + "\n"

    def text(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "FAIL" if self.strict else "SKIP"}
        lines = [f"{mark[c.passed]}  {c.name}: {c.detail}" for c in self.checks]
        failed = sum(c.passed is False or (c.passed is None and self.strict) for c in self.checks)
        skipped = sum(c.passed is None for c in self.checks) if not self.strict else 0
        lines.append(f"{len(self.checks) - failed - skipped} passed, {failed} failed"
                     + (f", {skipped} could not run (--strict fails them)" if skipped else ""))
        return "\n".join(lines)
