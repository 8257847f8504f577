"""`litquant quantize gptq` and `litquant quantize bnb`: quantize a checkpoint ahead of time."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from litquant.checkpoint import (
    DEFAULT_CHECKPOINT_DIR,
    SIDE_FILES,
    Checkpoint,
    build_model,
    copy_side_files,
    load_model,
    load_weights,
)
from litquant.config import CONFIG_FILE
from litquant.errors import UserError
from litquant.io import atomic_write_text, save_safetensors
from litquant.precision import PRECISIONS, LitquantPrecision, parse_precision, pick_accelerator, resolve
from litquant.utils import memory_used_line, reset_peak_memory


def gptq(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    *,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = True,
    damp_percent: float = 0.01,
    static_groups: bool = False,
    true_sequential: bool = True,
    block_size: int = 128,
    n_samples: Optional[int] = None,
    seq_len: Optional[int] = None,
    calibration_data: Optional[Path] = None,
    batch_size: int = 8,
    eval_data: Optional[Path] = None,
    eval_tokens: Optional[int] = None,
    output_dir: Optional[Path] = None,
    precision: Optional[str] = None,
    accelerator: str = "auto",
    seed: int = 0,
) -> Path:
    """Quantize the checkpoint's transformer blocks with GPTQ and save them in the AutoGPTQ layout
    (`lit_model_gptq.<bits>bit.safetensors` + `quantize_config.json`; `--quantize gptq.int<bits>` runs it).

    Args:
        checkpoint_dir: a litquant checkpoint directory (with lit_model.safetensors).
        bits: bits per weight: 2, 3, 4 or 8 (4 runs on the int4 kernels: --quantize gptq.int4).
        group_size: input channels sharing one scale and zero point; -1 = one group per output channel.
        act_order: quantize input channels in order of decreasing Hessian diagonal (AutoGPTQ's desc_act).
        sym: symmetric quantization (zero point fixed at the middle of the grid): AutoGPTQ's and gptqmodel's
            default, and what the Marlin and ExLlama GPU kernels require. false: asymmetric (min/max per group).
        damp_percent: dampening added to the Hessian diagonal, as a fraction of its mean.
        static_groups: with act_order, compute group parameters up front in the original channel order.
        true_sequential: quantize a block's Linears one step at a time, each step's inputs recomputed through
            the steps already quantized (False: all of a block's Linears from one forward).
        block_size: columns per lazy-update block inside GPTQ (speed only, same result).
        n_samples: calibration windows (default: 128 on CUDA; on CPU as many as about four minutes of calibration
            allow for this model on this machine, from a quick matmul measurement, between 8 and 128).
        seq_len: tokens per calibration window (default: the model's context, at most 2048 on CUDA, 512 on CPU).
        calibration_data: a local text/JSON/JSONL file or a directory of them (JSON needs a "text" field), or
            `self`: windows sampled from the model itself (temperature 1, from BOS and a random token); default:
            the bundled training corpus.
        batch_size: calibration windows per forward pass.
        eval_data: text for the quality gate printed at the end, held-out perplexity of the quantized model next to
            the base's (a .txt/.json/.jsonl file; default: the bundled held-out split).
        eval_tokens: tokens of it scored (default: 4096 on CUDA, 1024 on CPU; 0 skips the gate).
        output_dir: where to write (default: checkpoint_dir); another directory gets the config and tokenizer
            files too, so it is a checkpoint directory of its own.
        precision: dtype of the calibration forward passes (32-true, 16-true, bf16-true; default: bf16-true where
            the GPU or CPU computes in bf16 natively, else 16-true on GPUs, 32-true on CPUs). Hessians and GPTQ
            itself always run in fp32 (on the bundled model bf16 calibration gives the same KL to fp as fp32).
        accelerator: auto, cuda or cpu.
        seed: seed of the calibration sampling.
    """
    from litquant.data.calibration import SELF, calibration_tokens, self_generated_tokens
    from litquant.quantization.gptq_model import GPTQSettings, default_n_samples, quantize_model
    from litquant.quantization.gptq_plugin import QUANTIZE_CONFIG_FILE, gptq_file

    for flag, value in (("--n_samples", n_samples or 1), ("--batch_size", batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    checkpoint = Checkpoint.open(checkpoint_dir)
    source, config = checkpoint.file(), checkpoint.config
    settings = GPTQSettings(
        bits, group_size, act_order, sym, damp_percent, static_groups, true_sequential, block_size
    )
    settings.check(config)
    device = torch.device("cuda" if pick_accelerator(accelerator) == "cuda" else "cpu")
    dtype = PRECISIONS[parse_precision(precision, device)]
    if seq_len is None:
        seq_len = min(config.block_size, 2048 if device.type == "cuda" else 512)
    if not 2 <= seq_len <= config.block_size:
        raise UserError(f"--seq_len must be in [2, {config.block_size}] (the model's context), got {seq_len}")
    if n_samples is None:
        n_samples, why = default_n_samples(config, seq_len, device, dtype)
        print(
            f"Calibration: {n_samples} x {seq_len} tokens ({why}; --n_samples and --seq_len choose)",
            file=sys.stderr,
        )
    if eval_tokens is None:
        eval_tokens = 4096 if device.type == "cuda" else 1024
    if eval_tokens < 0 or eval_tokens == 1:
        raise UserError(f"--eval_tokens must be 0 (no quality gate) or at least 2, got {eval_tokens}")
    output_dir = checkpoint.path if output_dir is None else Path(output_dir)
    try:  # before the work, not after it
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {output_dir}: cannot create it ({e.strerror or e})") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"--output_dir {output_dir} is not writable")

    tokenizer = checkpoint.tokenizer
    if calibration_data is not None and str(calibration_data) == SELF:
        model = load_model(
            checkpoint, LitquantPrecision(parse_precision(precision, device)), device, progress=False
        )
        t0 = time.perf_counter()
        tokens = self_generated_tokens(model, tokenizer, n_samples, seq_len, seed)
        print(
            f"Sampled {n_samples} x {seq_len} calibration tokens in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
        del model
    else:
        tokens = calibration_tokens(tokenizer, n_samples, seq_len, calibration_data, seed)
    gate_tokens, gate_source = None, None
    if eval_tokens:
        from litquant.evaluation import load_text, text_tokens

        text, gate_source = load_text(eval_data)
        ids = text_tokens(tokenizer, text, eval_tokens)
        w = min(seq_len, ids.numel())  # windows of the calibration length (one RoPE table), the tail dropped
        gate_tokens = ids[: ids.numel() // w * w].view(-1, w)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    out = output_dir / gptq_file(bits)
    quantized, gate = quantize_model(
        checkpoint, settings, tokens, out, device, dtype, batch_size, gate_tokens
    )
    qc = settings.quantize_config()
    atomic_write_text(output_dir / QUANTIZE_CONFIG_FILE, json.dumps(qc, indent=2) + "\n")
    if output_dir.resolve() != checkpoint.path.resolve():
        copy_side_files(checkpoint.path, output_dir, (CONFIG_FILE, *SIDE_FILES))
    elapsed = time.perf_counter() - t0

    print(
        f"Quantized {len(quantized)} Linear layers to {bits} bits (group_size {group_size}, act_order {act_order}) "
        f"with {n_samples} x {seq_len} calibration tokens on {device.type}; saved {out} "
        f"({out.stat().st_size / 1e6:.2f} MB, source {source.stat().st_size / 1e6:.2f} MB)",
        file=sys.stderr,
    )
    print(f"Time for quantization: {elapsed:.02f} sec total", file=sys.stderr)
    print(memory_used_line(device), file=sys.stderr)
    if gate is not None:
        base, quant = gate["base"], gate["quantized"]
        print(
            f"Quality gate: held-out perplexity {quant:.4g} quantized vs {base:.4g} base "
            f"({(quant / base - 1) * 100:+.2f}%), "
            f"{gate['tokens']} tokens of {gate_source}",
            file=sys.stderr,
        )
    return out


def bnb(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    mode: str = "nf4",
    precision: Optional[str] = None,
    quantize_lm_head: bool = False,
) -> Path:
    """Quantize the checkpoint's weights with bitsandbytes and save them for fast quantized loading.

    Args:
        checkpoint_dir: a litquant checkpoint directory (with lit_model.safetensors).
        mode: nf4, nf4-dq, fp4, fp4-dq or int8 (int8-training reads the int8 file).
        precision: dtype to store the tensors that stay unquantized in (embeddings, norms, biases): 32-true,
            16-true or bf16-true; the file is then used only by runs with that --precision. Default: keep them
            as in the source file, usable with any --precision.
        quantize_lm_head: quantize the output layer too (runs must pass the same flag to use the file).
    """
    from litquant.quantization.bnb import BnbMode, prequantized_metadata
    from litquant.quantization.bnb_linear import Linear4bit, Linear8bit
    from litquant.quantization.modes import all_modes

    storable = [m for m in all_modes().values() if isinstance(m, BnbMode) and m.kind != "int8-training"]
    bnb_mode = next((m for m in storable if mode in (m.kind, m.name)), None)  # nf4 or bnb.nf4
    if bnb_mode is None:
        valid = ", ".join(m.kind for m in storable)
        raise UserError(f"unknown --mode {mode!r}; choose one of: {valid}")
    checkpoint = Checkpoint.open(checkpoint_dir)
    source = checkpoint.file()
    keep_dtype = None if precision is None else PRECISIONS[parse_precision(precision, "cpu")]
    # stat the source before reading
    metadata = prequantized_metadata(bnb_mode, quantize_lm_head, keep_dtype, source)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The compute dtype does not change the quantized bits (weights are quantized from the source dtype).
    plugin = resolve("32-true", bnb_mode.name, device, quantize_lm_head=quantize_lm_head)
    plugin.use_prequantized = False
    reset_peak_memory(device)
    t0 = time.perf_counter()
    # One pass over the source: Linears are quantized as they stream in, every other tensor keeps its stored
    # dtype (or --precision's); the model's state_dict is then exactly the file to write.
    model = plugin.convert_module(build_model(checkpoint.config, "meta"))
    load_weights(model, source, device, keep_dtype)
    quantized = [m for m in model.modules() if isinstance(m, (Linear4bit, Linear8bit))]
    tensors = model.state_dict()
    del model
    out = checkpoint.path / bnb_mode.prequantized
    save_safetensors(tensors, out, metadata=metadata)
    elapsed = time.perf_counter() - t0

    print(
        f"Quantized {len(quantized)} Linear layers to {bnb_mode.name} on {device.type}; saved {out} "
        f"({out.stat().st_size / 1e6:.2f} MB, source {source.stat().st_size / 1e6:.2f} MB)",
        file=sys.stderr,
    )
    print(f"Time: {elapsed:.02f} seconds.", file=sys.stderr)
    print(memory_used_line(device), file=sys.stderr)
    return out
