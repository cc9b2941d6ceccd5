"""Reading dataset pickles from the internet without running their code.

The community releases of CMU-MOSI/MOSEI (MulT, MMSA) are pickles of dicts of numpy
arrays. A pickle can name any importable callable and have it called on load; this
unpickler resolves only the few names that numpy arrays and plain containers need and
refuses everything else before it is imported, let alone called.

Even numpy's own names are not safe to hand to a pickle: `dtype.__setstate__` takes
the dtype's internal flags from the file, so a crafted dtype can make numpy read
attacker bytes as object pointers (memory corruption on the first element access).
So numpy never sees a pickle's dtype or array state. The names below resolve to
stand-ins that record what the pickle describes; a plain dtype (numbers, strings,
objects; no fields, no sub-arrays) is rebuilt fresh from its descriptor, taking only
the byte order from the file, and an array is rebuilt from its raw bytes (sizes
checked) or, for object arrays, from its list of elements. What a tiny pickle can
make us allocate is bounded too: `bytes(n)` / `bytearray(n)` of a count are refused.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmim.core.errors import MMIMInputError
from mmim.core.files import regular_file

# Descriptors numpy writes for plain dtypes: bool, integers, floats, complex, bytes,
# unicode and object, each with its item size ("f4", "U12", "O8").
_PLAIN_DTYPE = re.compile(r"[biufcSUO]\d{1,6}")
_BYTE_ORDERS = ("<", ">", "|", "=")


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for something outside what a dataset release needs."""


class _DtypeSpec:
    """`numpy.dtype(descr, align, copy)` as a pickle calls it; `.dtype` is a fresh numpy dtype."""

    def __init__(self, descr: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(descr, str) or not _PLAIN_DTYPE.fullmatch(descr):
            raise RefusedPickle(f"refused dtype {descr!r} (only plain number, string and object dtypes)")
        self.dtype = np.dtype(descr)

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, sub-array, names, fields, item size, alignment, flags[, metadata]):
        # only the byte order is taken; everything else numpy recomputes from the descriptor.
        if not isinstance(state, tuple) or len(state) not in (8, 9) or state[1] not in _BYTE_ORDERS:
            raise RefusedPickle("refused dtype state (not numpy's)")
        if any(part is not None for part in state[2:5]):
            raise RefusedPickle("refused dtype with fields or a sub-array (only plain dtypes)")
        if state[1] in "<>" and self.dtype.byteorder != "|":
            self.dtype = self.dtype.newbyteorder(state[1])


def _plain_dtype(value: Any) -> np.dtype:
    if not isinstance(value, _DtypeSpec):
        raise RefusedPickle("refused array whose dtype is not a numpy dtype")
    return value.dtype


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(n, int) and n >= 0 for n in value):
        raise RefusedPickle(f"refused array shape {value!r}")
    return value


def _array_from_bytes(shape: Any, dtype: np.dtype, data: Any, order: Literal["C", "F"]) -> np.ndarray:
    """A read-only array over the pickle's raw bytes, whose length must match shape and dtype."""
    shape = _shape(shape)
    if dtype.hasobject:
        raise RefusedPickle("refused object array given as raw bytes")
    if isinstance(data, pickle.PickleBuffer):
        data = data.raw()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RefusedPickle("refused array data that is not bytes")
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise RefusedPickle(f"refused array: {len(data)} bytes for shape {shape} of {dtype}")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order)


class _ArraySpec:
    """What `_reconstruct(ndarray, ...)` starts and the pickle's BUILD fills in; an array after loading."""

    def __init__(self) -> None:
        self.state: tuple | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise RefusedPickle("refused array state (not numpy's)")
        _, shape, dtype, fortran, data = state
        dtype = _plain_dtype(dtype)
        order: Literal["C", "F"] = "F" if fortran else "C"
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != math.prod(_shape(shape)):
                raise RefusedPickle("refused object array whose elements do not match its shape")
            self.state = (shape, data, order)  # elements are converted after loading
        else:
            self.state = (shape, _array_from_bytes(shape, dtype, data, order), order)


