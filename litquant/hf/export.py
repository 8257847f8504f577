"""A litquant checkpoint -> a Hugging Face model directory: `lit_model.safetensors` as a plain model, or a quantized
file (GPTQ as an AutoGPTQ-format model, bnb as a bitsandbytes one: a `QuantizedExport`). One path for all (a plain
file is one without quantized layers): checked from the stored headers, sharded by stored sizes, then each shard
planned (meta tensors) and streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch

from litquant.checkpoint import WEIGHTS_FILE
from litquant.config import Config
from litquant.hf.config import hf_config
from litquant.hf.files import meta_tensor, nbytes, plan_shards, write_hf_dir
from litquant.hf.weights import can_tie, check_lit_state, iter_lit_to_hf, layer_order
from litquant.io import DTYPES, open_safetensors


class QuantizedExport:
    """What a quantized litquant file needs to become an HF quantized model (GPTQ: hf/gptq.py, bitsandbytes:
    hf/bnb.py): the file, which of its layers are quantized, each such layer's HF tensors (and their plan, from
    the stored headers) and config.json's quantization_config. A quantized layer owns all its stored tensors."""

    weights: Path  # the litquant file exported

    def split(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Stored tensor names -> (quantized module names, the other tensor names)."""
        raise NotImplementedError

    def check(self, modules: list[str], slices: Mapping, config: Config) -> None:
        """The stored quantized layers must fit the config (from their headers)."""
        raise NotImplementedError

    def size(self, module: str, slices: Mapping) -> int:
        """Stored bytes of a quantized layer (a shard unit)."""
        raise NotImplementedError

    def plan(self, f, module: str, slices: Mapping, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
        """Meta tensors of a quantized layer's HF tensors."""
        raise NotImplementedError

    def tensors(self, f, module: str, slices: Mapping, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
        """A quantized layer's HF tensors, read from the open file `f`."""
        raise NotImplementedError

    def quantization_config(self, modules: list[str], config: Config, dtype: torch.dtype) -> dict:
        raise NotImplementedError

    def finish(self, output_dir: Path) -> None:
        """Files besides config.json and the weights (GPTQ: quantize_config.json)."""


def export_hf(
    checkpoint_dir: Path,
    output_dir: Path,
    config: Config,
    max_shard_size: int,
    quantized: Optional[QuantizedExport] = None,
) -> None:
    """Write `checkpoint_dir`'s weights to `output_dir` as an HF model: `lit_model.safetensors`, or with `quantized`
    its quantized file (`quantization_config` in config.json)."""
    weights = checkpoint_dir / WEIGHTS_FILE if quantized is None else quantized.weights
    with open_safetensors(weights) as f:
        names = list(f.keys())
        modules, plain = quantized.split(names) if quantized is not None else ([], names)
        slices = {n: f.get_slice(n) for n in names}
        if modules:
            quantized.check(modules, slices, config)
        check_lit_state({n: slices[n].get_shape() for n in plain}, config, str(weights), skip=set(modules))

        tie = "lm_head" not in modules and _file_can_tie(f, slices, config)
        # checked before any writes
        dtype = DTYPES[slices["transformer.wte.weight"].get_dtype()]
        d = hf_config(config, tie, dtype)
        if quantized is not None:
            d["quantization_config"] = quantized.quantization_config(modules, config, dtype)
        if tie:
            plain.remove("lm_head.weight")

        # shards planned from the stored sizes: units are tensors, or whole quantized layers
        units = sorted([*modules, *plain], key=layer_order)
        sizes = {u: nbytes(slices[u]) for u in plain} | {u: quantized.size(u, slices) for u in modules}
        shards = plan_shards([(u, sizes[u]) for u in units], max_shard_size)
        quantized_units = set(modules)

        def tensors(shard: list[str], meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
            """A shard's HF tensors, one at a time; meta=True: the shard's plan (nothing read but what a quantized
            layer's plan needs)."""
            read = (lambda n: meta_tensor(slices[n])) if meta else f.get_tensor
            yield from iter_lit_to_hf(((n, read(n)) for n in shard if n not in quantized_units), config, tie)
            for u in (u for u in shard if u in quantized_units):  # one quantized layer at a time
                make = quantized.plan if meta else quantized.tensors
                yield from make(f, u, slices, config)

        write_hf_dir(checkpoint_dir, output_dir, shards, tensors, d)
    if quantized is not None:
        quantized.finish(output_dir)


def _file_can_tie(f, slices: Mapping, config: Config) -> bool:
    """`can_tie` for the tensors of an open safetensors file: wte and lm_head are read (and compared) only
    when their stored shapes allow tying."""
    wte, lm_head = slices.get("transformer.wte.weight"), slices.get("lm_head.weight")
    if wte is None or lm_head is None or config.lm_head_bias or wte.get_shape() != lm_head.get_shape():
        return False
    return can_tie(f.get_tensor("transformer.wte.weight"), f.get_tensor("lm_head.weight"), config)
