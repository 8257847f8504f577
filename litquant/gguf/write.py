"""A litquant checkpoint -> a .gguf file llama.cpp loads: the Llama metadata, the tokenizer (`vocab`), and each tensor
read from `lit_model.safetensors`, given its GGUF name (q/k rows in llama.cpp's order), quantized with
`gguf.quants.quantize` and written before the next is read. Norms stay F32; a matrix whose rows do not fill whole
blocks of the chosen type falls back to F16, as llama.cpp's converter does. With 4/5-bit types the output head (the
embedding, when tied) stays at Q8_0: llama.cpp's own Q4_0 keeps it at Q6_K, and 4 bits there cost 9% perplexity on
SmolLM2-135M."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from litquant.checkpoint import WEIGHTS_FILE, Checkpoint
from litquant.errors import UserError
from litquant.gguf import arch as A
from litquant.gguf.read import gguf_module
from litquant.gguf.vocab import UNUSED, tokenizer_metadata
from litquant.io import atomic_path, open_safetensors

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
LOW_BITS = (
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
)  # their head (tied: the embedding) is written as q8_0, as llama.cpp keeps it


def _hf_tensors(f, config, tie: bool):
    """(HF name, litquant name, rows of the litquant tensor or None) for every tensor the export writes."""
    from litquant.hf.weights import hf_pieces, weight_map

    to_hf = {lit: hf for hf, lit in weight_map(config).items()}
    out = []
    for name in f.keys():
        if name == "lm_head.weight" and tie:
            continue
        pieces = hf_pieces(name, config, to_hf)
        if pieces is None:
            raise UserError(f"tensor {name!r} has no GGUF llama equivalent")
        out += [(hf, name, rows) for hf, rows in pieces]
    return out


def export_gguf(checkpoint_dir: Path, out_path: Path, gguf_type: str = "f16") -> Path:
    """Write the checkpoint's `lit_model.safetensors` as `out_path`, matrices in `gguf_type`."""
    gguf = gguf_module()
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"unknown --gguf_type {gguf_type!r} (choose one of {', '.join(GGUF_TYPES)})")
    checkpoint = Checkpoint.open(checkpoint_dir)
    config = checkpoint.config
    weights = checkpoint.file(WEIGHTS_FILE)
    meta = A.gguf_metadata(config)
    tok = tokenizer_metadata(checkpoint.path)
    pad_vocab(tok, config.padded_vocab_size)
    qtype = gguf.GGMLQuantizationType[gguf_type.upper()]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    heads = (config.n_head, config.n_query_groups)

    with open_safetensors(weights) as f:
        wte, head = f.get_tensor("transformer.wte.weight"), f.get_tensor("lm_head.weight")
        tie = wte.shape == head.shape and torch.equal(wte, head)
        del wte, head
        tensors = _hf_tensors(f, config, tie)
        with atomic_path(out_path) as tmp:
            w = gguf.GGUFWriter(tmp, "llama")
            w.add_name(config.name)
            w.add_file_type(_file_type(gguf, qtype))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for key, value in meta.items():
                _add(w, f"llama.{key}", value)
            for key, value in tok.items():
                _add(w, key, value)

            plan = []
            for hf, lit, rows in tensors:
                shape = list(f.get_slice(lit).get_shape())
                if rows is not None:
                    shape[0] = rows(torch.empty(shape, device="meta")).shape[0]
                t = qtype if len(shape) > 1 and shape[-1] % block == 0 else gguf.GGMLQuantizationType.F32
                if (
                    gguf_type in LOW_BITS
                    and t == qtype
                    and A.gguf_name(hf) in ("token_embd.weight", "output.weight")
                ):
                    t = (
                        gguf.GGMLQuantizationType.Q8_0
                    )  # the head (tied: the embedding) in 8 bits, as llama.cpp
                if len(shape) > 1 and t == gguf.GGMLQuantizationType.F32 and qtype != t:
                    t = gguf.GGMLQuantizationType.F16
                plan.append((hf, lit, rows, t))
                block_size, type_size = gguf.GGML_QUANT_SIZES[t]
                nbytes = int(np.prod(shape)) // block_size * type_size
                w.add_tensor_info(A.gguf_name(hf), shape, np.dtype(np.float32), nbytes, raw_dtype=t)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for hf, lit, rows, t in tqdm(plan, desc="Exporting GGUF", unit="tensor"):
                x = f.get_tensor(lit)
                x = (x if rows is None else rows(x)).float()
                if (n := A.rope_rows(hf, heads)) is not None:
                    x = A.permute(x, n)
                data = gguf.quants.quantize(np.ascontiguousarray(x.numpy()), t)
                w.write_tensor_data(data)
                del x, data
            w.close()
    print(f"Wrote {out_path} ({gguf_type}, {len(plan)} tensors)", flush=True)
    return out_path


def pad_vocab(tok: dict, rows: int) -> None:
    """llama.cpp wants one token per embedding row: the padding rows get unused `[PAD<i>]` tokens."""
    tokens = tok["tokenizer.ggml.tokens"]
    extra = range(len(tokens), rows)
    tokens += [f"[PAD{i}]" for i in extra]
    tok["tokenizer.ggml.token_type"] += [UNUSED] * len(extra)
    if "tokenizer.ggml.scores" in tok:
        tok["tokenizer.ggml.scores"] += [-1e9] * len(extra)


def _file_type(gguf, qtype) -> int:
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}
    return int(gguf.LlamaFileType[names.get(qtype.name, "MOSTLY_" + qtype.name)])


def _add(w, key: str, value) -> None:
    """One metadata value, typed as llama.cpp reads it."""
    gguf = gguf_module()
    T = gguf.GGUFValueType
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], str):
        w.add_array(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], float):
        w.add_key_value(key, value, T.ARRAY, sub_type=T.FLOAT32)
    elif isinstance(value, list):
        w.add_key_value(key, value, T.ARRAY, sub_type=T.INT32)
    else:
        raise TypeError(f"{key}: {type(value)}")
