"""Parquet tables of plain rows with pyarrow alone, which pandas reads as the frames it writes.

The download's batches read and write manifest rows on their hot path, and each batch of the
DAG is a process of its own: importing pandas there cost about 0.2 s of CPU, 0.4 ms an image
over a 500-URL batch. So they use pyarrow alone. A :class:`Columns` names each column's pandas
dtype and writes Arrow's "pandas" schema metadata, so ``pandas.read_parquet`` gives the same
dtypes as for a frame pandas wrote (a nullable integer stays ``Int64``, not ``float64``).

pyarrow imports pandas, when it is installed, the first time it converts Python or numpy
values (``pa.array``, ``pa.scalar``, ``Table.from_pylist``, ``Array.to_numpy``) and in
``pq.read_table`` (through ``pyarrow.dataset``). So this module builds arrays from their
buffers (:func:`array`), reads numbers back the same way (:func:`int64_values`), and reads
files with ``ParquetFile``; the download test checks that pandas stays out.

Usage::

    PEOPLE = Columns({"name": "str", "age": "Int64"})
    store.write_parquet(uri, PEOPLE.table([{"name": "Ada", "age": None}]))
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: pandas dtype -> (Arrow type, the metadata's pandas_type)
_KINDS: dict[str, tuple[pa.DataType, str]] = {
    "str": (pa.large_string(), "unicode"),
    "int64": (pa.int64(), "int64"),
    "Int64": (pa.int64(), "int64"),
    "float64": (pa.float64(), "float64"),
    "bool": (pa.bool_(), "bool"),
}
_NUMPY = {pa.int64(): np.int64, pa.float64(): np.float64}


def array(values: Sequence[Any], type: pa.DataType) -> pa.Array:
    """Python values (None is null) as an Arrow array of ``type``: large_string, int64,
    float64 or bool."""
    n = len(values)
    valid = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    nulls = n - int(valid.sum())
    validity = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    if type == pa.large_string():
        # "replace": a lone surrogate (not valid UTF-8) becomes "?" rather than failing the write
        data = [b"" if v is None else v.encode("utf-8", "replace") for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, data), dtype=np.int64, count=n), out=offsets[1:])
        buffers = [validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))]
    elif type == pa.bool_():
        bits = np.fromiter((bool(v) for v in values), dtype=bool, count=n)
        buffers = [validity, pa.py_buffer(np.packbits(bits, bitorder="little"))]
    else:
        numbers = np.fromiter((0 if v is None else v for v in values), _NUMPY[type], count=n)
        buffers = [validity, pa.py_buffer(numbers)]
    return pa.Array.from_buffers(type, n, buffers, null_count=nulls)


def strings(values: Sequence[str | None]) -> pa.Array:
    return array(values, pa.large_string())


def int64_array(numbers: np.ndarray) -> pa.Array:
    """A numpy array of integers as an int64 Arrow array (no copy when it is int64 already)."""
    numbers = np.ascontiguousarray(numbers, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(numbers), [None, pa.py_buffer(numbers)])


def int64_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An int64 column without nulls as a numpy array."""
    chunk = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if chunk.null_count:
        raise ValueError("int64_values: the column has nulls")
    data = chunk.buffers()[1]
    if data is None:  # an empty array may have no buffer
        return np.zeros(0, dtype=np.int64)
    return np.frombuffer(data, dtype=np.int64)[chunk.offset : chunk.offset + len(chunk)]


def read(data: bytes) -> pa.Table:
    """A Parquet file's bytes as a table."""
    return pq.ParquetFile(io.BytesIO(data)).read()


class Columns:
    """A table's columns in order, each with its pandas dtype (a key of ``_KINDS``)."""

    def __init__(self, dtypes: Mapping[str, str]) -> None:
        self.names = tuple(dtypes)
        self.dtypes = dict(dtypes)
        pandas = {
            "index_columns": [],
            "column_indexes": [],
            "columns": [
                {
                    "name": name,
                    "field_name": name,
                    "pandas_type": _KINDS[dtype][1],
                    "numpy_type": dtype,
                    "metadata": None,
                }
                for name, dtype in dtypes.items()
            ],
            "creator": {"library": "pyarrow", "version": pa.__version__},
        }
        self.schema = pa.schema(
            [pa.field(name, _KINDS[dtype][0]) for name, dtype in dtypes.items()],
            metadata={b"pandas": json.dumps(pandas).encode()},
        )

    def table(self, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
        """The rows as a table; a missing key is null, a key of no column is ignored."""
        rows = list(rows)
        return self.from_columns({name: [row.get(name) for row in rows] for name in self.names})

    def from_columns(self, columns: Mapping[str, Any]) -> pa.Table:
        """A table from whole columns (Arrow arrays, or sequences of Python values), all of
        one length, at least one given; a column not given is all null."""
        length = len(next(iter(columns.values())))
        arrays = []
        for field in self.schema:
            values = columns.get(field.name)
            if values is None:
                arrays.append(pa.nulls(length, field.type))
            elif isinstance(values, pa.Array | pa.ChunkedArray):
                arrays.append(values.cast(field.type))
            else:
                arrays.append(array(values, field.type))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def conform(self, table: pa.Table) -> pa.Table | None:
        """``table`` with exactly these columns, in order and of these types: a missing column
        is all null, an extra one dropped; None when a present column cannot be cast (another
        program's file)."""
        arrays = []
        for field in self.schema:
            if field.name not in table.column_names:
                arrays.append(pa.nulls(len(table), field.type))
                continue
            try:
                arrays.append(table.column(field.name).cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                return None
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def empty(self) -> pa.Table:
        return pa.Table.from_arrays([pa.nulls(0, f.type) for f in self.schema], schema=self.schema)
