"""Op showcase used by `mmfuse demo` (filled in as ops land)."""

from __future__ import annotations


def run_showcase(quick: bool = False) -> int:
    print("op showcase: coming with the op set")
    return 0
