"""Wafer maps from a WM-811K-style pickle (``LSWMD.pkl``): the reader a fab points at its own data.

WM-811K (Wu et al. 2015, "Wafer Map Failure Pattern Recognition and Similarity Ranking for
Large-Scale Data Sets") ships as ``LSWMD.pkl``, a pandas DataFrame pickle of 811,457 wafers with
the columns

- ``waferMap``: a 2-D ``uint8`` array per wafer, ``0`` = off the wafer, ``1`` = pass die,
  ``2`` = fail die; the die grid depends on the product, so shapes differ (632 distinct);
- ``failureType``: ``[['none']]``, ``[['Center']]`` … as a nested (1, 1) array, or an empty
  array for the 638,507 unlabelled wafers;
- ``trianTestLabel`` (sic): ``[['Training']]``, ``[['Test']]`` or empty;
- ``dieSize``, ``lotName``, ``waferIndex``.

:func:`read_lswmd` reads such a file into :class:`WaferMapRecord` s (map, class index or -1,
split or None, lot, wafer index, die count) **without pandas and without running code from the
pickle**: a restricted unpickler admits only the numpy array builders and stand-ins for the pandas
containers (DataFrame, its block manager and indexes) and takes the columns out of their pickled
state. The original file (pandas 0.19-era layout, whose ``pandas.indexes`` module no longer
exists) and pickles written by current pandas both read; anything else is refused with an error
naming the file and the object it asked for. A wrong structure (a missing column, a map that is
not a 2-D array of 0/1/2, a class name outside ``class_names``) raises
:class:`WaferMapFormatError` naming the file and the row.
"""

from __future__ import annotations

import codecs
import math
import os
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "WM811K_CLASSES",
    "WaferMapFormatError",
    "WaferMapRecord",
    "lswmd_columns",
    "map_shapes",
    "read_lswmd",
    "wafer_records_from_columns",
]

#: The nine WM-811K pattern classes; index 0 (``none``) is the good wafer, so "defective" = index > 0.
WM811K_CLASSES: tuple[str, ...] = ("none", "Center", "Donut", "Edge-Loc", "Edge-Ring", "Loc", "Near-full", "Random", "Scratch")

_SPLITS = {"training": "train", "train": "train", "test": "test", "val": "val", "validation": "val"}
_SPLIT_COLUMNS = ("trianTestLabel", "trainTestLabel")  # WM-811K's spelling first


class WaferMapFormatError(ValueError):
    """A wafer-map file whose structure is not a WM-811K-style table; the message names the file."""


@dataclass(frozen=True, eq=False)
class WaferMapRecord:
    """One wafer.

    Attributes:
        wafer_map: (H, W) uint8, 0 = off the wafer, 1 = pass die, 2 = fail die.
        label: index into the class names, -1 when unlabelled.
        split: ``"train"``, ``"val"``, ``"test"`` or None (no split given).
        lot: lot name ("" when unknown).
        index: wafer index within its lot (-1 when unknown).
        source: where it came from (file and row, or the generator), for messages and results.
    """

    wafer_map: np.ndarray
    label: int = -1
    split: str | None = None
    lot: str = ""
    index: int = -1
    source: str = ""

    @property
    def die_count(self) -> int:
        """Dies on the wafer (pass + fail)."""
        return int(np.count_nonzero(self.wafer_map))


# -- restricted unpickling -------------------------------------------------------------------

class _PandasStandIn:
    """Stand-in for a pickled pandas object: keeps the constructor arguments and the state."""

    pandas_name = "?"
    args: tuple = ()
    kwargs: Any = None  # _new_Index's dict for an index
    state: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _IndexStandIn(_PandasStandIn):
    """An index rebuilt by ``_new_Index(cls, d)``: ``d`` holds ``data`` (or RangeIndex's start/stop/step)."""

    def values(self) -> list:
        d = self.kwargs or {}
        if "data" in d:
            data = d["data"]
            data = _index_values(data)
            return list(data)
        if "start" in d or "stop" in d:
            return list(range(int(d.get("start", 0) or 0), int(d["stop"]), int(d.get("step", 1) or 1)))
        raise pickle.UnpicklingError(f"a {self.pandas_name} without data")