_NDARRAY = object()  # `numpy.ndarray`: only ever the first argument of `_reconstruct`


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArraySpec:
    if cls is not _NDARRAY:
        raise RefusedPickle("refused _reconstruct of anything but numpy.ndarray")
    return _ArraySpec()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:  # protocol-5 arrays
    return _array_from_bytes(shape, _plain_dtype(dtype), buffer, "F" if order == "F" else "C")


def _scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _plain_dtype(dtype)
    if dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise RefusedPickle(f"refused numpy scalar of {dtype}")
    return np.frombuffer(data, dtype=dtype)[0]


def _sized(kind: type) -> Any:
    """`bytes`/`bytearray` of existing content only: `bytearray(2**31)` from a 57-byte file is refused."""

    def build(source: Any = b"", *args: Any) -> Any:
        if isinstance(source, int):
            raise RefusedPickle(f"refused {kind.__name__}({source}) (a size, not content)")
        return kind(source, *args)

    return build


_STAND_INS = {
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # ndarray.__reduce__
    ("numpy._core.multiarray", "scalar"): _scalar,  # numpy scalars
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,  # protocol-5 arrays
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeSpec,
    ("builtins", "bytes"): _sized(bytes),
    ("builtins", "bytearray"): _sized(bytearray),
}
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "complex", "bool", "slice"}
_OTHER_GLOBALS = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol-2 pickles made by Python 3 store bytes
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Pickles made with numpy 1.x say numpy.core; numpy 2 calls it numpy._core. Protocol-2
        # pickles name the builtins module as Python 2 did.
        canonical = module.replace("numpy.core.", "numpy._core.", 1) if module.startswith("numpy.core.") else module
        canonical = "builtins" if canonical == "__builtin__" else canonical
        if (canonical, name) in _STAND_INS:
            return _STAND_INS[canonical, name]
        if (canonical, name) in _OTHER_GLOBALS or (canonical == "builtins" and name in _BUILTINS):
            return super().find_class(canonical, name)
        raise RefusedPickle(f"refused global {module}.{name} (only numpy arrays and builtin containers are allowed)")


def _materialize(value: Any, done: dict[int, Any]) -> Any:
    """The loaded object with every stand-in replaced by the real numpy object (shared references
    and cycles through lists and dicts kept)."""
    if id(value) in done:
        return done[id(value)]
    if isinstance(value, _DtypeSpec):
        return value.dtype
    if isinstance(value, _ArraySpec):
        if value.state is None:
            raise RefusedPickle("refused array without data")
        shape, data, order = value.state
        if isinstance(data, np.ndarray):
            done[id(value)] = data
            return data
        array = np.empty(len(data), dtype=object)
        done[id(value)] = array  # an element referring back to its array gets the array
        for index, item in enumerate(data):
            array[index] = _materialize(item, done)
        done[id(value)] = array = array.reshape(shape, order=order)
        return array
    if isinstance(value, dict):
        copy = done[id(value)] = type(value)()
        for key, item in value.items():
            copy[_materialize(key, done)] = _materialize(item, done)
        return copy
    if isinstance(value, list):
        elements: list[Any] = []
        done[id(value)] = elements
        elements.extend(_materialize(item, done) for item in value)
        return elements
    if isinstance(value, (tuple, set, frozenset)):
        return type(value)(_materialize(item, done) for item in value)
    return value


def load_untrusted_pickle(path: str | Path) -> Any:
    """Unpickle `path` admitting only numpy arrays and builtins; clear errors otherwise."""
    path = Path(path)
    try:
        with open(regular_file(path), "rb") as handle:
            loaded = _RestrictedUnpickler(handle, encoding="latin1").load()
        return _materialize(loaded, {})
    except FileNotFoundError:
        raise MMIMInputError(f"{path}: no such file") from None
    except RefusedPickle as error:
        raise MMIMInputError(f"{path}: {error}") from None
    except RecursionError:
        raise MMIMInputError(f"{path}: refused, nested too deeply") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, MemoryError) as error:
        reason = str(error) or error.__class__.__name__
        raise MMIMInputError(f"{path}: truncated or not a valid pickle ({reason})") from None
