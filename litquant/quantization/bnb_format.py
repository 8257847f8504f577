"""bitsandbytes' 4-bit format as facts litquant owns: the NF4/FP4 code tables and the blockwise quantizer, bit for bit
what bitsandbytes computes on CPU (tests/test_bnb_format.py checks both against the installed bitsandbytes).

Owning them means a CPU run never imports bitsandbytes to load or quantize nf4/fp4 (importing it costs seconds:
its ops module compiles kernels at import), while the files stay bitsandbytes' own layout.
"""

from __future__ import annotations

import functools

import torch

# QLoRA's NormalFloat levels (fp32), and bnb's FP4 (e2m1 with its own bias) in code order, each / its max
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP4 = (
    0.0,
    1 / 192,
    2 / 3,
    1.0,
    1 / 3,
    0.5,
    1 / 6,
    0.25,
    0.0,
    -1 / 192,
    -2 / 3,
    -1.0,
    -1 / 3,
    -0.5,
    -1 / 6,
    -0.25,
)
TABLES = {"nf4": NF4, "fp4": FP4}


@functools.cache
def code(quant_type: str, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The 16 levels, fp32 (as bitsandbytes' get_4bit_type)."""
    return torch.tensor(TABLES[quant_type], dtype=torch.float32, device=device)


@functools.cache
def _bounds(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = code(quant_type, device)
    order = torch.argsort(c, stable=True)
    return (c[order[:-1]] + c[order[1:]]) / 2, order


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat weight -> (packed uint8 (ceil(n/2), 1), fp32 absmax per block): each value scaled by its block's absmax
    and put on the nearest level (ties to the lower one), two codes per byte, the first in the high nibble."""
    bounds, order = _bounds(quant_type, w.device)
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if n % blocksize:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":  # nf4's levels are sorted; fp4's codes are not
        q = order[q].to(torch.int32)
    q8 = q.to(torch.uint8)
    return ((q8[::2] << 4) | q8[1::2]).unsqueeze(1), absmax
