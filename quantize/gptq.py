"""Quantize a checkpoint with GPTQ: `python quantize/gptq.py --bits 4` == `litquant quantize gptq --bits 4`.

Writes `lit_model_gptq.<bits>bit.safetensors` (the blocks' Linears in the AutoGPTQ layout, every other tensor
as saved) and `quantize_config.json`; `--quantize gptq.int<bits>` then runs it.

How it walks the model (what keeps device memory at ~ one block plus the activations):
1. calibration windows are embedded with `transformer.wte` alone (the model itself is built on meta);
2. for each block in order, its tensors are streamed from `lit_model.safetensors` to the device, and its
   Linears are quantized *true-sequentially*, in the order AutoGPTQ uses: attn.qkv, then attn.proj (with its
   inputs recomputed through the already-quantized qkv), then the MLP's input Linears together (fc_1 + fc_2,
   which share their input), then mlp.proj. For each step, forward hooks feed every calibration batch to that
   step's `GPTQ.add_batch` and the forward stops right after it;
3. the quantized block's outputs become the next block's inputs (so later blocks see the quantization error of
   earlier ones and can compensate), and the block's tensors go back to meta.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # `python quantize/gptq.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.checkpoint import (
    DEFAULT_CHECKPOINT_DIR,
    SIDE_FILES,
    WEIGHTS_FILE,
    atomic_write_text,
    build_model,
    check_checkpoint_dir,
    copy_side_files,
    open_safetensors,
    save_safetensors,
)
from litquant.config import CONFIG_FILE, Config
from litquant.errors import UserError, run_job
from litquant.model import build_mask_cache
from litquant.precision import PRECISIONS, parse_precision, pick_accelerator
from litquant.utils import memory_used_line, reset_peak_memory

# The Linears of a block in quantization order; a tuple is quantized together (same input, one forward).
SEQUENTIAL_GROUPS = {
    "LLaMAMLP": (("attn.qkv",), ("attn.proj",), ("mlp.fc_1", "mlp.fc_2"), ("mlp.proj",)),
    "GptNeoxMLP": (("attn.qkv",), ("attn.proj",), ("mlp.fc",), ("mlp.proj",)),
}
# The MLP's down-projection inputs are kept for the block's output pass only up to this size (n_tokens x
# intermediate_size activations: 50 MB for the bundled model, 5.8 GB for Llama-2-7B's default calibration)
MLP_CACHE_BYTES = 1 << 30

class _StopForward(Exception):
    """Raised by a hook once the layers being calibrated have seen their input: the rest of the block is skipped."""


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    *,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = False,
    damp_percent: float = 0.01,
    static_groups: bool = False,
    true_sequential: bool = True,
    block_size: int = 128,
    n_samples: int = 128,
    seq_len: Optional[int] = None,
    calibration_data: Optional[Path] = None,
    batch_size: int = 8,
    output_dir: Optional[Path] = None,
    precision: Optional[str] = None,
    accelerator: str = "auto",
    seed: int = 0,
) -> Path:
    """Quantize the checkpoint's transformer blocks with GPTQ and save them in the AutoGPTQ layout.

    Args:
        checkpoint_dir: a litquant checkpoint directory (with lit_model.safetensors).
        bits: bits per weight: 2, 3, 4 or 8 (4 runs on the int4 kernels: --quantize gptq.int4).
        group_size: input channels sharing one scale and zero point; -1 = one group per output channel.
        act_order: quantize input channels in order of decreasing Hessian diagonal (AutoGPTQ's desc_act).
        sym: symmetric quantization (zero point fixed at the middle of the grid).
        damp_percent: dampening added to the Hessian diagonal, as a fraction of its mean.
        static_groups: with act_order, compute group parameters up front in the original channel order.
        true_sequential: quantize a block's Linears one step at a time, each step's inputs recomputed through
            the steps already quantized (False: all of a block's Linears from one forward).
        block_size: columns per lazy-update block inside GPTQ (speed only, same result).
        n_samples: calibration windows.
        seq_len: tokens per calibration window (default: the model's context, at most 2048).
        calibration_data: a local text/JSON/JSONL file or a directory of them (JSON needs a "text" field);
            default: the bundled training corpus.
        batch_size: calibration windows per forward pass.
        output_dir: where to write (default: checkpoint_dir); another directory gets the config and tokenizer
            files too, so it is a checkpoint directory of its own.
        precision: dtype of the calibration forward passes (32-true, 16-true, bf16-true; default: bf16-true where
            the GPU or CPU computes in bf16 natively, else 16-true on GPUs, 32-true on CPUs). Hessians and GPTQ
            itself always run in fp32 (on the bundled model bf16 calibration gives the same KL to fp as fp32).
        accelerator: auto, cuda or cpu.
        seed: seed of the calibration sampling.
    """
    from litquant.data.calibration import calibration_tokens
    from litquant.quantization.gptq_format import SUPPORTED_BITS
    from litquant.quantization.gptq_plugin import QUANTIZE_CONFIG_FILE, gptq_file, quantize_config
    from litquant.tokenizer import Tokenizer

    if bits not in SUPPORTED_BITS:
        raise UserError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise UserError(f"--group_size must be a positive integer or -1 (per channel), got {group_size}")
    if not 0.0 <= damp_percent <= 1.0:
        raise UserError(f"--damp_percent must be in [0, 1], got {damp_percent}")
    for flag, value in (("--block_size", block_size), ("--n_samples", n_samples), ("--batch_size", batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    checkpoint_dir = Path(checkpoint_dir)
    source = check_checkpoint_dir(checkpoint_dir, WEIGHTS_FILE)
    config = Config.from_checkpoint(checkpoint_dir)
    if config.mlp_class_name not in SEQUENTIAL_GROUPS:
        raise UserError(f"GPTQ does not know the Linear order of a {config.mlp_class_name} block")
    seq_len = min(config.block_size, 2048) if seq_len is None else seq_len
    if not 2 <= seq_len <= config.block_size:
        raise UserError(f"--seq_len must be in [2, {config.block_size}] (the model's context), got {seq_len}")
    _check_shapes(config, bits)
    output_dir = checkpoint_dir if output_dir is None else Path(output_dir)
    try:  # before the work, not after it
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {output_dir}: cannot create it ({e.strerror or e})") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"--output_dir {output_dir} is not writable")
    device = torch.device("cuda" if pick_accelerator(accelerator) == "cuda" else "cpu")
    dtype = PRECISIONS[parse_precision(precision, device)]

    tokenizer = Tokenizer(checkpoint_dir)
    tokens = calibration_tokens(tokenizer, n_samples, seq_len, calibration_data, seed)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    settings = dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp_percent=damp_percent,
                    block_size=block_size, static_groups=static_groups)
    quantized = quantize_blocks(source, config, tokens, settings, device, dtype, batch_size, true_sequential)

    qc = quantize_config(bits, group_size, act_order, sym, damp_percent, true_sequential, static_groups)
    tensors: dict[str, torch.Tensor] = {}
    with open_safetensors(source) as f:  # every tensor that is not a quantized weight, as saved
        for key in f.keys():
            module, _, attr = key.rpartition(".")
            if not (module in quantized and attr == "weight"):
                tensors[key] = f.get_tensor(key)
    for module, packed in quantized.items():
        tensors.update({f"{module}.{attr}": t for attr, t in packed.items()})
    out = output_dir / gptq_file(bits)
    save_safetensors(tensors, out, metadata={"format": "pt", "litquant": "1", "quantize_config": json.dumps(qc)})
    atomic_write_text(output_dir / QUANTIZE_CONFIG_FILE, json.dumps(qc, indent=2) + "\n")
    if output_dir.resolve() != checkpoint_dir.resolve():
        copy_side_files(checkpoint_dir, output_dir, (CONFIG_FILE, *SIDE_FILES))
    elapsed = time.perf_counter() - t0

    print(
        f"Quantized {len(quantized)} Linear layers to {bits} bits (group_size {group_size}, act_order {act_order}) "
        f"with {n_samples} x {seq_len} calibration tokens on {device.type}; saved {out} "
        f"({out.stat().st_size / 1e6:.2f} MB, source {source.stat().st_size / 1e6:.2f} MB)",
        file=sys.stderr,
    )
    print(f"Time for quantization: {elapsed:.02f} sec total", file=sys.stderr)
    print(memory_used_line(device), file=sys.stderr)
    return out


@torch.no_grad()
def quantize_blocks(
    source: Path,
    config: Config,
    tokens: torch.Tensor,
    settings: dict,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    true_sequential: bool = True,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ over every block of the model in `source`: -> {"transformer.h.0.attn.qkv": {qweight, qzeros,
    scales, g_idx}, ...} (CPU tensors; biases stay as in `source`). `settings` are GPTQ.quantize's keyword
    arguments."""

    model = build_model(config, "meta")
    T = tokens.shape[1]
    cos, sin = model._rope(device)
    cos, sin = cos[:T], sin[:T]
    w = config.sliding_window_size
    mask = build_mask_cache(T, w, device) if (w is not None and T > w) else None  # as GPT.forward builds it
    groups = SEQUENTIAL_GROUPS[config.mlp_class_name]
    if not true_sequential:
        groups = (tuple(name for g in groups for name in g),)
    out: dict[str, dict[str, torch.Tensor]] = {}

    with open_safetensors(source) as f:
        wte = f.get_tensor("transformer.wte.weight").to(device=device, dtype=dtype)
        xs = [F.embedding(b.to(device), wte) for b in tokens.split(batch_size)]  # this block's inputs, per batch
        n_tokens = tokens.numel()
        del wte
        keys = list(f.keys())
        bar = tqdm(model.transformer.h, desc="Quantizing", unit="block", disable=not progress)
        for i, block in enumerate(bar):
            prefix = f"transformer.h.{i}."
            stored = _load_block(f, block, prefix, [k for k in keys if k.startswith(prefix)], device, dtype, source)
            tails = [_TailCache(block.attn, "attn.")]
            if n_tokens * block.mlp.proj.in_features * dtype.itemsize <= MLP_CACHE_BYTES:
                tails.append(_TailCache(block.mlp, "mlp."))
            done: set[str] = set()
            for group in groups:
                layers = {name: block.get_submodule(name) for name in group}
                recording = [t for t in tails if t.usable(group, done)]  # true-sequential: attn.proj, mlp.proj
                for t in recording:
                    t.record()
                hessians = _HessianCollector(layers, device)
                handle = layers[group[-1]].register_forward_hook(_stop)
                try:
                    for b, x in enumerate(xs):
                        for t in tails:
                            t.batch = b
                        try:
                            block(x, cos, sin, mask, None, None)
                        except _StopForward:
                            pass
                        hessians.next_forward()
                finally:
                    hessians.remove()
                    handle.remove()
                for name, layer in layers.items():
                    # GPTQ sees the weight as saved, not its calibration-dtype copy (fp32 file, bf16 calibration)
                    result = hessians.gptqs[name].quantize(stored.pop(name + ".weight", layer.weight), **settings)
                    out[prefix + name] = {k: v.cpu() for k, v in result.pack().items()}
                    layer.weight.data = result.weight.to(dtype)  # later steps and blocks see the quantized layer
                    bar.set_postfix_str(f"{name} loss {result.loss:.3g}")
                hessians.free()
                done.update(group)
                for t in recording:
                    t.start()
            for b, x in enumerate(xs):  # the quantized block's outputs are the next block's inputs
                for t in tails:
                    t.batch = b
                xs[b] = block(x, cos, sin, mask, None, None)
            for t in tails:
                t.stop()
            block.to("meta")  # free the block's weights
        bar.close()
    return out


def _stop(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    raise _StopForward


def _linear_names(module: nn.Module, prefix: str) -> list[str]:
    return [prefix + n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


class _HessianCollector:
    """Forward hooks feeding each Linear's inputs to its own GPTQ, except that Linears handed the very same input
    tensor in one forward (the MLP's fc_1 and fc_2) share one GPTQ: one Hessian computed instead of two."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device) -> None:
        from litquant.quantization.gptq import GPTQ

        self.gptqs: dict[str, GPTQ] = {}
        self._seen: list[tuple[torch.Tensor, GPTQ]] = []  # inputs of the current forward, and where they went
        self._new = lambda layer: GPTQ(layer.in_features, device)  # an in_features² Hessian: made once per layer
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            for seen, gptq in self._seen:
                if seen is x:
                    self.gptqs.setdefault(name, gptq)
                    return
            gptq = self.gptqs.get(name)
            if gptq is None:
                gptq = self.gptqs[name] = self._new(module)
            gptq.add_batch(x)
            self._seen.append((x, gptq))

        return hook

    def next_forward(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def free(self) -> None:
        for gptq in self.gptqs.values():
            gptq.free()


class _TailCache:
    """A block's attention and MLP both end with their `proj` Linear. Once every other Linear of such a module is
    quantized, the inputs of its proj are final: recorded while proj is calibrated (`record`), they let every later
    forward of the block replace the whole module by `proj(recorded input)` (`start`): the MLP steps and the
    block's output pass skip qkv, RoPE and SDPA, the output pass also the MLP's up-projections. Costs one copy of
    proj's inputs over the calibration batches, for the length of one block."""

    def __init__(self, module: nn.Module, prefix: str) -> None:
        self.module, self.batch, self.active = module, 0, False
        self.linears = set(_linear_names(module, prefix))
        self.proj = prefix + "proj"
        self.inputs: dict[int, torch.Tensor] = {}
        self._handle = None

    def usable(self, group: tuple[str, ...], done: set[str]) -> bool:
        """True when `group` calibrates proj and every other Linear of the module is already quantized."""
        return self.proj in group and self.linears - {self.proj} <= done

    def record(self) -> None:
        def hook(module: nn.Module, args: tuple) -> None:
            self.inputs[self.batch] = args[0]

        self._handle = self.module.proj.register_forward_pre_hook(hook)

    def start(self) -> None:
        self._handle.remove()
        self._handle = None
        self.module.forward = lambda *args, **kwargs: self.module.proj(self.inputs[self.batch])  # shadows the class's
        self.active = True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        if self.active:
            del self.module.forward
        self.active = False
        self.inputs.clear()


def _load_block(f, block: nn.Module, prefix: str, keys: list[str], device: torch.device, dtype: torch.dtype,
                source: Path) -> dict[str, torch.Tensor]:
    """Stream one block's tensors from the open safetensors file onto the device (replacing the meta ones), in
    the calibration dtype. Returns, on the device, the float tensors whose stored dtype differs from it, as
    stored, so that GPTQ quantizes the real weights (keyed by name within the block)."""
    state, stored = {}, {}
    for k in keys:
        t = f.get_tensor(k)
        name = k[len(prefix):]
        if t.is_floating_point() and t.dtype != dtype and name.endswith(".weight"):
            stored[name] = t.to(device)
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    try:
        block.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{source}: block {prefix[:-1]} does not match model_config.yaml ({detail})") from None
    return stored


def _check_shapes(config: Config, bits: int) -> None:
    """Fail before any work when a Linear cannot be packed at this bit width."""
    from litquant.quantization.gptq_format import check_packable

    block = build_model(config, "meta").transformer.h[0]
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            try:
                check_packable(m.in_features, m.out_features, bits)
            except UserError as e:
                raise UserError(f"{name}: {e}") from None


if __name__ == "__main__":
    run_job(main)
