"""Hugging Face weight files: finding an HF directory's shards, reading them tensor by tensor (or just their
headers, as meta tensors: a conversion's plan), and writing an HF directory in shards."""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from litquant.checkpoint import copy_side_files
from litquant.errors import UserError
from litquant.io import DTYPES, atomic_write_text, open_safetensors, write_safetensors

# Files an HF directory carries besides the weights; copied unchanged on export.
HF_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
HF_MAX_SHARD_SIZE = 5_000_000_000  # bytes; what transformers itself uses for hub uploads


def hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight shards of an HF directory: safetensors preferred, else pytorch_model*.bin."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise UserError(f"{index} is not a valid weight index (no weight_map)") from None
            missing = [n for n in names if not (checkpoint_dir / n).is_file()]
            if missing:
                raise UserError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [checkpoint_dir / n for n in names]
        # our own outputs and Mistral's native-format duplicate are not HF transformers weights
        files = sorted(
            p
            for p in checkpoint_dir.glob(pattern)
            if p.is_file() and not p.name.startswith(("lit_model", "consolidated", "adapter_model"))
        )
        if files:
            return files
    raise UserError(f"no Hugging Face weight files (*.safetensors or pytorch_model*.bin) in {checkpoint_dir}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError:
        raise UserError(
            f"{path}: refusing to unpickle it, it holds more than tensors (a .bin may run code; "
            "use the model's .safetensors files)"
        ) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path} cannot be read (truncated or corrupt? {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a flat state dict of tensors")
    return state


def iter_hf_files(
    files: list[Path], progress: bool = True, meta: bool = False, only: Optional[set[str]] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from every shard, one tensor at a time (safetensors read lazily, .bin memory-mapped).
    meta=True: meta tensors of the stored dtypes and shapes, nothing read (a conversion's plan); `only`: just
    these names."""
    if meta:
        for path in files:
            if path.suffix == ".safetensors":
                with open_safetensors(path) as st:
                    for name in st.keys():
                        if only is None or name in only:
                            yield name, meta_tensor(st.get_slice(name))
            else:
                for name, t in _load_bin(path).items():
                    if only is None or name in only:
                        yield name, torch.empty(t.shape, dtype=t.dtype, device="meta")
        return
    total = None
    if all(f.suffix == ".safetensors" for f in files):
        total = 0
        for f in files:
            with open_safetensors(f) as st:
                total += len(st.keys())
    bar = tqdm(total=total, desc="Converting", unit="tensor", disable=not progress)
    try:
        for path in files:
            bar.set_postfix_str(path.name)
            if path.suffix == ".safetensors":
                with open_safetensors(path) as st:
                    for name in st.keys():
                        if only is None or name in only:
                            yield name, st.get_tensor(name)
                        bar.update()
            else:
                state = _load_bin(path)
                for name in list(state):
                    t = state.pop(name)
                    if only is None or name in only:
                        yield name, t
                    bar.update()
                del state
    finally:
        bar.close()


def meta_tensor(s) -> torch.Tensor:
    """A meta tensor of a stored tensor's dtype and shape (from its safetensors slice; nothing read)."""
    return torch.empty(s.get_shape(), dtype=DTYPES[s.get_dtype()], device="meta")


def nbytes(s) -> int:
    """Bytes of a stored tensor, from its safetensors slice (shape and dtype; no data read)."""
    return math.prod(s.get_shape()) * DTYPES[s.get_dtype()].itemsize


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Consecutive units (tensors, or whole quantized layers) into shards of at most max_shard_size bytes
    (a single unit larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, n in sizes:
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_hf_dir(checkpoint_dir: Path, output_dir: Path, shards: list[list[str]], tensors, d: dict) -> None:
    """Write the shards, the index or not, config.json and side files. `tensors(shard, meta)` yields a shard's HF
    tensors one at a time (meta=True: meta tensors, the shard file's plan), each written as soon as it is made."""
    output_dir.mkdir(parents=True, exist_ok=True)
    single = len(shards) == 1
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(tqdm(shards, desc="Exporting", unit="shard", disable=single)):
        fname = "model.safetensors" if single else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        plan = list(tensors(shard, True))
        write_safetensors(output_dir / fname, tensors(shard, False), plan, metadata={"format": "pt"})
        weight_map.update({k: fname for k, _ in plan})
        total += sum(t.numel() * t.element_size() for _, t in plan)

    # a stale single file would shadow a new index in transformers' loader, and the other way round
    if single:
        (output_dir / "model.safetensors.index.json").unlink(missing_ok=True)
        stale = [p for p in output_dir.glob("model-*-of-*.safetensors")]
    else:
        atomic_write_text(
            output_dir / "model.safetensors.index.json",
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2),
        )
        stale = [output_dir / "model.safetensors"] + [
            p for p in output_dir.glob("model-*-of-*.safetensors") if p.name not in set(weight_map.values())
        ]
    for p in stale:
        p.unlink(missing_ok=True)
    atomic_write_text(output_dir / "config.json", json.dumps(d, indent=2) + "\n")
    copy_side_files(checkpoint_dir, output_dir, HF_SIDE_FILES)
    print(f"Wrote a Hugging Face {d['model_type']} model to {output_dir}", flush=True)
