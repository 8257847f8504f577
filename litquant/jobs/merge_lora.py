"""`litquant merge_lora`: a LoRA adapter merged into its (dequantized) base, saved as a full-precision checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from litquant.checkpoint import Checkpoint, copy_side_files, load_model, save_checkpoint
from litquant.config import WEIGHTS_FILE
from litquant.errors import UserError
from litquant.lora import (
    _file_float_dtype,
    _merge_load_precision,
    _quantized_file_float_dtype,
    base_options,
    load_lora,
    merge_lora,
    read_lora_metadata,
    resolve_lora_path,
)
from litquant.precision import PRECISIONS, parse_precision, resolve


def main(
    lora_path: Path,
    checkpoint_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    quantize: Optional[str] = "auto",
    precision: Optional[str] = None,
) -> Path:
    """Merge a LoRA adapter into its base model and save a full-precision litquant checkpoint.

    The base is loaded as it was during training (e.g. bnb.nf4 for QLoRA) and dequantized, so the merged weights
    are exactly what the adapted model computed with; quantize the result again (`litquant quantize gptq`) to deploy.

    Args:
        lora_path: the adapter file, or the finetune out_dir holding lit_model.lora.safetensors.
        checkpoint_dir: the base checkpoint (default: the one the adapter was trained on).
        out_dir: where to write the merged checkpoint (default: <adapter dir>/merged).
        quantize: the base's quantization to merge into: "auto" = the one used in training (recorded in the adapter
            file), "none" = merge into the full-precision weights, or a mode such as bnb.nf4.
        precision: dtype to save the merged weights in: 32-true, 16-true or bf16-true (default: the dtype of the
            base checkpoint's lit_model.safetensors, or of the full-precision tensors of its quantized file).
    """
    lora_path = resolve_lora_path(lora_path)
    _, meta = read_lora_metadata(lora_path)
    if checkpoint_dir is None:
        if not meta.get("base_checkpoint_dir"):
            raise UserError(f"{lora_path} does not record its base model: pass --checkpoint_dir")
        checkpoint_dir = Path(meta["base_checkpoint_dir"])
    checkpoint = Checkpoint.open(checkpoint_dir)
    checkpoint_dir = checkpoint.path
    if quantize == "auto":
        quantize = meta.get("base_quantize") or None
    out_dir = Path(out_dir) if out_dir is not None else lora_path.parent / "merged"
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise UserError(
            "--out_dir must differ from the base --checkpoint_dir (it would overwrite the base weights)"
        )

    if precision is not None:
        save_dtype = PRECISIONS[parse_precision(precision, "cpu")]
    elif (checkpoint_dir / WEIGHTS_FILE).is_file():
        save_dtype = _file_float_dtype(checkpoint_dir / WEIGHTS_FILE)
    else:  # an imported quantized model: the dtype its file keeps the full-precision tensors in
        save_dtype = _quantized_file_float_dtype(checkpoint_dir, quantize)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Dequantizing does not depend on the compute dtype (bnb quantizes the weights as stored, GPTQ scales stay
    # fp16, `merge_lora` dequantizes and adds in fp32), so the base loads in the save dtype unless that would round
    # a tensor before the merge; the merged Linears are then stored in it one by one: no full fp32 copy, no second one.
    load_precision = _merge_load_precision(checkpoint_dir, quantize, save_dtype, device)
    # GPTQ: dequantizing needs qweight
    plugin = resolve(load_precision, quantize, device, **base_options(quantize))
    model = load_model(checkpoint, plugin, device)
    load_lora(model, lora_path, dtype=torch.float32)
    merge_lora(model, save_dtype)
    # what merging did not replace (embeddings, norms, plain Linears), in place, tensor by tensor
    model.to(save_dtype)
    save_checkpoint(model.state_dict(), model.config, out_dir)
    copy_side_files(checkpoint_dir, out_dir)
    print(
        f"Merged {lora_path} into {checkpoint_dir} ({quantize or 'full precision'} base, dequantized); "
        f"saved {out_dir / WEIGHTS_FILE} ({str(save_dtype).replace('torch.', '')})",
        file=sys.stderr,
    )
    return out_dir
