"""The AutoGPTQ layout, pinned by hand-computed words and an independent python-int bit-stream reference."""

from __future__ import annotations

import pytest
import torch

from litquant.errors import UserError
from litquant.quantization import gptq_format as fmt


def signed32(u: int) -> int:
    """An unsigned 32-bit word as the int32 torch stores."""
    return u - (1 << 32) if u >= 1 << 31 else u


def bitstream_words(values: list[int], bits: int) -> list[int]:
    """Reference: value i at bit bits*i of one little-endian integer, cut into 32-bit words."""
    big = sum(v << (bits * i) for i, v in enumerate(values))
    n_words = len(values) * bits // 32
    return [signed32((big >> (32 * w)) & 0xFFFFFFFF) for w in range(n_words)]


def pack_column(values: list[int], bits: int, zero: int = 1) -> dict[str, torch.Tensor]:
    """Pack `values` as the input channels of every output channel (out_features = one packing chunk)."""
    out = fmt.values_per_chunk(bits)
    intweight = torch.tensor(values, dtype=torch.int32).repeat(out, 1)  # [out, in]
    zeros = torch.full((1, out), zero, dtype=torch.int32)
    scales = torch.ones(1, out)
    g_idx = torch.zeros(len(values), dtype=torch.int32)
    return fmt.pack(intweight, zeros, scales, g_idx, bits)


def test_4bit_eight_values_one_word():
    packed = pack_column(list(range(8)), bits=4)
    assert packed["qweight"].dtype == torch.int32
    assert packed["qweight"].shape == (1, 8)
    # nibble i holds value i, lowest nibble first
    assert packed["qweight"][0, 0].item() == 0x76543210


def test_4bit_top_bit_set_is_negative_int32():
    packed = pack_column([15] * 8, bits=4)
    assert packed["qweight"][0, 0].item() == -1  # 0xFFFFFFFF
    packed = pack_column([0] * 7 + [8], bits=4)
    assert packed["qweight"][0, 0].item() == -(2**31)  # 0x80000000
    packed = pack_column([1, 0, 0, 0, 0, 0, 0, 9], bits=4)
    assert packed["qweight"][0, 0].item() == signed32(0x90000001)
    intweight, *_ = fmt.unpack(**packed, bits=4)
    assert intweight[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 9]


def test_2bit_and_8bit_words():
    vals2 = [3, 0, 1, 2] * 4
    packed = pack_column(vals2, bits=2)
    expected = sum(v << (2 * i) for i, v in enumerate(vals2))  # each byte: 3 | 0<<2 | 1<<4 | 2<<6 = 0x93
    assert expected == 0x93939393
    assert packed["qweight"].shape == (1, 16)
    assert packed["qweight"][0, 0].item() == signed32(0x93939393)

    packed = pack_column([1, 2, 3, 255], bits=8)
    assert packed["qweight"].shape == (1, 4)
    assert packed["qweight"][0, 0].item() == signed32(0xFF030201)


