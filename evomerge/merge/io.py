"""Model files in and out: lazy safetensors reading and streamed, pre-laid-out sharded writing.

Reading uses plain positioned reads into fresh buffers rather than mmap, so a merge's resident
memory is the tensors it is working on, not every page of every source file it has touched.
Writing lays out every output shard from the plan's shapes before any math runs, writes each
header first and then each tensor's bytes straight into place: no output shard is buffered.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub import snapshot_download

from evomerge.errors import EvomergeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
USER_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "model*.bin")
_MAX_HEADER = 100 * 1024 * 1024


def parse_dtype(name: str, field: str = "dtype") -> torch.dtype:
    try:
        return USER_DTYPES[name.lower()]
    except KeyError:
        known = ", ".join(sorted(USER_DTYPES))
        raise EvomergeError(
            f"field '{field}': unknown dtype {name!r}; use one of {known}"
        ) from None


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header (no tensor data is read)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise EvomergeError(f"{file}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER, size - 8):
                raise EvomergeError(f"{file}: corrupt safetensors header length {header_len}")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"{file}: cannot read safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise EvomergeError(f"{file}: corrupt safetensors header")
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise EvomergeError(f"{file}: tensor {name!r} has a malformed header entry") from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or any(d < 0 for d in shape):
            raise EvomergeError(
                f"{file}: tensor {name!r} header says shape {list(shape)} ({nbytes} bytes) but "
                f"stores {end - begin} bytes"
            )
        if data_start + end > size:
            raise EvomergeError(f"{file}: truncated: tensor {name!r} lies past the end of the file")
        infos[name] = TensorInfo(file, dtype, shape, data_start + begin, nbytes)
    return infos


def resolve_model_path(ref: str, *, search_dirs: Iterable[Path] = ()) -> Path:
    """A local folder for a model reference: a path, else a Hugging Face hub name."""
    for candidate in [Path(ref).expanduser(), *(Path(d) / ref for d in search_dirs)]:
        if candidate.is_dir():
            return candidate.resolve()
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise EvomergeError(f"model {ref!r}: no such folder")
    try:
        folder = snapshot_download(
            ref,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # hub errors come in many types; the user needs the one line
        raise EvomergeError(
            f"model {ref!r}: not a local folder and not downloadable from the hub "
            f"({type(exc).__name__}); check the path or your network/HF_HUB_OFFLINE"
        ) from None
    return Path(folder)


_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_finite(tensor: torch.Tensor, name: str, file: Path) -> None:
    """Refuse NaN/inf weights as they are read: merged into anything, they poison every score."""
    if tensor.dtype not in _CHECKED_DTYPES or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)  # NaN propagates, inf is an extreme: one fast pass
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(tensor)).sum())
        raise EvomergeError(
            f"{file}: tensor {name!r} holds {bad} NaN or infinite values of {tensor.numel()}; "
            "the checkpoint is damaged or the model diverged: re-export or drop it"
        )


class ModelSource:
    """One source model: its config, tensor index, and tensors read on demand."""

    def __init__(
        self, ref: str, *, allow_pickle: bool = False, search_dirs: Iterable[Path] = ()
    ) -> None:
        self.ref = ref
        self.path = resolve_model_path(ref, search_dirs=search_dirs)
        self.config = self._read_config()
        self.index: dict[str, TensorInfo] = {}
        self._pickle_files: dict[str, Path] = {}
        self._open: Optional[tuple[Path, Any]] = None  # the one open shard (file handle or dict)
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            for file in self._indexed_shards(files):
                self.index.update(read_safetensors_header(file))
        else:
            self._index_pickle(allow_pickle)
        if not self.index and not self._pickle_files:
            raise EvomergeError(f"model {ref!r}: no weights found in {self.path}")

    # ----- metadata ------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        file = self.path / "config.json"
        try:
            return json.loads(file.read_text())
        except FileNotFoundError:
            raise EvomergeError(f"model {self.ref!r}: {file} is missing") from None
        except (OSError, ValueError) as exc:
            raise EvomergeError(f"model {self.ref!r}: cannot read {file} ({exc})") from None

    def _indexed_shards(self, files: list[Path]) -> list[Path]:
        index_file = self.path / "model.safetensors.index.json"
        if not index_file.exists():
            return files
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise EvomergeError(f"{index_file}: unreadable shard index ({exc})") from None
        shards = sorted({self.path / name for name in weight_map.values()})
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise EvomergeError(
                f"model {self.ref!r}: shard {missing[0]} named in the index is missing"
            )
        return shards

    def _index_pickle(self, allow_pickle: bool) -> None:
        found = sorted({f for pattern in PICKLE_PATTERNS for f in self.path.glob(pattern)})
        if not found:
            return
        if not allow_pickle:
            raise EvomergeError(
                f"model {self.ref!r}: only pickle weights ({found[0].name}); pickle can run code "
                "when loaded: convert to safetensors, or pass --allow-pickle to load with "
                "torch's weights_only loader"
            )
        for file in found:
            state = self._load_pickle(file)
            for name, tensor in state.items():
                self._pickle_files[name] = file
                self.index[name] = TensorInfo(
                    file,
                    tensor.dtype,
                    tuple(tensor.shape),
                    0,
                    tensor.numel() * tensor.element_size(),
                )
            del state

    @staticmethod
    def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many types for unsafe or corrupt pickles
            raise EvomergeError(
                f"{file}: refused or unreadable pickle ({type(exc).__name__})"
            ) from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise EvomergeError(f"{file}: pickle does not hold a state dict")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return archs[0]

    @property
    def vocab_size(self) -> Optional[int]:
        value = self.config.get("text_config", self.config).get("vocab_size")
        return int(value) if isinstance(value, int) else None

    @property
    def num_layers(self) -> int:
        cfg = self.config.get("text_config", self.config)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in cfg:
                return int(cfg[key])
        raise EvomergeError(f"model {self.ref!r}: config.json has no num_hidden_layers")

    # ----- tensors ---------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor the caller owns."""
        try:
            info = self.index[name]
        except KeyError:
            raise EvomergeError(f"model {self.ref!r}: has no tensor {name!r}") from None
        if self._pickle_files:
            return self._get_pickled(name, info.file)
        handle = self._handle(info.file)
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            view = memoryview(buffer.numpy())
            got = os.preadv(handle.fileno(), [view], info.begin)
            if got != info.nbytes:
                raise EvomergeError(f"{info.file}: short read for tensor {name!r}")
        tensor = buffer.view(info.dtype).reshape(info.shape)
        check_finite(tensor, name, info.file)
        return tensor

    def _handle(self, file: Path) -> Any:
        if self._open is None or self._open[0] != file:
            self.close()
            self._open = (file, open(file, "rb"))  # noqa: SIM115 (kept open across reads)
        return self._open[1]

    def _get_pickled(self, name: str, file: Path) -> torch.Tensor:
        if self._open is None or self._open[0] != file:
            self.close()
            self._open = (file, self._load_pickle(file))
        tensor = self._open[1][name].clone()
        check_finite(tensor, name, file)
        return tensor

    def close(self) -> None:
        if self._open is not None and hasattr(self._open[1], "close"):
            self._open[1].close()
        self._open = None


