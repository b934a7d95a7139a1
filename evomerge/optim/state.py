"""Optimizer state on disk: JSON for values, .npz (allow_pickle=False) for arrays.

A checkpoint is a zip written next to its final name, fsynced and renamed in, so a reader sees
the old file or the new one; zip CRCs catch a torn or tampered file, and the previous
checkpoint is kept as a fallback.

A run checkpoints after every tell, so a checkpoint must cost the same at evaluation 5,000 as
at 100. Parts of a state that no longer change (a full chunk of told trials, the covariance of
a finished generation) are `Frozen`: serialised and hashed once, written once to a part file
named by that hash, and referenced from every later checkpoint; a checkpoint then writes only
what changed since.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError

ARRAY_KEY = "__array__"
FROZEN_KEY = "__frozen__"
PART_PREFIX = "part-"


class Frozen:
    """A state value that will not change again, serialised and named by its content once.

    Keep the Frozen object while the value stays the same: writing a checkpoint that holds it
    again costs a file-exists check."""

    def __init__(self, value: Any) -> None:
        arrays: dict[str, np.ndarray] = {}
        self.payload = _npz(split_arrays(value, arrays), arrays)
        self.name = hashlib.sha256(self.payload).hexdigest()[:32]


def split_arrays(
    value: Any, arrays: dict[str, np.ndarray], frozen: dict[str, Frozen] | None = None
) -> Any:
    """`value` with every numpy array replaced by a reference into `arrays` (and every Frozen
    part by its name, collected in `frozen`)."""
    if isinstance(value, Frozen):
        if frozen is None:
            raise TypeError("a frozen part cannot be nested in another")
        frozen[value.name] = value
        return {FROZEN_KEY: value.name}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError("object arrays cannot be saved without pickle")
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {ARRAY_KEY: key}
    if isinstance(value, dict):
        return {str(k): split_arrays(v, arrays, frozen) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_arrays(v, arrays, frozen) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save {type(value).__name__} in optimizer state")


def join_arrays(value: Any, arrays: dict[str, np.ndarray], folder: Path | None = None) -> Any:
    if isinstance(value, dict):
        if set(value) == {ARRAY_KEY}:
            return arrays[value[ARRAY_KEY]]
        if set(value) == {FROZEN_KEY} and folder is not None:
            return read_state(folder / f"{PART_PREFIX}{value[FROZEN_KEY]}.npz")
        return {k: join_arrays(v, arrays, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [join_arrays(v, arrays, folder) for v in value]
    return value


def _npz(doc: Any, arrays: dict[str, np.ndarray], **documents: Any) -> bytes:
    """One .npz: the JSON document, further JSON documents by name, then the arrays."""
    texts = {f"__{name}__": _utf8(json.dumps(v)) for name, v in documents.items()}
    buffer = io.BytesIO()
    np.savez(buffer, __state__=_utf8(json.dumps(doc)), **texts, **arrays)
    return buffer.getvalue()


def _utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


def write_state(path: Path, state: dict[str, Any]) -> list[str]:
    """Write a checkpoint (and each of its frozen parts not yet on disk, beside it); returns
    the names of the parts it references."""
    frozen: dict[str, Frozen] = {}
    arrays: dict[str, np.ndarray] = {}
    doc = split_arrays(state, arrays, frozen)
    for name, part in frozen.items():
        part_path = path.parent / f"{PART_PREFIX}{name}.npz"
        if not part_path.exists():
            _write_atomic(part_path, part.payload)
    _write_atomic(path, _npz(doc, arrays, parts=sorted(frozen)))
    return sorted(frozen)


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file on a full disk only holds space
        raise
    _fsync_dir(path.parent)


def read_state(path: Path) -> Any:
    """A checkpoint with its frozen parts read back in (a missing or damaged part makes the
    whole checkpoint unreadable, so the previous one is used)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise EvomergeError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
    if "__state__" not in arrays:
        raise EvomergeError(f"{path}: not an evomerge checkpoint")
    doc = arrays.pop("__state__").tobytes().decode()
    arrays.pop("__parts__", None)  # what the store's clean-up reads (referenced_parts)
    return join_arrays(json.loads(doc), arrays, path.parent)


def referenced_parts(path: Path) -> list[str]:
    """The frozen parts a checkpoint needs (read without loading its arrays)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "__parts__" not in npz.files:
                return []
            return json.loads(npz["__parts__"].tobytes().decode())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError):
        return []


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
