"""litquant's CPU kernels (cpu_kernels.c) against dequantize-then-matmul references, for every build the source has
(AVX-512, AVX2, plain C): fp32 and bf16 activations, decode (1 row) and prefill (many rows) shapes, sizes that are
not multiples of the vector width or tile; plus the layers' choice of path and the gradient through a frozen base."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_BUILDS, rel, use_kernel_build

from litquant.quantization import bnb_format
from litquant.quantization import bnb_linear as bl
from litquant.quantization import cpu_kernels as ck
from litquant.quantization import gptq_format as fmt
from litquant.quantization.gptq_linear import GPTQLinear

pytestmark = pytest.mark.skipif(
    ck.lib() is None, reason=f"litquant CPU kernels unavailable: {ck.build_error}"
)


@pytest.fixture(params=list(KERNEL_BUILDS))
def build(request, monkeypatch):
    """Run the test against one build of the kernels."""
    return use_kernel_build(monkeypatch, request.param)


# ---- bitsandbytes 4-bit -------------------------------------------------------------------------------------


def bnb_layer(n: int, k: int, quant_type: str, dq: bool, seed: int = 0) -> bl.Linear4bit:
    torch.manual_seed(seed)
    layer = bl.Linear4bit(k, n, False, quant_type, dq, torch.float32, "cpu")
    layer.quantize_(torch.randn(n, k) * 0.05)
    return layer.eval()


def bnb_reference(layer: bl.Linear4bit) -> torch.Tensor:
    """bitsandbytes' own dequantization (fp32), independent of litquant's kernels."""
    return bl._bnb().functional.dequantize_4bit(layer.weight, layer.quant_state(torch.float32))


@pytest.mark.parametrize("quant_type,dq", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
@pytest.mark.parametrize("n,k", [(48, 128), (37, 320), (24, 2560)])  # the last: crosses nested-absmax blocks
def test_bnb4_matmul_matches_bnb_dequantize_then_matmul(build, quant_type, dq, n, k):
    layer = bnb_layer(n, k, quant_type, dq)
    W = bnb_reference(layer)
    lut = bl._code(quant_type, torch.device("cpu"))
    for m in (1, 3, 4, 5, 9):  # row blocks of 4 and their tails
        x = torch.randn(m, k)
        y = ck.bnb4_matmul(x, layer.weight, n, k, layer.absmax, lut, layer._dq())
        torch.testing.assert_close(y, x @ W.t(), rtol=1e-5, atol=1e-5)
        # bf16 inputs, widened
        y16 = ck.bnb4_matmul(x.bfloat16(), layer.weight, n, k, layer.absmax, lut, layer._dq())
        torch.testing.assert_close(y16, x.bfloat16().float() @ W.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type,dq,k", [("nf4", False, 192), ("fp4", True, 192), ("nf4", True, 2560)])
def test_bnb4_dequantize_is_bitsandbytes_bit_for_bit(build, quant_type, dq, k):
    """k = 2560: 40 blocks per row, so the vectorised double-quant undo runs, from row starts that are not multiples
    of the vector width, across boundaries of the nested blocks of 256."""
    layer = bnb_layer(40, k, quant_type, dq, seed=1)
    lut = bl._code(quant_type, torch.device("cpu"))
    ref = bnb_reference(layer)
    assert torch.equal(ck.bnb4_dequantize(layer.weight, 40, k, layer.absmax, lut, layer._dq()), ref)
    rows = ck.bnb4_dequantize(
        layer.weight, 40, k, layer.absmax, lut, layer._dq(), rows=(7, 23), dtype=torch.bfloat16
    )
    assert torch.equal(rows, ref[7:23].bfloat16())
    # the layer's dequantize (used by merge and the backward) is bnb's too, in every dtype
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        expected = bl._bnb().functional.dequantize_4bit(layer.weight, layer.quant_state(dtype))
        assert torch.equal(layer.dequantize(dtype), expected)


# ---- LLM.int8 -------------------------------------------------------------------------------------------------


def int8_reference(x: torch.Tensor, w: torch.Tensor, absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8 written out from the stored int8 weight: outlier columns in fp64 with the dequantized weight, the
    rest of each row quantized by its absmax; rounding to int8 in fp32 as the layer does it."""
    cols = (x.abs() >= threshold).any(dim=0)
    xr = x.clone()
    xr[:, cols] = 0
    x_absmax = xr.abs().amax(dim=1)
    xq = torch.round(xr * torch.where(x_absmax > 0, 127.0 / x_absmax, 0.0)[:, None]).double()
    y = (xq @ w.double().t()) * x_absmax[:, None].double() * absmax[None, :].double() / 127**2
    w_deq = w.double() * absmax[:, None].double() / 127
    return y + x[:, cols].double() @ w_deq[:, cols].t()


