"""The AutoGPTQ on-disk layout of a GPTQ-quantized Linear ("gptq" v1 checkpoint format).

`pack(intweight, zeros, scales, g_idx, bits)` gives {qweight, qzeros, scales, g_idx}; `unpack` inverts it and
`dequantize` gives W. Shapes, bit packing and the zero - 1 convention:
docs/ARCHITECTURE.md, "GPTQ (algorithm, file format, kernels)".
"""

from __future__ import annotations

import math

import torch

from litquant.errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)


def values_per_chunk(bits: int) -> int:
    """How many values fill a whole number of int32 words: 32 // gcd(bits, 32) (16, 32, 8, 4 for 2, 3, 4, 8 bits)."""
    _check_bits(bits)
    return 32 // math.gcd(bits, 32)


def num_groups(in_features: int, group_size: int) -> int:
    """`group_size=-1` means one group over all input channels."""
    if group_size == -1:
        return 1
    if group_size <= 0:
        raise UserError(f"group_size must be a positive integer or -1, got {group_size}")
    return math.ceil(in_features / group_size)


def packed_shapes(
    in_features: int, out_features: int, bits: int, group_size: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of the four tensors of one quantized Linear; raises UserError if the layer cannot be packed."""
    check_packable(in_features, out_features, bits)
    groups = num_groups(in_features, group_size)
    return {
        "qweight": (in_features * bits // 32, out_features),
        "qzeros": (groups, out_features * bits // 32),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
    }


def check_packable(in_features: int, out_features: int, bits: int) -> None:
    per = values_per_chunk(bits)
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        if n <= 0 or n % per:
            raise UserError(
                f"cannot pack a {bits}-bit GPTQ layer with {name}={n}: it must be a positive multiple of {per}"
                f" ({per} {bits}-bit values fill {per * bits // 32} int32 word{'s' if per * bits > 32 else ''})"
            )


def default_g_idx(
    in_features: int, group_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """g_idx of a layer quantized without act-order: channel i belongs to group i // group_size."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    return torch.arange(in_features, dtype=torch.int32, device=device) // group_size


def pack(
    intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """intweight [out, in] in [0, 2**bits), zeros [groups, out] in [1, 2**bits], scales [groups, out], g_idx [in]
    -> {"qweight", "qzeros", "scales", "g_idx"} in the AutoGPTQ layout."""
    _check_bits(bits)
    if intweight.dim() != 2:
        raise UserError(f"intweight must be 2-D [out, in], got shape {tuple(intweight.shape)}")
    out_features, in_features = intweight.shape
    check_packable(in_features, out_features, bits)
    groups = zeros.shape[0] if zeros.dim() == 2 else -1
    if zeros.dim() != 2 or zeros.shape[1] != out_features:
        raise UserError(f"zeros must be [groups, {out_features}], got {tuple(zeros.shape)}")
    if tuple(scales.shape) != (groups, out_features):
        raise UserError(f"scales must be [{groups}, {out_features}] like zeros, got {tuple(scales.shape)}")
    if tuple(g_idx.shape) != (in_features,):
        raise UserError(f"g_idx must be [{in_features}], got {tuple(g_idx.shape)}")
    maxq = 2**bits - 1
    if intweight.numel() and (int(intweight.min()) < 0 or int(intweight.max()) > maxq):
        raise ValueError(f"intweight values must lie in [0, {maxq}] for {bits} bits")
    if zeros.numel() and (int(zeros.min()) < 1 or int(zeros.max()) > maxq + 1):
        # v1 stores zero - 1 in `bits` bits: 0 would wrap to 2**bits and silently change the weights
        raise ValueError(f"zero points must lie in [1, {maxq + 1}] to be stored as zero-1 in {bits} bits")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx values must lie in [0, {groups})")
    qweight = _pack_rows(intweight.t().to(torch.int32), bits)  # [in*bits/32, out]
    qzeros = _pack_rows((zeros.to(torch.int32) - 1).t(), bits).t().contiguous()  # [groups, out*bits/32]
    return {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack`: -> (intweight uint8 [out, in], zeros int32 [groups, out] (true zero = stored + 1),
    scales [groups, out], g_idx int32 [in])."""
    check_shapes(qweight, qzeros, scales, g_idx, bits)
    intweight = _unpack_rows(qweight, bits).t().to(torch.uint8).contiguous()
    zeros = _unpack_rows(qzeros.t(), bits).t().contiguous() + 1
    return intweight, zeros, scales, g_idx.to(torch.int32)


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """-> W [out, in] = scale[g_idx] * (q - (stored_zero + 1)), computed in fp32 then cast once to `dtype`.

    The result is a transposed view of a contiguous [in, out] tensor (what `F.linear` wants anyway).
    fp32 first: fp16 scale times a small integer is exact in fp32, so the only rounding is the final cast.
    """
    check_shapes(qweight, qzeros, scales, g_idx, bits)
    w = _unpack_rows(qweight, bits)  # [in, out] int32
    zeros = _unpack_rows(qzeros.t(), bits).t() + 1  # [groups, out]
    scales = scales.to(torch.float32)
    (in_features, out_features), groups = w.shape, scales.shape[0]
    gs = in_features // groups
    if in_features % groups == 0 and torch.equal(g_idx, default_g_idx(in_features, gs, g_idx.device)):
        # contiguous groups (no act-order): broadcast over each group instead of gathering [in, out] rows
        w = w.view(groups, gs, out_features)
        w.sub_(zeros.unsqueeze(1))
        w = w.to(torch.float32).mul_(scales.unsqueeze(1)).view(in_features, out_features)
    else:
        g = g_idx.long()
        w.sub_(zeros.index_select(0, g))
        w = w.to(torch.float32).mul_(scales.index_select(0, g))
    return w.to(dtype).t()


def check_shapes(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> None:
    """Check that the four tensors of one layer agree with each other and with `bits` (UserError if not)."""
    _check_bits(bits)
    if g_idx.dim() != 1 or scales.dim() != 2:
        raise UserError(
            f"GPTQ g_idx must be 1-D and scales 2-D, got {tuple(g_idx.shape)} and {tuple(scales.shape)}"
        )
    in_features, (groups, out_features) = g_idx.shape[0], scales.shape
    expected = {
        "qweight": (in_features * bits // 32, out_features),
        "qzeros": (groups, out_features * bits // 32),
    }
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise UserError(f"GPTQ {name} must be int32, got {t.dtype}")
        if tuple(t.shape) != expected[name]:
            raise UserError(
                f"GPTQ {name} has shape {tuple(t.shape)}, expected {expected[name]} for {bits} bits,"
                f" in_features={in_features} (from g_idx) and out_features={out_features} (from scales)"
            )
    check_packable(in_features, out_features, bits)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise UserError(f"GPTQ bits must be one of {SUPPORTED_BITS}, got {bits}")


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[L, C] ints in [0, 2**bits) -> int32 [L * bits / 32, C]: each column is one little-endian bit stream."""
    per = values_per_chunk(bits)
    words = per * bits // 32
    rows, cols = values.shape
    v = values.to(torch.int32).reshape(rows // per, per, cols)
    out = torch.zeros(rows // per, words, cols, dtype=torch.int32, device=values.device)
    for i in range(per):
        word, offset = divmod(bits * i, 32)
        out[:, word] |= v[:, i] << offset  # int32 shifts drop the bits past 31: the wraparound we want
        if offset + bits > 32:  # the value straddles into the next word: its high bits start at bit 0 there
            out[:, word + 1] |= v[:, i] >> (32 - offset)
    return out.reshape(rows // per * words, cols)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [L * bits / 32, C] -> int32 [L, C], the inverse of `_pack_rows`."""
    per = values_per_chunk(bits)
    words = per * bits // 32
    rows, cols = packed.shape
    p = packed.reshape(rows // words, words, cols)
    mask = (1 << bits) - 1
    if words == 1:  # 2/4/8 bits: no value straddles a word, unpack all positions in one broadcast shift
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device).view(1, per, 1)
        return ((p >> shifts) & mask).reshape(rows * per, cols)
    out = torch.empty(rows // words, per, cols, dtype=torch.int32, device=packed.device)
    for i in range(per):
        word, offset = divmod(bits * i, 32)
        if offset + bits <= 32:
            # `>>` is arithmetic (sign-extending) on int32, but the mask keeps only bits below 32 - offset
            out[:, i] = (p[:, word] >> offset) & mask
        else:
            low = 32 - offset  # bits of the value that live in this word
            out[:, i] = ((p[:, word] >> offset) & ((1 << low) - 1)) | ((p[:, word + 1] << low) & mask)
    return out.reshape(rows // words * per, cols)
