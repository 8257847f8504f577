"""Pre-quantize with bitsandbytes: `python quantize/bnb.py --mode nf4` == `litquant quantize bnb --mode nf4`.

Writes `lit_model_bnb.<mode>.safetensors` beside `lit_model.safetensors`: the quantized Linears' storage (packed
weight + absmax / nested constants, exactly what quantize-on-load produces) and every other tensor as it is.
A later `--quantize bnb.<mode>` run picks the file up, skips quantization and reads ~4x fewer bytes. The file
records the mode, its parameters and the source file's size and mtime; a run ignores it once the source changed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch

if __package__ in (None, ""):  # `python quantize/bnb.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.checkpoint import (
    DEFAULT_CHECKPOINT_DIR,
    WEIGHTS_FILE,
    build_model,
    check_checkpoint_dir,
    load_weights,
    save_safetensors,
)
from litquant.config import Config
from litquant.errors import UserError, run_job
from litquant.precision import PRECISIONS, parse_precision, resolve
from litquant.utils import memory_used_line, reset_peak_memory


def main(
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
    from litquant.quantization.bnb import (
        MODES,
        Linear4bit,
        Linear8bit,
        prequantized_file,
        prequantized_metadata,
        storage_mode,
    )

    mode = mode[len("bnb."):] if mode.startswith("bnb.") else mode
    if mode not in MODES:
        valid = ", ".join(m for m in MODES if m != "int8-training")
        raise UserError(f"unknown --mode {mode!r}; choose one of: {valid}")
    mode = storage_mode(mode)
    checkpoint_dir = Path(checkpoint_dir)
    source = check_checkpoint_dir(checkpoint_dir, WEIGHTS_FILE)
    keep_dtype = None if precision is None else PRECISIONS[parse_precision(precision, "cpu")]
    metadata = prequantized_metadata(mode, quantize_lm_head, keep_dtype, source)  # stat the source before reading

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The compute dtype does not change the quantized bits (weights are quantized from the source dtype).
    plugin = resolve("32-true", f"bnb.{mode}", device, quantize_lm_head=quantize_lm_head)
    plugin.use_prequantized = False
    reset_peak_memory(device)
    t0 = time.perf_counter()
    # One pass over the source: Linears are quantized as they stream in, every other tensor keeps its stored
    # dtype (or --precision's); the model's state_dict is then exactly the file to write.
    model = plugin.convert_module(build_model(Config.from_checkpoint(checkpoint_dir), "meta"))
    load_weights(model, source, device, keep_dtype)
    quantized = [m for m in model.modules() if isinstance(m, (Linear4bit, Linear8bit))]
    tensors = model.state_dict()
    del model
    out = checkpoint_dir / prequantized_file(mode)
    save_safetensors(tensors, out, metadata=metadata)
    elapsed = time.perf_counter() - t0

    print(
        f"Quantized {len(quantized)} Linear layers to bnb.{mode} on {device.type}; saved {out} "
        f"({out.stat().st_size / 1e6:.2f} MB, source {source.stat().st_size / 1e6:.2f} MB)",
        file=sys.stderr,
    )
    print(f"Time: {elapsed:.02f} seconds.", file=sys.stderr)
    print(memory_used_line(device), file=sys.stderr)
    return out


if __name__ == "__main__":
    run_job(main)