@pytest.mark.parametrize("k", [96, 100])  # 100: a tail after the last vector
def test_int8_matmul_matches_written_out_llm_int8(build, k):
    torch.manual_seed(2)
    layer = bl.Linear8bit(k, 24, bias=False, device="cpu")
    layer.quantize_(torch.randn(24, k) * 0.05)
    for m in (1, 2, 5, 8):
        x = torch.randn(m, k)
        x[0, 3] = 9.0  # an outlier column
        if m > 1:
            x[m - 1, 50] = -7.0
        y = ck.int8_matmul(x, layer.weight, layer.absmax, 6.0)
        torch.testing.assert_close(
            y.double(), int8_reference(x, layer.weight, layer.absmax, 6.0), rtol=1e-5, atol=1e-5
        )
    # without outliers the integer part is all there is: exact up to the final fp32 products
    x = torch.randn(3, k)
    y = ck.int8_matmul(x, layer.weight, layer.absmax, 6.0)
    torch.testing.assert_close(
        y.double(), int8_reference(x, layer.weight, layer.absmax, 6.0), rtol=1e-6, atol=1e-6
    )


def test_int8_dequantize_is_the_layers_bit_for_bit(build):
    torch.manual_seed(3)
    layer = bl.Linear8bit(70, 33, bias=False, device="cpu")
    layer.quantize_(torch.randn(33, 70))
    assert torch.equal(ck.int8_dequantize(layer.weight, layer.absmax), layer.dequantize(torch.float32))
    assert torch.equal(
        ck.int8_dequantize(layer.weight, layer.absmax, rows=(5, 9), dtype=torch.bfloat16),
        layer.dequantize(torch.float32)[5:9].bfloat16(),
    )


# ---- GPTQ -----------------------------------------------------------------------------------------------------


