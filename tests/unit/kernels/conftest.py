"""Kernel tests run on CPU under the Triton interpreter (TRITON_INTERPRET=1).

The interpreter must be on when `triton` itself is imported (triton.language's
own @jit helpers such as tl.max / tl.argmax are decorated then), and it then
stays on for the whole process: every Triton kernel decorated afterwards runs
interpreted. Two modes follow:

  in-process  triton is not imported yet and this run collects only
              tests/unit/kernels (or TRITON_INTERPRET=1 was already set and
              triton, if imported, is interpreted): switch the interpreter on
              here, before any test module imports triton / flexdraft_kernels.
  child       otherwise (other suites share this process and must keep
              compiled Triton, or triton was imported without the
              interpreter): the kernel test modules are not collected here;
              test_interpreted_child.py runs them in one child pytest process
              with TRITON_INTERPRET=1 and fails if the child fails.

Either way the modules check `_backend.is_interpreted` on their kernels, so a
run can never silently test the reference against itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD_DRIVER = "test_interpreted_child.py"
_mode: str | None = None


def _triton_is_interpreted() -> bool:
    std = sys.modules.get("triton.language.standard")
    return std is not None and type(std.max).__name__ == "InterpretedFunction"


def _args_inside_here(config) -> bool:
    args = [a.split("::")[0] for a in config.args if not a.startswith("-")]
    if not args:
        return False
    for a in args:
        p = Path(a)
        p = (p if p.is_absolute() else Path(config.invocation_params.dir) / p).resolve()
        if p != HERE and HERE not in p.parents:
            return False
    return True


def pytest_configure(config):
    global _mode
    if _mode is not None:
        return
    env_on = os.environ.get("TRITON_INTERPRET") == "1"
    triton_loaded = "triton" in sys.modules
    if env_on and (not triton_loaded or _triton_is_interpreted()):
        _mode = "in-process"
    elif not triton_loaded and _args_inside_here(config):
        os.environ["TRITON_INTERPRET"] = "1"
        _mode = "in-process"
    else:
        _mode = "child"


def pytest_ignore_collect(collection_path, config):
    p = Path(collection_path)
    if p.parent != HERE or not p.name.startswith("test_") or p.suffix != ".py":
        return None
    if _mode == "child":
        return p.name != CHILD_DRIVER or None
    return p.name == CHILD_DRIVER or None