def test_3bit_straddles_words():
    # value 10 sits at bits 30..32: its two low bits end word 0, its high bit starts word 1
    vals = [0] * 32
    vals[10] = 0b111
    qw = pack_column(vals, bits=3)["qweight"][:, 0].tolist()
    assert qw == [signed32(0xC0000000), 1, 0]
    # value 21 sits at bits 63..65: its low bit ends word 1, its two high bits start word 2
    vals = [0] * 32
    vals[21] = 0b111
    qw = pack_column(vals, bits=3)["qweight"][:, 0].tolist()
    assert qw == [0, signed32(0x80000000), 3]
    # value 21 = 0b010: only its middle bit, i.e. bit 0 of word 2
    vals[21] = 0b010
    assert pack_column(vals, bits=3)["qweight"][:, 0].tolist() == [0, 0, 1]
    # values 0..9 fill word 0 without straddling; value 31 ends word 2 at bit 95
    vals = [0] * 32
    vals[1], vals[31] = 5, 4
    assert pack_column(vals, bits=3)["qweight"][:, 0].tolist() == [5 << 3, 0, signed32(4 << 29)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_bitstream_reference(bits):
    g = torch.Generator().manual_seed(bits)
    per = fmt.values_per_chunk(bits)
    in_features, out_features = 2 * per, per
    intweight = torch.randint(0, 2**bits, (out_features, in_features), generator=g)
    zeros = torch.randint(1, 2**bits + 1, (1, out_features), generator=g)
    packed = fmt.pack(
        intweight, zeros, torch.ones(1, out_features), torch.zeros(in_features, dtype=torch.int32), bits
    )
    assert packed["qweight"].shape == (in_features * bits // 32, out_features)
    assert packed["qzeros"].shape == (1, out_features * bits // 32)
    for o in range(out_features):  # qweight: a column per output channel, packed along in_features
        assert packed["qweight"][:, o].tolist() == bitstream_words(intweight[o].tolist(), bits)
    # qzeros: packed along out_features, storing zero - 1
    assert packed["qzeros"][0].tolist() == bitstream_words([z - 1 for z in zeros[0].tolist()], bits)


def test_qzeros_store_zero_minus_one():
    out = 8
    zeros = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 16]], dtype=torch.int32)  # 16 = 2**4 is stored as 15
    packed = fmt.pack(
        torch.zeros(out, 8, dtype=torch.int32),
        zeros,
        torch.ones(1, out),
        torch.zeros(8, dtype=torch.int32),
        4,
    )
    assert packed["qzeros"].shape == (1, 1)
    assert packed["qzeros"][0, 0].item() == signed32(0xF6543210)
    _, unpacked_zeros, _, _ = fmt.unpack(**packed, bits=4)
    assert unpacked_zeros.tolist() == zeros.tolist()
    # the 8-value zero block of the AutoGPTQ sym 4-bit layer (zero 8) is the familiar 0x77777777
    packed = fmt.pack(
        torch.zeros(out, 8, dtype=torch.int32),
        torch.full((1, out), 8),
        torch.ones(1, out),
        torch.zeros(8, dtype=torch.int32),
        4,
    )
    assert packed["qzeros"][0, 0].item() == 0x77777777


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_round_trip_and_dequantize(bits, group_size):
    g = torch.Generator().manual_seed(100 + bits)
    out_features, in_features = 64, 128
    groups = fmt.num_groups(in_features, group_size)
    intweight = torch.randint(0, 2**bits, (out_features, in_features), generator=g).to(torch.uint8)
    zeros = torch.randint(1, 2**bits + 1, (groups, out_features), generator=g).to(torch.int32)
    scales = torch.rand(groups, out_features, generator=g) + 0.01
    # act-order style: any order
    g_idx = torch.randint(0, groups, (in_features,), generator=g).to(torch.int32)
    packed = fmt.pack(intweight, zeros, scales, g_idx, bits)
    assert packed["scales"].dtype == torch.float16 and packed["g_idx"].dtype == torch.int32
    assert (
        tuple(packed["qweight"].shape)
        == fmt.packed_shapes(in_features, out_features, bits, group_size)["qweight"]
    )
    assert (packed["qweight"] < 0).any()  # random data sets top bits: the signed wraparound is exercised

    q, z, s, gi = fmt.unpack(**packed, bits=bits)
    assert torch.equal(q, intweight)
    assert torch.equal(z, zeros)
    assert torch.equal(gi, g_idx)
    assert torch.equal(s, scales.half())

    W = fmt.dequantize(**packed, bits=bits)
    gl = g_idx.long()
    ref = scales.half().float()[gl].t() * (intweight.float() - zeros.float()[gl].t())
    assert W.shape == (out_features, in_features)
    assert torch.equal(W, ref)
    assert fmt.dequantize(**packed, bits=bits, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_shapes_that_cannot_pack_raise():
    with pytest.raises(UserError, match="multiple of 32"):
        fmt.packed_shapes(in_features=48, out_features=64, bits=3, group_size=16)
    with pytest.raises(UserError, match="out_features"):
        fmt.packed_shapes(in_features=64, out_features=12, bits=4, group_size=32)
    with pytest.raises(UserError, match="bits"):
        fmt.packed_shapes(64, 64, bits=5, group_size=32)
    with pytest.raises(UserError, match="multiple of 32"):
        fmt.pack(
            torch.zeros(32, 16, dtype=torch.int32),
            torch.ones(1, 32),
            torch.ones(1, 32),
            torch.zeros(16, dtype=torch.int32),
            3,
        )
    # a file whose tensors disagree
    packed = fmt.pack(
        torch.zeros(8, 16, dtype=torch.int32),
        torch.ones(1, 8),
        torch.ones(1, 8),
        torch.zeros(16, dtype=torch.int32),
        4,
    )
    with pytest.raises(UserError, match="qweight"):
        fmt.dequantize(packed["qweight"][:1], packed["qzeros"], packed["scales"], packed["g_idx"], 4)
    with pytest.raises(UserError, match="qweight"):
        fmt.unpack(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], 2)


def test_values_that_cannot_be_stored_raise():
    args = dict(scales=torch.ones(1, 8), g_idx=torch.zeros(8, dtype=torch.int32), bits=4)
    with pytest.raises(ValueError, match="zero"):  # zero 0 would be stored as -1 and read back as 16
        fmt.pack(torch.zeros(8, 8, dtype=torch.int32), torch.zeros(1, 8, dtype=torch.int32), **args)
    with pytest.raises(ValueError, match="intweight"):
        fmt.pack(torch.full((8, 8), 16), torch.ones(1, 8, dtype=torch.int32), **args)


def test_num_groups_and_default_g_idx():
    assert fmt.num_groups(4096, 128) == 32
    assert fmt.num_groups(100, 32) == 4
    assert fmt.num_groups(4096, -1) == 1
    assert fmt.default_g_idx(8, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert fmt.default_g_idx(4, -1).tolist() == [0, 0, 0, 0]
    with pytest.raises(UserError):
        fmt.num_groups(64, 0)
