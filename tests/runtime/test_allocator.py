import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmfuse.runtime import allocator
from mmfuse.runtime import allocator_state

PYTHON_DIR = str(Path(allocator.__file__).resolve().parents[2])


def _run(code: str) -> dict:
    # A child process, so the tuning does not leak into the rest of the test session.
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": PYTHON_DIR, "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout)


def test_importing_mmfuse_leaves_the_allocator_untouched():
    state = _run("import json, mmfuse, mmfuse.runtime as r; print(json.dumps(r.allocator_state()))")
    assert state["tuned"] is False and state["mallopt"] is None


def test_tune_allocator_is_idempotent_and_reported():
    state = _run("import json; from mmfuse.runtime import tune_allocator, allocator_state as s\n"
                 "a = tune_allocator(1 << 28); b = tune_allocator(1 << 28)\n"
                 "print(json.dumps({'a': a, 'b': b, 'state': s()}))")
    assert state["a"] == state["b"]
    if state["state"]["glibc"] is None:
        assert state["a"] is False and state["state"]["tuned"] is False
    else:
        assert state["a"] is True and state["state"]["tuned"] is True
        assert state["state"]["mallopt"]["retain_bytes"] == 1 << 28


@pytest.mark.parametrize("bad", [0, -1, 1 << 31, 1.5])
def test_tune_allocator_rejects_values_mallopt_cannot_take(bad):
    with pytest.raises(ValueError, match="retain_bytes"):
        allocator.tune_allocator(bad)


def test_allocator_state_has_the_report_fields():
    state = allocator_state()
    assert {"glibc", "tuned", "mallopt", "env", "transparent_hugepage"} <= set(state)
