"""`litquant convert_hf_checkpoint` and `litquant convert_lit_checkpoint`: Hugging Face <-> litquant checkpoints
(the work is in litquant/hf/)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from litquant.checkpoint import WEIGHTS_FILE, Checkpoint
from litquant.config import CONFIG_FILE
from litquant.errors import UserError, read_json
from litquant.gguf.read import find_gguf, import_gguf
from litquant.hf.bnb import BnbExport, import_bnb
from litquant.hf.config import hf_import_config, hf_model_type, parse_dtype
from litquant.hf.export import QuantizedExport, export_hf
from litquant.hf.files import HF_MAX_SHARD_SIZE, hf_weight_files, iter_hf_files
from litquant.hf.gptq import GPTQExport, import_gptq
from litquant.hf.weights import iter_hf_to_lit
from litquant.io import write_safetensors
from litquant.quantization.gptq_plugin import gptq_file


def convert_hf_checkpoint(
    checkpoint_dir: Path,
    dtype: Optional[str] = None,
    model_name: Optional[str] = None,
    gguf: Optional[Path] = None,
) -> None:
    """Convert a Hugging Face model directory (or a GGUF file) to a litquant checkpoint, in place.

    Reads `config.json` (or the named config) and the `*.safetensors` / `pytorch_model*.bin` shards;
    writes `model_config.yaml` and `lit_model.safetensors` beside them. Tokenizer files stay where they are.
    A directory with one `.gguf` file and no config.json, or `--gguf FILE`, is imported from GGUF instead: the
    tensors dequantized, the tokenizer and chat template written as tokenizer.json and tokenizer_config.json.

    Args:
        checkpoint_dir: the HF download (config.json, weights, tokenizer files); with --gguf, where to write.
        dtype: store the weights in this dtype (float32, bfloat16, float16); default: as in the files
            (for GGUF: float32 when any matrix is quantized, else as stored).
        model_name: use this litquant named config instead of deriving one from config.json.
        gguf: a .gguf file to import (llama.cpp's format) into checkpoint_dir.
    """
    checkpoint_dir = Path(checkpoint_dir)
    torch_dtype = parse_dtype(dtype)
    if gguf is None and checkpoint_dir.is_dir() and not (checkpoint_dir / "config.json").is_file():
        gguf = find_gguf(checkpoint_dir)
    if gguf is not None:
        if model_name is not None:
            raise UserError(
                "--model_name does not apply to a GGUF import (the file's metadata is the config)"
            )
        import_gguf(Path(gguf), checkpoint_dir, torch_dtype)
        return
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
    hf_path = checkpoint_dir / "config.json"
    if not hf_path.is_file() and model_name is None:
        raise UserError(f"{checkpoint_dir} has no config.json (pass --model_name to use a known config)")
    hf = read_json(hf_path) if hf_path.is_file() else {}

    quant = hf.get("quantization_config") or {}
    if quant:
        method = quant.get("quant_method")
        if method == "gptq":
            return import_gptq(checkpoint_dir, hf, dtype, model_name)
        if method == "bitsandbytes":
            return import_bnb(checkpoint_dir, hf, dtype, model_name)
        raise UserError(f"{hf_path}: {method!r}-quantized Hugging Face checkpoints are not supported")

    config = hf_import_config(hf, checkpoint_dir, model_name)
    tie = hf.get("tie_word_embeddings") if "tie_word_embeddings" in hf else None
    files = hf_weight_files(checkpoint_dir)
    # one pass over the headers plans the output file (meta tensors through the same mapping), the second
    # streams: each tensor is read, mapped and written before the next is read
    plan = iter_hf_to_lit(iter_hf_files(files, meta=True), config, torch_dtype, tie)
    n = write_safetensors(
        checkpoint_dir / WEIGHTS_FILE,
        iter_hf_to_lit(iter_hf_files(files), config, torch_dtype, tie),
        plan,
        metadata={"format": "pt", "litquant": "1"},
    )
    config.save(checkpoint_dir)
    print(f"Wrote {checkpoint_dir / WEIGHTS_FILE} ({n / 1e6:.1f}M parameters) and {CONFIG_FILE}", flush=True)


def convert_lit_checkpoint(
    checkpoint_dir: Path,
    output_dir: Path,
    max_shard_size: int = HF_MAX_SHARD_SIZE,
    quantize: Optional[str] = None,
    to: Literal["hf", "gguf"] = "hf",
    gguf_type: str = "f16",
) -> None:
    """Export a litquant checkpoint as a Hugging Face model directory, or with `--to gguf` as a GGUF file.

    Writes `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards plus an
    index when larger than `max_shard_size` bytes) and copies the tokenizer files and generation_config.json.

    Args:
        checkpoint_dir: the litquant checkpoint (model_config.yaml + lit_model.safetensors).
        output_dir: where the HF directory is written (created if needed; must differ from checkpoint_dir).
        max_shard_size: largest weight file, in bytes.
        quantize: export a quantized file instead: GPTQ (gptq.int2/3/4/8: lit_model_gptq.<bits>bit.safetensors)
            as an AutoGPTQ-format model (qweight/qzeros/scales/g_idx with HF names, `quantization_config` in
            config.json and a quantize_config.json), or bitsandbytes (bnb.nf4, nf4-dq, fp4, fp4-dq, int8:
            lit_model_bnb.<mode>.safetensors) as transformers saves a bitsandbytes model (weight + absmax/quant_map/
            quant_state, or int8 weight + SCB; `quantization_config` with quant_method bitsandbytes).
        to: "hf" (a Hugging Face directory) or "gguf" (one .gguf file for llama.cpp and ollama: output_dir/
            <name>-<gguf_type>.gguf, or output_dir itself when it ends in .gguf).
        gguf_type: with --to gguf, the type of the matrices: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1.
    """
    if to == "gguf":
        from litquant.gguf.write import export_gguf

        if quantize is not None:
            raise UserError("--quantize does not apply to --to gguf (choose the GGUF type with --gguf_type)")
        out = Path(output_dir)
        if out.suffix != ".gguf":
            out = out / f"{Checkpoint.open(checkpoint_dir).config.name}-{gguf_type}.gguf"
        export_gguf(Path(checkpoint_dir), out, gguf_type)
        return
    if to != "hf":
        raise UserError(f"unknown --to {to!r} (choose hf or gguf)")
    checkpoint, output_dir = Checkpoint.open(checkpoint_dir), Path(output_dir)
    checkpoint_dir, config = checkpoint.path, checkpoint.config
    quantized = _quantized_export(checkpoint, quantize)
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise UserError("output_dir must differ from checkpoint_dir (the export would overwrite its source)")
    if max_shard_size <= 0:
        raise UserError(f"max_shard_size must be positive, got {max_shard_size}")
    hf_model_type(config)  # fail early if the config has no HF family
    export_hf(checkpoint_dir, output_dir, config, max_shard_size, quantized)


def _quantized_export(checkpoint: Checkpoint, quantize: Optional[str]) -> Optional[QuantizedExport]:
    """What an export with `--quantize` reads: a GPTQ or bnb file (None: lit_model.safetensors, which must exist)."""
    from litquant.quantization.bnb import BnbMode
    from litquant.quantization.gptq_plugin import GPTQMode
    from litquant.quantization.modes import all_modes, get_mode

    if quantize is None:
        checkpoint.file(WEIGHTS_FILE)
        return None
    mode = get_mode(quantize)
    if isinstance(mode, GPTQMode):
        hint = f"make it with `litquant quantize gptq --bits {mode.bits}`"
        checkpoint.file(gptq_file(mode.bits), hint=hint)
        return GPTQExport(checkpoint.path, mode.bits)
    if isinstance(mode, BnbMode):
        hint = f"make it with `litquant quantize bnb --mode {mode.storage}`"
        checkpoint.file(mode.prequantized, hint=hint)
        return BnbExport(checkpoint.path, mode)
    exportable = ", ".join(n for n, m in all_modes().items() if isinstance(m, (GPTQMode, BnbMode)))
    raise UserError(f"--quantize {quantize!r} cannot be exported: choose one of {exportable}")
