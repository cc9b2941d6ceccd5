"""The command line that runs one of this project's modules in a fresh, isolated interpreter.

`python -m MODULE` puts the current directory first on the import path, so a folder that
holds an `mmim/` (or a `uvicorn/`, a `numpy.py`) would run its code in our place. The child
is started with `-I` instead (no current directory, no PYTHON* variables, no user
site-packages) and finds this package where the parent found it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mmim

# Where the parent imported `mmim` from; appended (searched last), so nothing it holds
# shadows the standard library or the installed packages.
_PACKAGE_ROOT = str(Path(mmim.__file__).resolve().parent.parent)
_BOOTSTRAP = (
    "import runpy, sys; sys.argv.pop(0); "  # -c leaves '-c' in argv[0]; MODULE is argv[0] after this
    "root = sys.argv.pop(0); sys.path.append(root) if root not in sys.path else None; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def python_module_command(module: str, *args: str) -> list[str]:
    """`[python, ...]` that runs `python -m module args...` without the current directory on its path."""
    return [sys.executable, "-I", "-c", _BOOTSTRAP, _PACKAGE_ROOT, module, *args]
