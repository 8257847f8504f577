"""`litquant estimate --model_name Llama-2-7b-hf [--context_length 4096] [--finetune qlora]`: the memory a model
needs in each mode and the GPUs it fits, before anything is loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, Optional

from litquant.checkpoint import Checkpoint
from litquant.config import Config
from litquant.errors import UserError, read_json
from litquant.estimate import DEFAULT_MODES, estimate, format_table, quant_mode
from litquant.io import atomic_write_text
from litquant.quantization.gptq_plugin import GPTQMode
from litquant.quantization.modes import all_modes


def _gptq_settings(checkpoint_dir: Path) -> tuple[Optional[int], Optional[int]]:
    from litquant.quantization.gptq_plugin import QUANTIZE_CONFIG_FILE, check_quantize_config

    cfg = checkpoint_dir / QUANTIZE_CONFIG_FILE
    if not cfg.is_file():
        return None, None
    qc = read_json(cfg)
    check_quantize_config(qc, str(cfg))
    return qc["bits"], qc["group_size"]


def main(
    model_name: Optional[str] = None,
    *,
    checkpoint_dir: Optional[Path] = None,
    precision: str = "bf16-true",
    modes: Optional[str] = None,
    context_length: Optional[int] = None,
    batch_size: int = 1,
    quantize_lm_head: bool = False,
    gptq_group_size: Optional[int] = None,
    finetune: Optional[Literal["lora", "qlora"]] = None,
    lora_r: int = 8,
    lora_targets: str = "all",
    out_file: Optional[Path] = None,
) -> dict:
    """Estimate the memory a model needs at each precision / quantization mode, and which GPUs it fits.

    Args:
        model_name: a named config (e.g. Llama-2-7b-hf, meta-llama/Llama-2-7b-hf, Mistral-7B-v0.1).
        checkpoint_dir: or a checkpoint directory (its model_config.yaml; GPTQ settings from quantize_config.json).
        precision: dtype of everything kept in full precision (embeddings, norms, lm_head, KV cache) in quantized
            modes: 32-true, 16-true or bf16-true.
        modes: comma list of modes (default: 32-true,16-true,bf16-true,bnb.int8,bnb.nf4,bnb.nf4-dq,bnb.fp4,
            bnb.fp4-dq,gptq.int4; gptq.int2/int3/int8 for other widths; with --checkpoint_dir, the GPTQ width of
            its quantize_config.json).
        context_length: tokens in the KV cache (default: the model's block_size).
        batch_size: sequences at once.
        quantize_lm_head: the output layer quantized too.
        gptq_group_size: GPTQ group size (default 128, or the checkpoint's).
        finetune: lora (full-precision base) or qlora (4-bit base): adds LoRA params, grads, AdamW state and
            activations for --batch_size sequences of --context_length tokens.
        lora_r: LoRA rank.
        lora_targets: "all" (every Linear in the blocks) or a comma list such as "qkv,proj".
        out_file: also write the result as JSON here.
    """
    if (model_name is None) == (checkpoint_dir is None):
        raise UserError("give exactly one of --model_name or --checkpoint_dir")
    file_bits = file_group = None
    if checkpoint_dir is not None:
        checkpoint = Checkpoint.open(checkpoint_dir)
        checkpoint_dir, config = checkpoint.path, checkpoint.config
        file_bits, file_group = _gptq_settings(checkpoint_dir)
    else:
        config = Config.from_name(model_name)
    mode_list = [m.strip() for m in modes.split(",") if m.strip()] if modes else list(DEFAULT_MODES)
    if file_bits and not modes:
        file_mode = next(
            m.name for m in all_modes().values() if isinstance(m, GPTQMode) and m.bits == file_bits
        )
        mode_list = [file_mode if m == "gptq.int4" else m for m in mode_list]
    for m in mode_list:
        quant_mode(m)  # unknown names fail before any work
    result = estimate(
        config,
        mode_list,
        precision,
        context_length,
        batch_size,
        quantize_lm_head,
        next(g for g in (gptq_group_size, file_group, 128) if g is not None),
        finetune,
        lora_r,
        lora_targets,
    )
    if checkpoint_dir is not None:
        result["files_on_disk"] = {
            p.name: p.stat().st_size for p in sorted(checkpoint_dir.glob("lit_model*.safetensors"))
        }
    print(format_table(result))
    if out_file is not None:
        atomic_write_text(out_file, json.dumps(result, indent=2))
        print(f"Wrote {out_file}", file=sys.stderr)
    return result
