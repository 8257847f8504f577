"""The checkpoint directory: validate it, stream its safetensors into a model, save atomically.

A checkpoint directory holds `model_config.yaml`, `lit_model.safetensors` (full precision) and the
tokenizer files; quantized variants (`lit_model_bnb.nf4.safetensors`, `lit_model_gptq.4bit.safetensors`)
sit beside them. Loading never materialises a second copy of the model: the model is built on the
meta device, then each tensor is read from the memory-mapped file, converted, moved to the target
device and assigned, one at a time. Modules that own a custom storage (quantized Linears) receive
their tensors through `load_litquant_tensor(attr, tensor, device, dtype)` and quantize as they land.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from litquant.config import CONFIG_FILE, Config
from litquant.errors import UserError
from litquant.io import (  # noqa: F401  (re-exported: the names jobs import from here)
    DTYPES, SafetensorsFile, atomic_path, atomic_write_text, file_keys, open_safetensors, safetensors_metadata,
    save_safetensors,
)
from litquant.utils import release_freed_memory

WEIGHTS_FILE = "lit_model.safetensors"
DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "litquant-tiny"


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
