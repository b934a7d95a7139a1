"""Optimizer state on disk: JSON for values, .npz (allow_pickle=False) for arrays, one file.

A checkpoint is a zip written next to its final name, fsynced and renamed in, so a reader sees
the old file or the new one; zip CRCs catch a torn or tampered file, and the previous
checkpoint is kept as a fallback.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError

ARRAY_KEY = "__array__"


def split_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """`value` with every numpy array replaced by a reference into `arrays`."""
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError("object arrays cannot be saved without pickle")
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {ARRAY_KEY: key}
    if isinstance(value, dict):
        return {str(k): split_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_arrays(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save {type(value).__name__} in optimizer state")


def join_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {ARRAY_KEY}:
            return arrays[value[ARRAY_KEY]]
        return {k: join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [join_arrays(v, arrays) for v in value]
    return value


def write_state(path: Path, state: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {}
    doc = json.dumps(split_arrays(state, arrays))
    buffer = io.BytesIO()
    np.savez(buffer, __state__=np.frombuffer(doc.encode(), dtype=np.uint8), **arrays)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file on a full disk only holds space
        raise
    _fsync_dir(path.parent)


def read_state(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise EvomergeError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
    if "__state__" not in arrays:
        raise EvomergeError(f"{path}: not an evomerge checkpoint")
    doc = arrays.pop("__state__").tobytes().decode()
    return join_arrays(json.loads(doc), arrays)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
