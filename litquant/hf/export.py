"""A litquant checkpoint -> a Hugging Face model directory: `lit_model.safetensors` as a plain model, or a GPTQ file
as an AutoGPTQ-format model. One path for both (a plain file is one without quantized layers): checked from the
stored headers, sharded by stored sizes, then each shard planned (meta tensors) and streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch

from litquant.checkpoint import WEIGHTS_FILE
from litquant.config import Config
from litquant.hf.config import hf_config
from litquant.hf.files import meta_tensor, nbytes, plan_shards, write_hf_dir
from litquant.hf.gptq import (
    GPTQ_ATTRS,
    check_gptq_layers,
    gptq_export_source,
    gptq_layer_tensors,
    gptq_modules,
    gptq_plan_hf,
    iter_gptq_lit_to_hf,
    write_quantize_config,
)
from litquant.hf.weights import can_tie, check_lit_state, iter_lit_to_hf, layer_order
from litquant.io import DTYPES, open_safetensors


def export_hf(
    checkpoint_dir: Path, output_dir: Path, config: Config, max_shard_size: int, bits: Optional[int] = None
) -> None:
    """Write `checkpoint_dir`'s weights to `output_dir` as an HF model: `lit_model.safetensors`, or with `bits` the
    GPTQ file (`quantization_config` in config.json, and a quantize_config.json)."""
    qc = None
    if bits is None:
        weights = checkpoint_dir / WEIGHTS_FILE
    else:
        weights, qc = gptq_export_source(checkpoint_dir, bits)
    with open_safetensors(weights) as f:
        names = list(f.keys())
        modules, plain = gptq_modules(names) if qc is not None else ([], names)
        slices = {n: f.get_slice(n) for n in names}
        if modules:
            check_gptq_layers(modules, slices, config, bits, weights)
        check_lit_state({n: slices[n].get_shape() for n in plain}, config, str(weights), skip=set(modules))

        tie = "lm_head" not in modules and _file_can_tie(f, slices, config)
        # checked before any writes
        d = hf_config(config, tie, DTYPES[slices["transformer.wte.weight"].get_dtype()])
        if qc is not None:
            d["quantization_config"] = qc
        if tie:
            plain.remove("lm_head.weight")

        # shards planned from the stored sizes: units are tensors, or whole quantized layers
        quantized = set(modules)

        def size(unit: str) -> int:
            if unit not in quantized:
                return nbytes(slices[unit])
            return sum(nbytes(slices[f"{unit}.{a}"]) for a in GPTQ_ATTRS if f"{unit}.{a}" in slices)

        units = sorted([*modules, *plain], key=layer_order)
        shards = plan_shards([(u, size(u)) for u in units], max_shard_size)

        def tensors(shard: list[str], meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
            """A shard's HF tensors, one at a time; meta=True: the shard's plan (nothing read). Packing reads
            values, so a quantized layer's plan comes from its stored shapes instead."""
            read = (lambda n: meta_tensor(slices[n])) if meta else f.get_tensor
            yield from iter_lit_to_hf(((n, read(n)) for n in shard if n not in quantized), config, tie)
            for u in (u for u in shard if u in quantized):  # one quantized layer at a time
                if meta:
                    yield from gptq_plan_hf(u, slices, config, bits)
                else:
                    yield from iter_gptq_lit_to_hf(
                        [(u, gptq_layer_tensors(f, slices, u, bits))], config, bits
                    )

        write_hf_dir(checkpoint_dir, output_dir, shards, tensors, d)
    if qc is not None:
        write_quantize_config(output_dir, qc)


def _file_can_tie(f, slices: Mapping, config: Config) -> bool:
    """`can_tie` for the tensors of an open safetensors file: wte and lm_head are read (and compared) only
    when their stored shapes allow tying."""
    wte, lm_head = slices.get("transformer.wte.weight"), slices.get("lm_head.weight")
    if wte is None or lm_head is None or config.lm_head_bias or wte.get_shape() != lm_head.get_shape():
        return False
    return can_tie(f.get_tensor("transformer.wte.weight"), f.get_tensor("lm_head.weight"), config)
