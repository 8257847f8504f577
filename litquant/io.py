"""Files: atomic writes, and safetensors read and written one tensor at a time.

The reader does plain reads, not mmap: with mmap every page read stays in the process's resident set until the file
is closed, so streaming a 13 GB checkpoint into a 4 GB quantized model would still peak at 17 GB. The writer lays
out the header first (names, dtypes, shapes known up front) and then takes each tensor as it is produced, so a
conversion holds only the tensors in flight. Every write goes to a temp file renamed over the target at the end.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors.torch import save_file

from litquant.errors import UserError

# ---- atomic writes -----------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path` (a crash leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: Optional[dict] = None
) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


# ---- reading -----------------------------------------------------------------------------------

DTYPES = {
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
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class _Slice:
    def __init__(self, dtype: str, shape: list[int]) -> None:
        self._dtype, self._shape = dtype, shape

    def get_dtype(self) -> str:
        return self._dtype

    def get_shape(self) -> list[int]:
        return list(self._shape)


class SafetensorsFile:
    """A safetensors file read tensor by tensor with plain reads (the `safe_open` interface we use).

    Not memory-mapped on purpose: with mmap every page read stays in the process's resident set until
    the file is closed, so streaming a 13 GB checkpoint into a 4 GB quantized model would still peak at
    17 GB RSS. Plain reads go through the page cache, which is not ours, and each tensor's buffer is
    freed as soon as the caller drops it. The header is checked against the file size up front, so a
    truncated file fails before any work is done."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            self._fail("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            self._fail("header length past the end of the file")
        try:
            header = json.loads(self._f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._fail("header is not valid JSON")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        self._metadata = header.pop("__metadata__", None)
        if self._metadata is not None and not (
            isinstance(self._metadata, dict) and all(isinstance(v, str) for v in self._metadata.values())
        ):
            self._fail("__metadata__ is not a map of strings")
        self._data_start = 8 + n
        self._entries: dict = header
        for name, e in header.items():
            try:
                begin, end = e["data_offsets"]
                dtype, shape = DTYPES[e["dtype"]], e["shape"]
                ok = (
                    isinstance(shape, list)
                    and all(type(d) is int and d >= 0 for d in shape)
                    and type(begin) is int
                    and type(end) is int
                    and 0 <= begin <= end
                )
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                self._fail(f"bad header entry for {name!r}")
            if self._data_start + end > size:
                self._fail(f"tensor {name!r} ends past the end of the file")
            if end - begin != math.prod(shape) * dtype.itemsize:
                self._fail(f"tensor {name!r} has {end - begin} bytes for shape {shape}")

    def _fail(self, why: str):
        self._f.close()
        raise UserError(f"{self.path} is not a valid safetensors file (truncated or corrupt? {why})")

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> Optional[dict]:
        return self._metadata

    def get_slice(self, name: str) -> _Slice:
        e = self._entries[name]
        return _Slice(e["dtype"], e["shape"])

    def get_tensor(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        begin, end = e["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        self._f.seek(self._data_start + begin)
        if end > begin and self._f.readinto(buf.numpy()) != end - begin:
            raise UserError(f"{self.path}: cannot read {name!r} (the file changed while reading?)")
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def close(self) -> None:
        self._f.close()


@contextmanager
def open_safetensors(path: str | Path) -> Iterator[SafetensorsFile]:
    """Open a safetensors file for tensor-by-tensor reading; one-line errors for a truncated or corrupt file."""
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist")
    f = SafetensorsFile(path)
    try:
        yield f
    finally:
        f.close()


def safetensors_metadata(path: str | Path) -> dict:
    with open_safetensors(path) as f:
        return f.metadata() or {}


def file_keys(path: str | Path) -> list[str]:
    with open_safetensors(path) as f:
        return list(f.keys())


# ---- writing one tensor at a time ------------------------------------------------------------------


_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: `plan` (name, tensor) fixes every name, dtype and shape and the
    layout up front (meta tensors will do), `write(name, tensor)` puts each tensor's bytes in place in any order, and
    the file appears (atomically, under its final name) only when the `with` block ends with every tensor written."""

    def __init__(
        self,
        path: str | Path,
        plan: Iterable[tuple[str, torch.Tensor]],
        metadata: Optional[dict[str, str]] = None,
    ) -> None:
        self.path = Path(path)
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, t in plan:
            dtype, shape = t.dtype, tuple(t.shape)
            if name in self._entries:
                raise ValueError(f"{name!r} is planned twice")
            nbytes = math.prod(shape) * dtype.itemsize
            self._entries[name] = (dtype, tuple(shape), offset, nbytes)
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._head = struct.pack("<Q", len(raw)) + raw
        self._size = len(self._head) + offset
        self._written: set[str] = set()

    def __enter__(self) -> "SafetensorsWriter":
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._f = open(self._tmp, "r+b")
        self._f.write(self._head)
        self._f.truncate(self._size)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._entries:
            raise ValueError(f"{name!r} is not in the plan of {self.path.name}")
        dtype, shape, offset, nbytes = self._entries[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        if name in self._written:
            raise ValueError(f"{name!r} is written twice")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._f.seek(len(self._head) + offset)
        self._f.write(memoryview(data.numpy()))
        self._written.add(name)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        missing = [n for n in self._entries if n not in self._written]
        if exc_type is None and missing:
            exc = ValueError(
                f"{self.path.name}: never wrote {', '.join(missing[:3])}"
                + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            )
            self._ctx.__exit__(type(exc), exc, None)
            raise exc
        self._ctx.__exit__(exc_type, exc, tb)  # renames on success; removes the temp file otherwise


def write_safetensors(
    path: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    plan: Iterable[tuple[str, torch.Tensor]],
    metadata: Optional[dict[str, str]] = None,
) -> int:
    """Write `tensors` (name, tensor), produced one at a time, to `path`; `plan` yields the same names with tensors of
    the same dtypes and shapes (meta tensors: nothing is computed). Returns the number of elements written."""
    from litquant.utils import release_freed_memory

    plan = list(plan)
    with SafetensorsWriter(path, plan, metadata) as w:
        for name, t in tensors:
            w.write(name, t)
            del t
            release_freed_memory()  # glibc keeps freed mid-size buffers in its heap: hand them back as we go
    return sum(t.numel() for _, t in plan)
