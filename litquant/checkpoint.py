"""The checkpoint directory: validate it, stream its safetensors into a model, save atomically.

A checkpoint directory holds `model_config.yaml`, `lit_model.safetensors` (full precision) and the
tokenizer files; quantized variants (`lit_model_bnb.nf4.safetensors`, `lit_model_gptq.4bit.safetensors`)
sit beside them. Loading never materialises a second copy of the model: the model is built on the
meta device, then each tensor is read from the memory-mapped file, converted, moved to the target
device and assigned, one at a time. Modules that own a custom storage (quantized Linears) receive
their tensors through `load_litquant_tensor(attr, tensor, device, dtype)` and quantize as they land.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm import tqdm

from litquant.config import CONFIG_FILE, Config
from litquant.errors import UserError
from litquant.utils import release_freed_memory

WEIGHTS_FILE = "lit_model.safetensors"
DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "litquant-tiny"


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


# Files of a checkpoint directory besides its weights that a derived checkpoint (GPTQ into another directory,
# merged adapters, full finetuning) copies as they are.
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
              "special_tokens_map.json", "config.json")


def copy_side_files(src: str | Path, dst: str | Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """Copy each of `names` that `src` has into `dst` (created if needed), each file atomically."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: Optional[dict] = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_checkpoint(
    state_dict: dict[str, torch.Tensor], config: Config, checkpoint_dir: str | Path, weights_file: str = WEIGHTS_FILE
) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    save_safetensors(state_dict, checkpoint_dir / weights_file, metadata={"format": "pt", "litquant": "1"})
    config.save(checkpoint_dir)


# ---- validation and lazy reading -------------------------------------------------------------


def check_checkpoint_dir(checkpoint_dir: str | Path, weights_file: Optional[str] = WEIGHTS_FILE) -> Path:
    """The path of the weights file, after checking the directory has what a job needs
    (weights_file=None: only the directory and its config)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
    if not (checkpoint_dir / CONFIG_FILE).is_file():
        hint = (" (it looks like a Hugging Face download: run `litquant convert_hf_checkpoint "
                f"--checkpoint_dir {checkpoint_dir}` first)") if (checkpoint_dir / "config.json").is_file() else ""
        raise UserError(f"{checkpoint_dir} has no {CONFIG_FILE}{hint}")
    if weights_file is None:
        return checkpoint_dir
    path = checkpoint_dir / weights_file
    if not path.is_file():
        present = sorted(p.name for p in checkpoint_dir.glob("lit_model*.safetensors"))
        raise UserError(f"{checkpoint_dir} has no {weights_file} (found: {', '.join(present) or 'no weight files'})")
    return path


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
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
                dtype, shape = _DTYPES[e["dtype"]], e["shape"]
                ok = (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                      and type(begin) is int and type(end) is int and 0 <= begin <= end)
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
        return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])

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


def build_model(config: Config, device: torch.device | str = "meta"):
    from litquant.model import GPT

    with torch.device(device):
        return GPT(config)


def load_weights(
    model: nn.Module,
    path: str | Path,
    device: torch.device | str,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> None:
    """Stream every tensor of `path` into `model` (built on meta), converting floats to `dtype`.

    Keys must match the model exactly: a missing, unexpected or wrongly shaped tensor is a UserError
    naming it, so a checkpoint that does not match its config never loads silently."""
    device = torch.device(device)
    with open_safetensors(path) as f:
        keys = f.keys()
        for key in tqdm(keys, desc=f"Loading {Path(path).name}", disable=not progress, leave=False, unit="tensor"):
            module_name, _, attr = key.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise UserError(f"{path}: unexpected tensor {key!r} (does model_config.yaml match these weights?)") from None
            tensor = f.get_tensor(key)
            loader = getattr(module, "load_litquant_tensor", None)
            if loader is not None:
                try:
                    loader(attr, tensor, device, dtype)
                except UserError as e:
                    raise UserError(f"{path}: {key}: {e}") from None
                if device.type == "cpu" and attr == "weight" and tensor.is_floating_point():
                    del tensor  # a full-precision weight was quantized: hand it and the temporaries back
                    release_freed_memory()
                continue
            current = getattr(module, attr, None)
            if not isinstance(current, torch.Tensor):
                raise UserError(f"{path}: unexpected tensor {key!r} (does model_config.yaml match these weights?)")
            if current.shape != tensor.shape:
                raise UserError(
                    f"{path}: {key} has shape {tuple(tensor.shape)} but the config needs {tuple(current.shape)} "
                    "(model_config.yaml does not match the weights)"
                )
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensor = tensor.to(device)
            if isinstance(current, nn.Parameter):
                setattr(module, attr, nn.Parameter(tensor, requires_grad=current.requires_grad))
            else:
                setattr(module, attr, tensor)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{path} is missing tensors: {', '.join(missing[:5])}{more}")


def load_model(checkpoint_dir: str | Path, plugin=None, device: torch.device | str = "cpu", progress: bool = True):
    """checkpoint dir -> Config -> GPT on meta -> plugin swaps Linear classes -> stream weights in.

    `plugin` is a `litquant.precision` plugin (None = 32-true); it names the weights file it reads
    (full precision, or a pre-quantized file) and the compute dtype."""
    from litquant.precision import resolve

    plugin = plugin or resolve("32-true", None)
    checkpoint_dir = Path(checkpoint_dir)
    check_checkpoint_dir(checkpoint_dir, None)
    config = Config.from_checkpoint(checkpoint_dir)
    weights = check_checkpoint_dir(checkpoint_dir, plugin.weights_file(checkpoint_dir))
    t0 = time.perf_counter()
    model = build_model(config, "meta")
    model = plugin.convert_module(model)
    load_weights(model, weights, device, plugin.dtype, progress=progress)
    model = plugin.after_load(model)
    model.eval()
    if progress:
        print(f"Time to load the model: {time.perf_counter() - t0:.02f} seconds.", file=sys.stderr, flush=True)
        device = torch.device(device)
        print(f"Kernels: {plugin.describe()} on {device.type}: {plugin.kernels(device)}", file=sys.stderr)
        for hint in plugin.hints(device):
            print(f"Hint: {hint}", file=sys.stderr, flush=True)
    return model
