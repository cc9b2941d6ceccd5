"""Reading dataset pickles from the internet without running their code.

The community releases of CMU-MOSI/MOSEI (MulT, MMSA) are pickles of dicts of numpy
arrays. A pickle can name any importable callable and have it called on load; this
unpickler resolves only the few globals that numpy arrays and plain containers need
and refuses everything else before it is imported, let alone called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from mmim.errors import MMIMInputError

_NUMPY_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),  # ndarray.__reduce__
    ("numpy._core.multiarray", "scalar"),  # numpy scalars
    ("numpy._core.numeric", "_frombuffer"),  # protocol-5 arrays
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
             "float", "complex", "bool", "slice"}
_OTHER_GLOBALS = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol-2 pickles made by Python 3 store bytes
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a callable outside the allow-list."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Pickles made with numpy 1.x say numpy.core; numpy 2 calls it numpy._core.
        canonical = module.replace("numpy.core.", "numpy._core.", 1) if module.startswith("numpy.core.") else module
        allowed = ((canonical, name) in _NUMPY_GLOBALS or (canonical, name) in _OTHER_GLOBALS
                   or (canonical == "builtins" and name in _BUILTINS))
        if not allowed:
            raise RefusedGlobal(
                f"refused global {module}.{name} (only numpy arrays and builtin containers are allowed)")
        return super().find_class(canonical, name)


def load_untrusted_pickle(path: str | Path) -> Any:
    """Unpickle `path` admitting only numpy arrays and builtins; clear errors otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _RestrictedUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: no such file") from None
    except RefusedGlobal as error:
        raise MMIMInputError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            MemoryError) as error:
        reason = str(error) or error.__class__.__name__
        raise MMIMInputError(f"{path}: truncated or not a valid pickle ({reason})") from None
