"""The checkpoint directory: `Checkpoint.open` checks it once; `load_model` builds the model on the meta device,
lets the precision plugin swap Linears for quantized layers, and streams the weights in tensor by tensor (a
quantized layer quantizes each weight as it lands), so no full-precision copy of the model ever exists."""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from litquant.config import CONFIG_FILE, WEIGHTS_FILE, Config
from litquant.errors import UserError
from litquant.io import atomic_path, open_safetensors, save_safetensors
from litquant.utils import release_freed_memory

DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent / "data" / "bundled" / "litquant-tiny"


class Checkpoint:
    """A checkpoint directory, opened and checked once: its config, tokenizer and weight files."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path, self.config = path, config

    @classmethod
    def open(cls, path: Union[str, Path, "Checkpoint"]) -> "Checkpoint":
        if isinstance(path, Checkpoint):
            return path
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"checkpoint directory {str(path)!r} does not exist")
        if not (path / CONFIG_FILE).is_file():
            hint = (
                (
                    " (it looks like a Hugging Face download: run `litquant convert_hf_checkpoint "
                    f"--checkpoint_dir {path}` first)"
                )
                if (path / "config.json").is_file()
                else ""
            )
            raise UserError(f"{path} has no {CONFIG_FILE}{hint}")
        return cls(path, Config.from_file(path / CONFIG_FILE))

    def file(self, name: str = WEIGHTS_FILE, hint: str = "") -> Path:
        """The path of one of its files, which must exist (`hint`: how to make it, for the error)."""
        path = self.path / name
        if not path.is_file():
            present = sorted(p.name for p in self.path.glob("lit_model*.safetensors"))
            hint = f"; {hint}" if hint else ""
            raise UserError(
                f"{self.path} has no {name} (found: {', '.join(present) or 'no weight files'}){hint}"
            )
        return path

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    @functools.cached_property
    def tokenizer(self):
        from litquant.tokenizer import Tokenizer

        return Tokenizer(self.path)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"


# Files of a checkpoint directory besides its weights that a derived checkpoint (GPTQ into another directory,
# merged adapters, full finetuning) copies as they are.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "config.json",
)


def copy_side_files(src: str | Path, dst: str | Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    """Copy each of `names` that `src` has into `dst` (created if needed), each file atomically."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)


def save_checkpoint(
    state_dict: dict[str, torch.Tensor],
    config: Config,
    checkpoint_dir: str | Path,
    weights_file: str = WEIGHTS_FILE,
) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    save_safetensors(state_dict, checkpoint_dir / weights_file, metadata={"format": "pt", "litquant": "1"})
    config.save(checkpoint_dir)


def build_model(config: Config, device: torch.device | str = "meta"):
    from litquant.model import GPT

    with (
        torch.device(device),
        _no_init() if torch.device(device).type == "meta" else contextlib.nullcontext(),
    ):
        return GPT(config)


@contextlib.contextmanager
def _no_init():
    """Skip weight init while building on the meta device: there is nothing to fill, and initializing meta
    tensors goes through torch's reference implementations, which import torch._dynamo (~1 s of start-up)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


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
        for key in tqdm(
            keys, desc=f"Loading {Path(path).name}", disable=not progress, leave=False, unit="tensor"
        ):
            module_name, _, attr = key.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise UserError(
                    f"{path}: unexpected tensor {key!r} (does model_config.yaml match these weights?)"
                ) from None
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
                raise UserError(
                    f"{path}: unexpected tensor {key!r} (does model_config.yaml match these weights?)"
                )
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


def load_model(
    checkpoint: Union[str, Path, Checkpoint],
    plugin=None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> nn.Module:
    """checkpoint -> GPT on meta -> the plugin swaps the Linears its load plan names -> weights streamed in.

    `plugin` is a `litquant.precision` plugin (None = 32-true); its load plan names the file to read (full
    precision, or a pre-quantized one) and the layers to swap, and its dtype is the compute dtype."""
    from litquant.precision import LitquantPrecision

    checkpoint = Checkpoint.open(checkpoint)
    plugin = plugin or LitquantPrecision("32-true")
    plan = plugin.load_plan(checkpoint.path)
    if plan.note:
        print(plan.note, file=sys.stderr)
    weights = checkpoint.file(plan.weights_file)
    t0 = time.perf_counter()
    model = plugin.convert_module(build_model(checkpoint.config, "meta"), plan)
    load_weights(model, weights, device, plugin.dtype, progress=progress)
    model = plugin.after_load(model)
    model.eval()
    if progress:
        print(
            f"Time to load the model: {time.perf_counter() - t0:.02f} seconds.", file=sys.stderr, flush=True
        )
        device = torch.device(device)
        print(f"Kernels: {plugin.describe()} on {device.type}: {plugin.kernels(device)}", file=sys.stderr)
        for hint in plugin.hints(device):
            print(f"Hint: {hint}", file=sys.stderr, flush=True)
    return model
