"""Skipped samples: the error a bad sample raises, and the per-reason tally that every data stage
(conversion, loading, templating, packing) keeps, so nothing is dropped without being counted."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class SampleError(ValueError):
    """One sample cannot be used. `reason` is a short stable key to count by (e.g. "missing_file");
    the message says what is wrong and what to fix."""

    def __init__(self, reason: str, detail: str, where: str = ""):
        super().__init__(f"{where + ': ' if where else ''}{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.where = where    # "file[index]" once known


@dataclass
class Skip:
    """One skipped sample."""
    reason: str   # key counted in SkipReport.counts
    where: str    # "file[index]" of the sample
    detail: str   # what is wrong and what to fix


@dataclass
class SkipReport:
    """Counts of skipped samples per reason plus the first few examples of each reason."""
    max_examples: int = 5                                          # examples kept per reason
    counts: Counter = field(default_factory=Counter)               # reason -> skipped samples
    examples: dict[str, list[Skip]] = field(default_factory=dict)  # reason -> first examples

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.max_examples:
            kept.append(Skip(reason, where, detail))

    def add_error(self, error: SampleError, where: str | None = None) -> None:
        self.add(error.reason, where if where is not None else error.where, error.detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipReport") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            kept = self.examples.setdefault(reason, [])
            kept.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(kept))])

    def to_dict(self) -> dict:
        return {"skipped": self.total, "counts": dict(sorted(self.counts.items())),
                "examples": {r: [f"{s.where}: {s.detail}" for s in ex] for r, ex in sorted(self.examples.items())}}

    def format(self) -> str:
        """Human-readable summary: one line per reason, then its examples indented."""
        if not self.total:
            return "skipped: 0"
        lines = [f"skipped: {self.total}"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n}")
            lines.extend(f"    {s.where}: {s.detail}" for s in self.examples.get(reason, []))
            hidden = n - len(self.examples.get(reason, []))
            if hidden > 0:
                lines.append(f"    ... and {hidden} more")
        return "\n".join(lines)
