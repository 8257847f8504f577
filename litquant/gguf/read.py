"""A .gguf file -> a litquant checkpoint: the metadata becomes an HF config dict and a Config, each tensor is read from
the file and dequantized (`gguf.quants.dequantize`) a slab of rows at a time, given its HF name (q/k rows back in HF
order) and streamed through the same mapper and writer as an HF import. Peak memory: one tensor plus a slab."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from litquant.config import CONFIG_FILE, WEIGHTS_FILE, Config
from litquant.errors import UserError
from litquant.gguf import arch as A
from litquant.gguf.vocab import write_tokenizer
from litquant.io import write_safetensors

SLAB_BYTES = 2 << 20  # quantized bytes read and dequantized at once


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise UserError(
            "reading or writing GGUF needs the `gguf` package: pip install 'litquant[gguf]'"
        ) from None
    return gguf


class GGUFFile:
    """An open .gguf: its metadata as plain values and its tensors (name, type, torch-order shape, offset)."""

    def __init__(self, path: Path) -> None:
        gguf = gguf_module()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"GGUF file {str(self.path)!r} does not exist")
        try:
            r = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises ValueError/IndexError/KeyError on damaged files
            raise UserError(f"{self.path} is not a readable GGUF file (truncated or corrupt? {e})") from None
        self.meta: dict[str, Any] = {}
        for key, field in r.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.meta[key] = field.contents()
            except Exception:
                raise UserError(
                    f"{self.path}: metadata {key!r} cannot be read (truncated or corrupt?)"
                ) from None
        size = self.path.stat().st_size
        self.tensors = {}
        for t in r.tensors:
            if t.data_offset + t.n_bytes > size:
                raise UserError(f"{self.path} is truncated: tensor {t.name} ends past the end of the file")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = (t.tensor_type, shape, int(t.data_offset), int(t.n_bytes))
        del r  # drops the memory map: data is read with plain file reads, so nothing stays resident

    def check_types(self) -> None:
        gguf = gguf_module()
        from gguf.quants import _type_traits

        readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *_type_traits}
        for name, (qtype, *_) in self.tensors.items():
            if qtype not in readable:
                raise UserError(
                    f"{self.path}: tensor {name} has type {qtype.name}, which gguf cannot dequantize"
                )

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor, dequantized into `dtype`, a slab of rows at a time."""
        gguf = gguf_module()
        qtype, shape, offset, nbytes = self.tensors[name]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = nbytes // rows
        out = torch.empty(rows, shape[-1], dtype=dtype)
        step = max(1, SLAB_BYTES // max(row_bytes, 1))
        with open(self.path, "rb") as f:
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                f.seek(offset + r0 * row_bytes)
                raw = np.fromfile(f, dtype=np.uint8, count=n * row_bytes)
                if raw.size != n * row_bytes:
                    raise UserError(f"{self.path} is truncated inside tensor {name}")
                x = gguf.quants.dequantize(raw.reshape(n, row_bytes), qtype)
                out[r0 : r0 + n] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(n, -1))
        return out.reshape(shape)


def find_gguf(checkpoint_dir: Path) -> Optional[Path]:
    """The one .gguf file of a directory (None if it has none; an error if it has several)."""
    files = sorted(p for p in Path(checkpoint_dir).glob("*.gguf") if p.is_file())
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise UserError(f"{checkpoint_dir} holds several .gguf files ({names}): choose one with --gguf")
    return files[0] if files else None


def _default_dtype(g: GGUFFile) -> torch.dtype:
    """fp16/bf16 when every matrix is stored so; fp32 otherwise (dequantized values are exact in fp32)."""
    gguf = gguf_module()
    kinds = {q for q, shape, *_ in g.tensors.values() if len(shape) > 1}
    if kinds == {gguf.GGMLQuantizationType.F16}:
        return torch.float16
    if kinds == {gguf.GGMLQuantizationType.BF16}:
        return torch.bfloat16
    return torch.float32


def import_gguf(path: Path, out_dir: Path, dtype: Optional[torch.dtype] = None) -> Config:
    """Write `out_dir`'s litquant checkpoint (weights, model_config.yaml, tokenizer files) from the .gguf `path`."""
    from litquant.hf.weights import iter_hf_to_lit

    g = GGUFFile(path)
    A.check_architecture(g.meta.get("general.architecture"), str(path))
    g.check_types()
    if "rope_freqs.weight" in g.tensors:
        raise UserError(
            f"{path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 scaling) are not supported yet"
        )
    names = {}
    for name in g.tensors:
        hf = A.hf_name(name)
        if hf is None:
            raise UserError(f"{path}: unexpected tensor {name!r} for a llama model")
        names[name] = hf
    if "token_embd.weight" not in g.tensors:
        raise UserError(f"{path}: the file has no token_embd.weight")
    vocab = g.tensors["token_embd.weight"][1][0]
    tied = "output.weight" not in g.tensors
    hf = A.hf_config_from_gguf(g.meta, vocab, tied, str(path))
    config = Config.from_hf_config(hf)
    config.name = str(g.meta.get("general.name") or path.stem).replace(" ", "-")
    heads = (config.n_head, config.n_query_groups)
    dtype = dtype or _default_dtype(g)

    def items(meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
        for name, (_, shape, *_) in tqdm(g.tensors.items(), desc="Converting", unit="tensor", disable=meta):
            if meta:
                yield names[name], torch.empty(shape, dtype=dtype, device="meta")
                continue
            t = g.read(name, dtype)
            if (n := A.rope_rows(names[name], heads)) is not None:
                t = A.unpermute(t, n)
            yield names[name], t
        if tied:  # read again rather than kept: one embedding-sized tensor in memory, not two
            yield (
                "lm_head.weight",
                torch.empty(g.tensors["token_embd.weight"][1], dtype=dtype, device="meta")
                if meta
                else g.read("token_embd.weight", dtype),
            )

    out_dir.mkdir(parents=True, exist_ok=True)
    plan = iter_hf_to_lit(items(True), config, dtype, False)
    n = write_safetensors(
        out_dir / WEIGHTS_FILE,
        iter_hf_to_lit(items(False), config, dtype, False),
        plan,
        metadata={"format": "pt", "litquant": "1", "source": path.name},
    )
    write_tokenizer(g.meta, out_dir, str(path))
    config.save(out_dir)
    print(
        f"Wrote {out_dir / WEIGHTS_FILE} ({n / 1e6:.1f}M parameters), {CONFIG_FILE} and the tokenizer files "
        f"from {path.name}",
        flush=True,
    )
    return config