def _index_values(data: Any) -> list:
    if isinstance(data, _IndexStandIn):
        return data.values()
    if isinstance(data, _PandasStandIn):  # an extension array (pandas 3 strings: a pyarrow array inside)
        state = data.state
        parts = (*data.args, *(state.values() if isinstance(state, dict) else state if isinstance(state, tuple) else ()))
        for part in parts:
            if isinstance(part, np.ndarray):
                return list(part)
            if hasattr(part, "to_pylist"):
                return part.to_pylist()
        raise pickle.UnpicklingError(f"cannot read the values of a pickled {data.pandas_name}")
    if hasattr(data, "to_pylist"):
        return data.to_pylist()
    return list(np.asarray(data).ravel())


def _new_index(cls: type, d: dict | None = None, *rest: Any) -> _IndexStandIn:
    out = _IndexStandIn()
    out.pandas_name = getattr(cls, "pandas_name", "Index")
    out.kwargs = dict(d or {})
    return out


def _unpickle_block(values: Any, mgr_locs: Any, ndim: int = 2, *rest: Any) -> tuple:
    """pandas >= 2's pickled block: ``(values, placement, ndim)``."""
    return ("block", values, mgr_locs)


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 pickles) for the pandas stand-ins only."""
    if isinstance(cls, type) and issubclass(cls, _PandasStandIn) and base is object:
        return cls.__new__(cls)
    raise pickle.UnpicklingError(f"refusing to rebuild {cls!r}")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    found = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    if hasattr(numeric, "_frombuffer"):
        found["_frombuffer"] = numeric._frombuffer
    table: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"):
        for name, fn in found.items():
            table[(mod, name)] = fn
    table.update({("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray,
                  ("numpy.dtypes", "ObjectDType"): type(np.dtype(object))})
    for name in ("StrDType", "Float64DType", "Int64DType", "UInt8DType", "BytesDType", "BoolDType", "Int32DType", "Float32DType"):
        if hasattr(np.dtypes, name):
            table[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    table.update({("builtins", "slice"): slice, ("builtins", "object"): object, ("builtins", "bytes"): bytes,
                  ("builtins", "bytearray"): bytearray, ("copyreg", "_reconstructor"): _reconstructor,
                  ("_codecs", "encode"): codecs.encode,  # bytes in protocol 0-2 pickles
                  ("builtins", "complex"): complex, ("builtins", "set"): set, ("builtins", "frozenset"): frozenset})
    return table


_ARROW_GLOBALS = {("pyarrow.lib", "_restore_array"), ("pyarrow.lib", "py_buffer"), ("pyarrow.lib", "type_for_alias"),
                  ("pyarrow.lib", "chunked_array")}


class _TableUnpickler(pickle.Unpickler):
    """Admits numpy arrays, plain Python values and stand-ins for pandas containers; nothing else runs."""

    _allowed = _numpy_globals()

    def __init__(self, fh: Any, path: str) -> None:
        super().__init__(fh, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays
        self.path = path
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # Python 2 / protocol 0-2 names
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        if key in _ARROW_GLOBALS:  # pandas 3 keeps strings in pyarrow arrays (buffers, no code)
            import pyarrow.lib

            return getattr(pyarrow.lib, name)
        if module == "pandas" or module.startswith("pandas."):
            if name in ("_new_Index", "_new_PeriodIndex"):
                return _new_index
            if name in ("_unpickle_block", "new_block"):
                return _unpickle_block
            if key not in self._stand_ins:
                base = _IndexStandIn if name.endswith("Index") else _PandasStandIn
                self._stand_ins[key] = type(name, (base,), {"pandas_name": name})
            return self._stand_ins[key]
        raise pickle.UnpicklingError(
            f"{self.path}: not a WM-811K-style wafer table: the pickle asks for {module}.{name}, which a wafer-map "
            "table never holds (only numpy arrays and a pandas DataFrame are read)"
        )


def _frame_columns(obj: Any, path: str) -> dict[str, list]:
    """Columns of an unpickled DataFrame stand-in (block-manager state of pandas 0.14.1 … 3.x), or a
    plain ``{column: sequence}`` dict / list of row dicts."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj):
        n = {len(v) for v in obj.values()}
        if len(n) != 1:
            raise WaferMapFormatError(f"{path}: columns of different lengths {sorted(n)}")
        return {k: list(v) for k, v in obj.items()}
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        keys = list(dict.fromkeys(k for r in obj for k in r))
        return {k: [r.get(k) for r in obj] for k in keys}
    if not (isinstance(obj, _PandasStandIn) and obj.pandas_name == "DataFrame" and isinstance(obj.state, dict)):
        raise WaferMapFormatError(f"{path}: expected a pickled pandas DataFrame (WM-811K's LSWMD.pkl), got {_describe(obj)}")
    mgr = obj.state.get("_mgr", obj.state.get("_data"))
    state = getattr(mgr, "state", None)
    args = getattr(mgr, "args", ())
    if len(args) >= 2 and all(isinstance(b, tuple) and b[:1] == ("block",) for b in args[0]):  # pandas >= 2
        axes, blocks = args[1], [(b[1], b[2]) for b in args[0]]
    elif isinstance(state, tuple) and len(state) >= 4 and isinstance(state[3], dict) and "0.14.1" in state[3]:
        new = state[3]["0.14.1"]  # pandas 0.14.1 … 1.x
        axes, blocks = new["axes"], [(b["values"], b["mgr_locs"]) for b in new["blocks"]]
    elif isinstance(state, tuple) and len(state) >= 3:  # before 0.14.1: (axes, block values, block items)
        axes = state[0]
        pos = {n: i for i, n in enumerate(_index_values(axes[0]))}
        blocks = [(v, np.array([pos[n] for n in _index_values(its)])) for v, its in zip(state[1], state[2])]
    else:
        raise WaferMapFormatError(f"{path}: the DataFrame's block manager has an unknown layout")
    names = _index_values(axes[0])
    placed = [(vals, np.arange(len(names))[locs] if isinstance(locs, slice) else np.asarray(locs).ravel())
              for vals, locs in blocks]
    n_rows = len(_index_values(axes[1])) if len(axes) > 1 else None
    columns: dict[str, list] = {}
    for vals, locs in placed:
        vals = _block_array(vals, path)
        if vals.ndim == 1:
            vals = vals[None]
        for k, loc in enumerate(locs):
            columns[str(names[int(loc)])] = list(vals[k])
    if n_rows is not None and any(len(v) != n_rows for v in columns.values()):
        raise WaferMapFormatError(f"{path}: block lengths disagree with the {n_rows}-row index")
    return {str(n): columns[str(n)] for n in names if str(n) in columns}