def gptq_codes(k: int, n: int, bits: int, group_size: int, act_order: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    groups = fmt.num_groups(k, group_size)
    q = torch.randint(0, 2**bits, (n, k), generator=g)
    zeros = torch.randint(1, 2**bits + 1, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.005).half()
    g_idx = fmt.default_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    # [n, k], from the codes
    W = scales.float().t()[:, g_idx.long()] * (q - zeros.t()[:, g_idx.long()]).float()
    return fmt.pack(q, zeros, scales, g_idx, bits), W


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (64, True), (-1, False), (48, False)])
def test_gptq_matmul_matches_the_dense_weight(build, bits, group_size, act_order):
    k, n = 192, 48  # 48 columns: not a multiple of the AVX-512 kernel's 64-column tiles
    packed, W = gptq_codes(k, n, bits, group_size, act_order, seed=bits)
    ordered = ck.gptq_ordered(packed["g_idx"], group_size)
    assert ordered == (not act_order)
    for m in (1, 3, 6):
        x = torch.randn(m, k)
        y = ck.gptq_matmul(
            x,
            packed["qweight"],
            packed["qzeros"],
            packed["scales"],
            packed["g_idx"],
            bits,
            group_size,
            ordered,
        )
        torch.testing.assert_close(y, x @ W.t(), rtol=1e-5, atol=1e-4)
    # the dequantized transpose, all columns and a tile of them, is gptq_format's bit for bit
    ref = fmt.dequantize(
        packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, torch.float32
    )
    args = (packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert torch.equal(ck.gptq_dequantize_t(*args), ref.t())
    assert torch.equal(
        ck.gptq_dequantize_t(*args, cols=(16, 32), dtype=torch.bfloat16), ref.t()[:, 16:32].bfloat16()
    )


# ---- tiles and the layers' paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("transpose", [False, True])
def test_tiled_linear_over_several_tiles(monkeypatch, transpose):
    # 7 rows per tile: 40 rows need 6 tiles, the last partial
    monkeypatch.setattr(ck, "TILE_ELEMENTS", 7 * 64)
    layer = bnb_layer(40, 64, "nf4", False)
    W = bnb_reference(layer)
    x = torch.randn(11, 40 if transpose else 64)
    y = ck.tiled_linear(x, 40, 64, layer._dequant_rows, transpose)
    torch.testing.assert_close(y, x @ W if transpose else x @ W.t(), rtol=1e-5, atol=1e-5)
    yb = ck.tiled_linear(x.bfloat16(), 40, 64, layer._dequant_rows, transpose)  # bf16 tiles, bf16 matmul
    assert yb.dtype == torch.bfloat16 and rel(yb, x @ W if transpose else x @ W.t()) < 1e-2


def _count(monkeypatch, *names: str) -> list:
    """Calls to any of the wrappers `names`, in one list."""
    calls = []
    for name in names:
        fn = getattr(ck, name)
        monkeypatch.setattr(ck, name, lambda *a, _fn=fn, **kw: calls.append(1) or _fn(*a, **kw))
    return calls


@pytest.mark.parametrize("mode", ["nf4", "int8", "gptq"])
def test_layers_take_the_fused_kernel_for_few_rows_and_tiles_beyond(monkeypatch, mode):
    # the few-row kernels: the fp32 ones, and on AVX2 builds the int16-activation ones (4 rows at most)
    small = {"nf4": ["bnb4_matmul", "bnb4_i16_matmul"], "int8": ["int8_matmul"], "gptq": ["gptq_matmul"]}[
        mode
    ]
    fused = _count(monkeypatch, *small)
    tiled = _count(monkeypatch, "tiled_linear")
    if mode == "gptq":
        packed, W = gptq_codes(128, 64, 4, 32, act_order=True)
        layer = GPTQLinear(128, 64, bias=False, bits=4, group_size=32)
        layer.load_state_dict(packed)
        limit = 8
    else:
        layer = (
            bnb_layer(64, 128, "nf4", False) if mode == "nf4" else bl.Linear8bit(128, 64, False, device="cpu")
        )
        if mode == "int8":
            layer.quantize_(torch.randn(64, 128) * 0.05)
        W = bnb_reference(layer) if mode == "nf4" else layer.dequantize(torch.float32)
        limit = bl.GEMV_MAX_ROWS_4BIT if mode == "nf4" else bl.GEMV_MAX_ROWS_INT8
    with torch.no_grad():
        for rows in (1, limit, limit + 1, 40):
            x = torch.randn(rows, 128)
            y = layer(x)
            if mode != "int8":  # LLM.int8 quantizes the input rows: checked against its reference above
                tol = (
                    1e-3 if ck.i16() and rows <= bl.I16_MAX_ROWS else 1e-4
                )  # int16 activations: ~1e-4 relative
                torch.testing.assert_close(y, x @ W.t(), rtol=tol, atol=tol)
    if mode == "int8" and not ck.vnni():  # without int8 dot instructions every row takes litquant's LLM.int8
        assert len(fused) == 4 and len(tiled) == 0
        return
    assert len(fused) == 2
    if mode != "int8":  # with VNNI, LLM.int8 beyond a few rows is bitsandbytes' int8 matmul
        assert len(tiled) == 2


@pytest.mark.parametrize("mode", ["nf4-dq", "int8-training", "gptq"])
def test_gradient_through_the_frozen_base_matches_the_dense_one(mode):
    """QLoRA's backward: grad wrt the input = grad_out @ W, tile by tile, equal to the dense layer's."""
    if mode == "gptq":
        packed, W = gptq_codes(256, 64, 4, 64, act_order=True, seed=4)
        layer = GPTQLinear(256, 64, bias=False, bits=4, group_size=64)
        layer.load_state_dict(packed)
    else:
        layer = (
            bl.Linear4bit(256, 64, False, "nf4", True, torch.float32, "cpu")
            if mode == "nf4-dq"
            else bl.Linear8bit(256, 64, False, training=True, device="cpu")
        )
        layer.quantize_(torch.randn(64, 256) * 0.05)
        layer.train()
        W = layer.dequantize(torch.float32)
    for rows in (3, 300):  # the fused kernel and the tiled path forward; the backward is tiled either way
        x = torch.randn(rows, 256, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        g = torch.randn(rows, 64)
        (layer(x) * g).sum().backward()
        (F.linear(x_ref, W) * g).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert not any(t.requires_grad for t in layer.buffers())


def test_kernels_under_a_bf16_default_dtype_and_bad_arguments():
    """Fabric's forward context makes bf16 the default dtype: bitsandbytes would then build the 4-bit code in bf16,
    which the C side must never read as floats (found by QLoRA training); and a wrong buffer is an error, not a read
    past its end."""
    bnb_format.code.cache_clear()
    layer = bnb_layer(32, 128, "nf4", False)
    W = bnb_reference(layer)
    x = torch.randn(2, 128)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        bnb_format.code.cache_clear()
        with torch.no_grad():
            y = layer(x)
    finally:
        torch.set_default_dtype(previous)
    assert bl._code("nf4", torch.device("cpu")).dtype == torch.float32
    tol = 1e-3 if ck.i16() else 1e-5  # AVX2 builds: 2 rows take the int16-activation kernel (~1e-4 relative)
    torch.testing.assert_close(y, x @ W.t(), rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="4-bit code"):
        ck.bnb4_matmul(
            x, layer.weight, 32, 128, layer.absmax, bl._code("nf4", torch.device("cpu")).bfloat16()
        )
    with pytest.raises(ValueError, match="absmax"):
        ck.bnb4_matmul(x, layer.weight, 32, 128, layer.absmax[:10], bl._code("nf4", torch.device("cpu")))
    packed, _ = gptq_codes(128, 48, 4, 32, act_order=False)
    with pytest.raises(ValueError, match="scales"):
        ck.gptq_matmul(
            torch.randn(1, 128),
            packed["qweight"],
            packed["qzeros"],
            packed["scales"].float(),
            packed["g_idx"],
            4,
            32,
            True,
        )


# ---- GPTQ's Hessian from bf16 activations ----------------------------------------------------------------------


@pytest.mark.skipif(not ck.bf16_gram_ok(), reason="the kernels were built without AVX512-BF16 (no such CPU)")
# 2101 rows: two packed chunks (2048 + an odd 53), several K chunks in the kernel
@pytest.mark.parametrize("k,n", [(2101, 70), (64, 32), (1, 16)])
def test_bf16_gram_is_the_fp64_gram_on_the_upper_triangle(k, n):
    torch.manual_seed(k)
    x = (torch.randn(k, n) * torch.rand(n) * 4).bfloat16()
    H = torch.randn(n, n)
    expected = 0.25 * H.double() + 0.5 * (x.double().t() @ x.double())
    before = H.clone()
    ck.bf16_gram(x, H, 0.25, 0.5)
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    assert rel(H[upper], expected[upper]) < 1e-5  # bf16 products are exact: only fp32 sums round
    # below the diagonal tiles (32 columns wide in cpu_kernels.c): never touched
    below = ~torch.ones(n, n, dtype=torch.bool).triu(-31)
    assert torch.equal(H[below], before[below])


# 300 rows: two K chunks in the kernel; 2101: two packed chunks in the wrapper; 70: an edge tile
@pytest.mark.parametrize("k,n", [(300, 70), (2101, 40), (64, 32), (1, 16)])
def test_f32_gram_is_the_fp64_gram_on_the_upper_triangle(build, k, n):
    torch.manual_seed(k)
    x = torch.randn(k, n) * torch.rand(n) * 4
    H = torch.randn(n, n)
    expected = 0.25 * H.double() + 0.5 * (x.double().t() @ x.double())
    before = H.clone()
    ck.f32_gram(x, H, 0.25, 0.5)
    upper = torch.ones(n, n, dtype=torch.bool).triu()
    assert rel(H[upper], expected[upper]) < 1e-5
    # below the diagonal tiles (3 vectors wide, 8 rows high in cpu_kernels.c): never touched
    below = ~torch.ones(n, n, dtype=torch.bool).triu(-(3 * ck.lanes() + 7))
    assert torch.equal(H[below], before[below])
