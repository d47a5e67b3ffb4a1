"""Parquet (pyarrow) export of per-epoch histories and per-trial tables, and reading them back."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ltsearch.errors import StorageError


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@contextlib.contextmanager
def atomic_target(path: str | Path, what: str, shown: Path | None = None) -> Iterator[Path]:
    """The temporary path to write `path`'s new content to; renamed over `path` on success.

    On a failed write (disk full, read-only storage) the temporary file is removed and a StorageError
    says what could not be written (`shown`, if the caller renames `path` further) and how much space is
    left; the old file is untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports a short write as RuntimeError
        tmp.unlink(missing_ok=True)
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "its filesystem cannot be read"
        reason = " ".join(str(error).split())[:200]
        shown = shown or path
        raise StorageError(f"could not write {what} {shown} ({type(error).__name__}: {reason}); {free}. "
                           f"The previous {shown.name}, if any, is intact; free some space (or fix the storage) and rerun or resume") from None


def write_table(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One row per dict (union of keys; missing -> null); written atomically."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = pa.table({c: [_clean(row.get(c)) for row in rows] for c in columns}) if rows else pa.table({})
    with atomic_target(path, "the table") as tmp:
        pq.write_table(table, tmp)
    return path


def read_table(path: str | Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_target(path, "the results") as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    return path


# ------------------------------------------------------------------ any pyarrow filesystem (sweep directories)
def _location(uri: str) -> tuple[Any, str]:
    """(filesystem, path) for a local path or a pyarrow URI (s3://, gs://, hdfs://): a sweep may live on shared storage."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    return fs.FileSystem.from_uri(uri)


def location_exists(uri: str) -> bool:
    from pyarrow import fs

    filesystem, path = _location(uri)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def write_text_to(text: str, uri: str) -> str:
    """Write a small text file anywhere pyarrow reaches; local files are replaced atomically."""
    return write_bytes_to(text.encode(), uri)


def write_bytes_to(content: bytes, uri: str) -> str:
    """Write a small file (text, a PNG) anywhere pyarrow reaches; local files are replaced atomically."""
    if "://" not in uri:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
        return uri
    filesystem, path = _location(uri)
    filesystem.create_dir(path.rpartition("/")[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(content)
    return uri


def read_text_from(uri: str) -> str:
    return read_bytes_from(uri).decode()


def read_bytes_from(uri: str) -> bytes:
    filesystem, path = _location(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _column(values: list[Any]) -> pa.Array:
    """A column of mixed types (a choice of a number and a string) is stored as text rather than failing."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values])


def write_table_to(rows: list[dict[str, Any]], uri: str) -> str:
    """`write_table` for any location: one row per dict (union of keys), dict cells kept as JSON text."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    table = pa.table({c: _column([_cell(row.get(c)) for row in rows]) for c in columns}) if rows else pa.table({})
    if "://" not in uri:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return uri
    filesystem, path = _location(uri)
    pq.write_table(table, path, filesystem=filesystem)
    return uri


def _cell(value: Any) -> Any:
    value = _clean(value)
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict) else value