def _block_array(vals: Any, path: str) -> np.ndarray:
    if isinstance(vals, np.ndarray):
        return vals
    if isinstance(vals, _PandasStandIn):  # an extension array (strings, categoricals): its ndarray
        arr = _index_values(vals)
        return np.asarray(arr, dtype=object)
    raise WaferMapFormatError(f"{path}: a DataFrame block holds {_describe(vals)}, not an array")


def _describe(obj: Any) -> str:
    if isinstance(obj, _PandasStandIn):
        return f"a pandas {obj.pandas_name}"
    return type(obj).__name__


def lswmd_columns(path: str | os.PathLike) -> dict[str, list]:
    """The columns of a WM-811K-style pickle (``LSWMD.pkl``), read without pandas or code execution.

    Also accepts a pickled ``{column: list}`` dict or list of row dicts with the same columns.
    Raises :class:`WaferMapFormatError` naming the file when it is not such a table.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            obj = _TableUnpickler(fh, path).load()
    except FileNotFoundError:
        raise
    except WaferMapFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        msg = str(exc) if str(exc).startswith(path) else f"{path}: not a readable WM-811K-style pickle ({type(exc).__name__}: {exc})"
        raise WaferMapFormatError(msg) from exc
    return _frame_columns(obj, path)


def _nested_text(value: Any) -> str | None:
    """WM-811K's nested labels: ``[['Center']]`` → ``'Center'``; an empty array / None / NaN → None."""
    while True:
        if value is None:
            return None
        if isinstance(value, (str, bytes)):
            text = value.decode() if isinstance(value, bytes) else value
            text = text.strip()
            return text or None
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, np.ndarray):
            if value.size == 0:
                return None
            value = value.ravel()[0]
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                return None
            value = value[0]
            continue
        if isinstance(value, np.generic):
            value = value.item()
            continue
        return str(value)