# ----- writing ---
@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


class ShardedWriter:
    """Writes a known set of tensors into pre-laid-out safetensors shards, in any order."""

    def __init__(self, folder: Path, tensors: list[OutputTensor], max_shard_bytes: int) -> None:
        self.folder = folder
        groups: list[list[OutputTensor]] = [[]]
        size = 0
        for t in tensors:
            if groups[-1] and size + t.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        count = len(groups)
        self.shard_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._where: dict[str, tuple[int, int, OutputTensor]] = {}
        self._fds: list[int] = []
        for shard, group in enumerate(groups):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offsets, offset = [], 0
            for t in group:
                header[t.name] = {
                    "dtype": DTYPE_NAMES[t.dtype],
                    "shape": list(t.shape),
                    "data_offsets": [offset, offset + t.nbytes],
                }
                offsets.append(offset)
                offset += t.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            data_start = 8 + len(blob)
            path = folder / self.shard_names[shard]
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.write(fd, struct.pack("<Q", len(blob)) + blob)
            os.ftruncate(fd, data_start + offset)
            for t, rel in zip(group, offsets):
                self._where[t.name] = (shard, data_start + rel, t)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset, spec = self._where[name]
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"{name}: planned {spec.dtype}{list(spec.shape)}, "
                f"got {tensor.dtype}{list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fds[shard], view, offset)
            view = view[written:]
            offset += written
        self._written.add(name)

    def finish(self) -> None:
        missing = set(self._where) - self._written
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were never written")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if len(self.shard_names) > 1:
            total = sum(spec.nbytes for _, _, spec in self._where.values())
            weight_map = {
                name: self.shard_names[shard] for name, (shard, _, _) in self._where.items()
            }
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5G', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match:
        raise EvomergeError(f"--shard-size: cannot read {text!r}; use e.g. 2GB or 500MB")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)
