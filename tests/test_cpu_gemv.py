"""cpu_gemv.c: the int16-activation 4-bit GEMVs (AVX2 builds) against the dequantize-then-matmul reference and against
the written-out int16 arithmetic; the bf16-weight GEMV on every build; BF16Linear's path choice; the timed default
precision; bnb_format against bitsandbytes bit for bit, and a CPU nf4 run that never imports bitsandbytes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_BUILDS, rel, use_kernel_build

from litquant.quantization import bf16_linear, bnb_format
from litquant.quantization import bnb_linear as bl
from litquant.quantization import cpu_kernels as ck
from litquant.quantization import gptq_format as fmt

pytestmark = pytest.mark.skipif(
    ck.lib() is None, reason=f"litquant CPU kernels unavailable: {ck.build_error}"
)


@pytest.fixture
def avx2(monkeypatch):
    """The AVX2 build, where the int16 kernels exist."""
    use_kernel_build(monkeypatch, "avx2")
    assert ck.i16()


@pytest.fixture(params=list(KERNEL_BUILDS))
def build(request, monkeypatch):
    return use_kernel_build(monkeypatch, request.param)


def x16(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations as the kernels quantize them, in fp32 as they do: (int values (M, K), scale per block)."""
    m, k = x.shape
    xb = x.float().reshape(m, k // block, block)
    a = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(a > 0, torch.tensor(32767.0) / a, torch.zeros_like(a))
    return torch.round(xb * inv).reshape(m, k), (a / 32767.0).squeeze(-1)


# ---- bitsandbytes 4-bit through int16 activations ------------------------------------------------------------


def bnb_layer(n: int, k: int, quant_type: str, dq: bool, seed: int = 0) -> bl.Linear4bit:
    torch.manual_seed(seed)
    layer = bl.Linear4bit(k, n, False, quant_type, dq, torch.float32, "cpu")
    layer.quantize_(torch.randn(n, k) * 0.05)
    return layer.eval()


def bnb_i16_formula(x: torch.Tensor, layer: bl.Linear4bit) -> torch.Tensor:
    """sum over 64-blocks of absmax * x_scale * (int16 table . int16 x) / 8191, the integer dots exact (int64)."""
    n, k = layer.out_features, layer.in_features
    b = layer.weight.reshape(-1)
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(n, k).long()
    t16 = torch.round(bnb_format.code(layer.quant_type) * 8191.0).long()
    xq, xs = x16(x, 64)
    dots = torch.einsum("mbi,nbi->mnb", xq.long().reshape(x.shape[0], -1, 64), t16[codes].reshape(n, -1, 64))
    absmax = layer._absmax().double().reshape(n, -1)
    return (dots.double() * absmax[None] * xs.double()[:, None, :]).sum(-1) / 8191.0


@pytest.mark.parametrize("quant_type,dq", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
@pytest.mark.parametrize("n,k", [(48, 128), (37, 320), (24, 2560)])  # 2560: crosses nested-absmax blocks
def test_bnb4_i16_is_its_int16_formula_and_close_to_the_exact_product(avx2, quant_type, dq, n, k):
    layer = bnb_layer(n, k, quant_type, dq)
    W = bl._bnb().functional.dequantize_4bit(layer.weight, layer.quant_state(torch.float32))
    lut = bl._code(quant_type, torch.device("cpu"))
    for m in (1, 3, 4, 5, 9):
        x = torch.randn(m, k)
        x[0, 5] = 40.0  # an outlier: its block's other values keep 2^-16 of 40
        for xin in (x, x.bfloat16()):
            y = ck.bnb4_i16_matmul(xin, layer.weight, n, k, layer.absmax, lut, layer._dq())
            torch.testing.assert_close(y.double(), bnb_i16_formula(xin.float(), layer), rtol=2e-5, atol=2e-5)
            # the numerics it trades: |table error| <= 2^-14 of absmax, |x error| <= 2^-16 of its block's max
            assert rel(y, xin.float() @ W.t()) < 3e-4


def test_layers_take_the_int16_kernel_for_decode_rows_only(avx2, monkeypatch):
    calls = []
    fn = ck.bnb4_i16_matmul
    monkeypatch.setattr(ck, "bnb4_i16_matmul", lambda *a, **kw: calls.append(a[0].shape[0]) or fn(*a, **kw))
    layer = bnb_layer(64, 128, "nf4", False)
    with torch.no_grad():
        for rows in (1, bl.I16_MAX_ROWS, bl.I16_MAX_ROWS + 1):
            layer(torch.randn(rows, 128))
        monkeypatch.setenv("LITQUANT_EXACT_KERNELS", "1")  # the exact path stays available
        layer(torch.randn(1, 128))
    assert calls == [1, bl.I16_MAX_ROWS]


# ---- GPTQ 4-bit through int16 activations ------------------------------------------------------------------


def gptq_layer(n: int, k: int, gs: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    groups = k // (gs if gs > 0 else k)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.01 + 0.001).half()
    zeros = torch.randint(1, 17, (groups, n), dtype=torch.int32, generator=g)
    g_idx = (torch.arange(k) // (gs if gs > 0 else k)).int()
    return fmt.pack(q, zeros, scales, g_idx, 4)


def gptq_i16_formula(x: torch.Tensor, p: dict, gs: int) -> torch.Tensor:
    q, z, s, _ = fmt.unpack(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 4)
    k = x.shape[1]
    gs = gs if gs > 0 else k
    block = 128 if gs % 128 == 0 else gs
    xq, xs = x16(x, block)
    y = torch.zeros(x.shape[0], q.shape[0], dtype=torch.float64)
    for g in range(k // gs):
        acc, xsum = 0.0, 0.0
        for b in range(g * gs // block, (g + 1) * gs // block):
            cols = slice(b * block, (b + 1) * block)
            dot = xq[:, cols].long() @ q[:, cols].long().t()  # exact
            acc = acc + xs[:, b : b + 1].double() * dot.double()
            xsum = xsum + xs[:, b : b + 1].double() * xq[:, cols].double().sum(1, keepdim=True)
        y += s[g].double() * (acc - z[g].double() * xsum)
    return y


@pytest.mark.parametrize(
    "n,k,gs", [(40, 256, 32), (64, 384, 48), (24, 512, 128), (16, 384, -1), (32, 1024, 256)]
)
def test_gptq_i16_is_its_int16_formula_and_close_to_the_dense_weight(avx2, n, k, gs):
    p = gptq_layer(n, k, gs)
    assert ck.gptq_i16_ok(4, gs, k, n, True) and not ck.gptq_i16_ok(4, gs, k, n, False)
    assert not ck.gptq_i16_ok(3, gs, k, n, True) and not ck.gptq_i16_ok(4, gs, k, 20, True)
    W = fmt.dequantize(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 4)
    for m in (1, 2, 4, 5):
        x = torch.randn(m, k)
        y = ck.gptq_i16_matmul(x, p["qweight"], p["qzeros"], p["scales"], gs)
        torch.testing.assert_close(y.double(), gptq_i16_formula(x, p, gs), rtol=2e-5, atol=2e-5)
        assert rel(y, x @ W.t()) < 2e-4  # the codes are exact integers: only x's 2^-16 rounding


def test_gptq_layer_takes_the_int16_kernel_and_bf16_activations_on_avx2(avx2, monkeypatch):
    from litquant.quantization.gptq_linear import GPTQLinear

    p = gptq_layer(64, 256, 64)
    layer = GPTQLinear(256, 64, bias=False, bits=4, group_size=64)
    layer.load_state_dict(p)
    calls = []
    fn = ck.gptq_i16_matmul
    monkeypatch.setattr(ck, "gptq_i16_matmul", lambda *a, **kw: calls.append(a[0].dtype) or fn(*a, **kw))
    W = layer.dequantize(torch.float32)
    with torch.inference_mode():
        x = torch.randn(2, 256)
        assert rel(layer(x), x @ W.t()) < 2e-4
        y16 = layer(x.bfloat16())  # bf16 activations: litquant's kernel too (no torch int4 repack on AVX2)
    assert y16.dtype == torch.bfloat16 and rel(y16.float(), x.bfloat16().float() @ W.t()) < 1e-2
    assert len(calls) == 2 and layer._kernel is None


# ---- bf16 weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(37, 64), (8, 1024), (130, 320)])
def test_bf16_matmul_is_the_fp32_product_of_the_stored_weights(build, n, k):
    w = (torch.randn(n, k) * 0.05).bfloat16()
    for m in (1, 3, 4, 6):
        x = torch.randn(m, k)
        torch.testing.assert_close(ck.bf16_matmul(x, w), x @ w.float().t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        ck.bf16_matmul(torch.randn(1, k + 1), w)


def test_bf16_linear_runs_the_gemv_for_decode_and_torch_otherwise(monkeypatch):
    calls = []
    fn = ck.bf16_matmul
    monkeypatch.setattr(ck, "bf16_matmul", lambda *a, **kw: calls.append(a[0].shape[0]) or fn(*a, **kw))
    lin = torch.nn.Linear(64, 24).bfloat16()
    ref_w, ref_b = lin.weight.float(), lin.bias.float()
    bf16_linear.convert(torch.nn.Sequential(lin))
    assert isinstance(lin, bf16_linear.BF16Linear) and isinstance(lin, torch.nn.Linear)
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        y = lin(x)
        lin(torch.randn(bf16_linear.GEMV_MAX_ROWS + 1, 64).bfloat16())  # prefill: torch's matmul
    torch.testing.assert_close(y.float(), F.linear(x.float(), ref_w, ref_b), rtol=1e-2, atol=1e-2)
    xg = torch.randn(2, 64, requires_grad=True)
    lin.float()(xg).sum().backward()  # training: F.linear, gradients flow
    assert xg.grad is not None and calls == [3]


def test_default_precision_follows_the_timed_choice(monkeypatch):
    """Without native bf16: bf16 + the GEMV only where the timing says it beats fp32; the hint follows the same
    decision, so it never recommends the slower path; training keeps the native default."""
    from litquant import precision as P

    monkeypatch.setenv("LITQUANT_NATIVE_BF16", "0")
    assert bf16_linear.prefer_gemv(1.0, 2.0) and not bf16_linear.prefer_gemv(2.0, 1.0)
    for gemv_s, fp32_s in ((0.5e-3, 1.1e-3), (1.2e-3, 1.0e-3)):
        bf16_linear.gemv_beats_torch.cache_clear()
        monkeypatch.setattr(bf16_linear, "best_time", lambda fn, n=2, ts=iter((gemv_s, fp32_s)): next(ts))
        faster = gemv_s < fp32_s
        assert P.default_precision("cpu") == ("bf16-true" if faster else "32-true")
        assert P.resolve(None, None, "cpu", training=True).precision == "32-true"
        fp32_hints = P.resolve("32-true", None, "cpu").hints(torch.device("cpu"))
        bf16_hints = P.resolve("bf16-true", None, "cpu").hints(torch.device("cpu"))
        assert bool(fp32_hints) == faster and bool(bf16_hints) == (not faster)
        assert ("GEMV" in P.resolve(None, None, "cpu").kernels(torch.device("cpu"))) == faster
    bf16_linear.gemv_beats_torch.cache_clear()


# ---- bitsandbytes' format, owned ----------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_format_is_bitsandbytes_bit_for_bit(quant_type):
    F_ = bl._bnb().functional
    assert torch.equal(bnb_format.code(quant_type), F_.get_4bit_type(quant_type, device="cpu").float())
    torch.manual_seed(0)
    levels = bnb_format.code(quant_type)
    mids = (levels.sort().values[1:] + levels.sort().values[:-1]) / 2
    for n in (64 * 50, 64 * 3 + 10, 129):
        w = torch.randn(n) * 0.1
        w[:15] = mids * 0.5  # exact ties between levels (block absmax 0.5 set below)
        w[15] = 0.5
        w[64:128] = 0.0 if n > 128 else w[64:128]  # an all-zero block
        packed, qs = F_.quantize_4bit(w, blocksize=64, quant_type=quant_type)
        mine, absmax = bnb_format.quantize_4bit(w, 64, quant_type)
        assert torch.equal(mine, packed) and torch.equal(absmax, qs.absmax)


def test_cpu_nf4_load_and_generate_never_import_bitsandbytes(tmp_path):
    """Startup: bitsandbytes' import alone costs seconds; a CPU nf4 run (quantize on load, pre-quantized file) uses
    litquant's own tables, quantizer and kernels."""
    code = (
        "import sys; from litquant.api import LLM\n"
        "for _ in range(2):\n"
        "    llm = LLM.load(quantize='bnb.nf4', accelerator='cpu', progress=False)\n"
        "    llm.generate('def f(', max_new_tokens=2, temperature=0)\n"
        "print('bitsandbytes' in sys.modules)"
    )
    env = {**os.environ, "LITQUANT_NATIVE_BF16": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