def _wafer_map(value: Any, where: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2 or arr.size == 0 or arr.dtype.kind not in "uif":
        raise WaferMapFormatError(f"{where}: waferMap must be a non-empty 2-D array of 0/1/2, got shape {arr.shape} dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise WaferMapFormatError(f"{where}: waferMap holds NaN or infinite values")
    if arr.min() < 0 or arr.max() > 2 or (arr.dtype.kind == "f" and np.any(arr != np.round(arr))):
        raise WaferMapFormatError(f"{where}: waferMap values must be 0 (off wafer), 1 (pass) or 2 (fail); got {np.unique(arr)[:8]}")
    return np.ascontiguousarray(arr.astype(np.uint8))


def wafer_records_from_columns(columns: dict[str, Sequence], source: str,
                               class_names: Sequence[str] = WM811K_CLASSES) -> list[WaferMapRecord]:
    """Table columns (``waferMap``, ``failureType``, optional ``trianTestLabel``, ``lotName``,
    ``waferIndex``) → records. A ``failureType`` outside ``class_names`` is an error naming the row."""
    if "waferMap" not in columns:
        raise WaferMapFormatError(f"{source}: no 'waferMap' column (columns: {sorted(columns)})")
    if "failureType" not in columns:
        raise WaferMapFormatError(f"{source}: no 'failureType' column (columns: {sorted(columns)})")
    n = len(columns["waferMap"])
    split_col = next((columns[c] for c in _SPLIT_COLUMNS if c in columns), [None] * n)
    lots, idx = columns.get("lotName", [None] * n), columns.get("waferIndex", [None] * n)
    lookup = {c.lower(): i for i, c in enumerate(class_names)}
    records = []
    for row in range(n):
        where = f"{source}: row {row}"
        wmap = _wafer_map(columns["waferMap"][row], where)
        name = _nested_text(columns["failureType"][row])
        if name is None:
            label = -1
        elif name.lower() in lookup:
            label = lookup[name.lower()]
        else:
            raise WaferMapFormatError(f"{where}: failureType {name!r} is not one of {list(class_names)}")
        split_text = _nested_text(split_col[row])
        split = None if split_text is None else _SPLITS.get(split_text.lower())
        if split_text is not None and split is None:
            raise WaferMapFormatError(f"{where}: trianTestLabel {split_text!r} is not Training/Test")
        lot = _nested_text(lots[row]) or ""
        wi = _nested_text(idx[row])
        try:
            index = int(float(wi)) if wi is not None else -1
        except ValueError:
            index = -1
        records.append(WaferMapRecord(wmap, label, split, lot, index, f"{source}#{row}"))
    return records


def read_lswmd(path: str | os.PathLike, class_names: Sequence[str] = WM811K_CLASSES,
               labelled_only: bool = False) -> list[WaferMapRecord]:
    """Read a WM-811K-style pickle (``LSWMD.pkl``) into :class:`WaferMapRecord` s, in file order.

    Args:
        path: the pickle.
        class_names: the pattern classes, index = label (matched case-insensitively); default WM-811K's nine.
        labelled_only: drop the rows without a ``failureType``.

    Raises:
        FileNotFoundError: no such file.
        WaferMapFormatError: not such a table (message names the file, and the row where one is at fault).
    """
    path = Path(path)
    records = wafer_records_from_columns(lswmd_columns(path), str(path), class_names)
    return [r for r in records if r.label >= 0] if labelled_only else records


def map_shapes(records: Iterable[WaferMapRecord]) -> set[tuple[int, int]]:
    """The distinct map shapes (WM-811K: 632)."""
    return {tuple(r.wafer_map.shape) for r in records}  # type: ignore[misc]
