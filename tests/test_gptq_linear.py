"""GPTQLinear: the int4 kernel path and the dequantize path against a dense reference built from the codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from litquant.quantization import cpu_kernels
from litquant.quantization import gptq_format as fmt
from litquant.quantization.gptq import GPTQ, rtn_quantize
from litquant.quantization.gptq_linear import GPTQLinear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _int4_kernel_path(monkeypatch):
    """These tests are about torch's int4 kernel and litquant's fp32 one: AVX2 builds would route bf16 activations to
    the int16 kernel instead (tests/test_cpu_gemv.py), so pin the exact kernels."""
    monkeypatch.setenv("LITQUANT_EXACT_KERNELS", "1")


def random_layer(
    in_f: int,
    out_f: int,
    bits: int,
    group_size: int,
    act_order: bool,
    seed: int = 0,
    bias: bool = True,
    device="cpu",
) -> tuple[GPTQLinear, torch.Tensor, torch.Tensor | None]:
    """A GPTQLinear filled with random codes, and its weight computed here from the codes: s * (q - z)."""
    g = torch.Generator().manual_seed(seed)
    groups = fmt.num_groups(in_f, group_size)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    zeros = torch.randint(1, 2**bits + 1, (groups, out_f), generator=g)
    scales = (torch.rand(groups, out_f, generator=g) * 0.02 + 0.005).half()
    g_idx = fmt.default_g_idx(in_f, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    gl = g_idx.long()
    W = scales.float().t()[:, gl] * (q - zeros.t()[:, gl]).float()  # [out, in]
    b = torch.randn(out_f, generator=g) if bias else None
    layer = GPTQLinear(in_f, out_f, bias=bias, bits=bits, group_size=group_size, dtype=torch.float32)
    layer.load_state_dict({**fmt.pack(q, zeros, scales, g_idx, bits), **({"bias": b} if bias else {})})
    return layer.to(device), W.to(device), (b.to(device) if bias else None)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------ int4 kernel, CPU


@pytest.mark.parametrize("group_size,in_f", [(32, 256), (64, 256), (128, 256), (-1, 512), (512, 1024)])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_int4_kernel_matches_dequantized_reference(group_size, in_f, act_order):
    layer, W, b = random_layer(in_f, 64, 4, group_size, act_order, seed=group_size % 97)
    assert layer.prepare(keep_source=True)
    assert layer.uses_kernel(torch.bfloat16)
    assert (layer._kernel.perm is not None) == (act_order and group_size != -1)  # one group: nothing to sort
    x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(1))
    xb = x.bfloat16()
    ref = F.linear(xb.float(), W, b)
    y = layer(xb)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 5, 64)
    # a dense bf16 matmul of the same weight, for scale: the kernel's error is bf16 rounding, not layout
    dense_bf16 = F.linear(xb, W.bfloat16(), b.bfloat16())
    assert rel_err(y, ref) < max(3 * rel_err(dense_bf16, ref), 1e-2)
    # fp32 activations on the CPU kernel: the weights are exact, only the summation order differs
    if layer.uses_kernel(torch.float32):
        torch.testing.assert_close(layer(x), F.linear(x, W, b), rtol=1e-4, atol=1e-4)


def test_kernel_is_used_and_a_wrong_layout_would_show():
    """Guard against a test that passes because everything fell back: corrupting the kernel's zero points
    must change the output, while the dequantize path (qweight) is untouched."""
    layer, W, b = random_layer(256, 64, 4, 64, act_order=True)
    layer.prepare(keep_source=True)
    x = torch.randn(4, 256).bfloat16()
    before = layer(x)
    layer._kernel.scales_and_zeros[..., 1] += 0.5
    layer._kernel._sz_cache.clear()
    assert rel_err(layer(x), before.float()) > 0.1


def test_fallback_when_the_kernel_cannot_serve():
    # out_features 8 is not a multiple of 16 (CPU kernel): dequantize path, still correct
    layer, W, b = random_layer(64, 8, 4, 32, act_order=False)
    assert not layer.prepare()
    assert layer.qweight is not None  # nothing was repacked, so nothing is released
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), F.linear(x, W, b))
    # groups of 16 channels cannot form kernel groups of 32..256
    layer, W, b = random_layer(64, 32, 4, 16, act_order=False)
    assert not layer.prepare()
    torch.testing.assert_close(layer(x), F.linear(x, W, b))


# ------------------------------------------------------------------------------------ dequantize path


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequant_path_matches_reference(bits, act_order, monkeypatch):
    layer, W, b = random_layer(128, 64, bits, 32, act_order, seed=bits)
    assert not layer.prepare()
    assert torch.equal(layer.dequantized_weight(), W)
    x = torch.randn(2, 3, 128)
    with monkeypatch.context() as m:  # torch's dequantize + matmul, as without litquant's CPU kernels
        m.setattr(cpu_kernels, "usable", lambda t: False)
        assert torch.equal(layer.dequantized_weight(), W)
        torch.testing.assert_close(layer(x), F.linear(x, W, b), rtol=1e-6, atol=1e-5)
    # litquant's CPU kernel (bits 2/4/8) on the same codes: only the summation order differs
    torch.testing.assert_close(layer(x), F.linear(x, W, b), rtol=1e-5, atol=1e-4)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_cache_dequantized():
    layer, W, b = random_layer(64, 32, 3, 32, act_order=False)
    layer.cache_dequantized = True
    x = torch.randn(2, 64)
    y = layer(x)
    assert layer._w_cache is not None and torch.equal(layer._w_cache, W)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize(
    "bits,act_order,dtype", [(4, True, torch.bfloat16), (4, False, torch.float32), (3, True, torch.float32)]
)
def test_input_gradient_matches_dense(bits, act_order, dtype):
    layer, W, b = random_layer(256, 64, bits, 64, act_order, seed=5)
    layer.prepare(keep_source=True)
    x = torch.randn(3, 7, 256, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 7, 64, dtype=dtype)
    (layer(x) * g).sum().backward()
    (F.linear(x_ref, W.to(dtype), b.to(dtype)) * g).sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    assert not any(t.requires_grad for t in layer.buffers())  # the base stays frozen


def test_gradcheck_fp64():
    layer, W, b = random_layer(32, 32, 3, 32, act_order=True, seed=2)
    layer = layer.double()
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_lora_style_training_through_the_base():
    """A trainable adapter in front of the quantized layer gets the dense layer's gradient."""
    layer, W, b = random_layer(256, 64, 4, 128, act_order=True, seed=9)
    A = torch.randn(256, 256, requires_grad=True)
    A_ref = A.detach().clone().requires_grad_()
    x = torch.randn(8, 256)
    layer((x @ A).bfloat16()).float().pow(2).mean().backward()  # lazy prepare with grad enabled keeps qweight
    F.linear((x @ A_ref).bfloat16().float(), W, b).pow(2).mean().backward()
    assert layer.qweight is not None
    torch.testing.assert_close(A.grad, A_ref.grad, rtol=5e-2, atol=5e-2 * A_ref.grad.abs().max().item())


# ------------------------------------------------------------------------------------ memory / state


def test_prepare_releases_qweight_and_state_dict_keeps_autogptq_layout():
    layer, W, b = random_layer(256, 64, 4, 128, act_order=True)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert sd["qweight"].dtype == torch.int32 and sd["qweight"].shape == (32, 64)
    assert sd["scales"].dtype == torch.float16 and sd["g_idx"].dtype == torch.int32
    x = torch.randn(2, 256).bfloat16()
    y = layer(x)

    layer.prepare(keep_source=False)
    assert layer.qweight is None
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="qweight"):
        layer.state_dict()
    with pytest.raises(RuntimeError, match="keep_source=True"):
        layer(x.float().requires_grad_())
    # loading weights again brings the AutoGPTQ layout back and repacks lazily
    layer.load_state_dict(sd)
    assert torch.equal(layer.qweight, sd["qweight"])
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_lazy_prepare_drops_qweight_only_in_inference_mode():
    layer, _, _ = random_layer(256, 64, 4, 128, act_order=False)
    x = torch.randn(1, 256).bfloat16()
    with torch.no_grad():
        layer(x)
    assert layer.qweight is not None
    layer2, _, _ = random_layer(256, 64, 4, 128, act_order=False)
    with torch.inference_mode():
        layer2(x)
    assert layer2.qweight is None


def test_dtype_casts_keep_fp16_scales():
    layer, W, b = random_layer(64, 32, 4, 32, act_order=False)
    layer = layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16
    assert layer.bias.dtype == torch.bfloat16
    assert layer.qweight.dtype == torch.int32
    assert torch.equal(layer.dequantized_weight(), W)


def test_meta_construction_then_fill():
    packed_layer, W, b = random_layer(256, 64, 4, 128, act_order=True)
    sd = packed_layer.state_dict()
    with torch.device("meta"):
        linear = torch.nn.Linear(256, 64)
    layer = GPTQLinear.from_linear(linear, bits=4, group_size=128)
    for name, shape in fmt.packed_shapes(256, 64, 4, 128).items():
        assert getattr(layer, name).shape == shape and getattr(layer, name).is_meta
    assert layer.bias.shape == (64,) and layer.bias.is_meta
    assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == torch.float16
    layer.load_state_dict(sd, assign=True)
    assert not layer.qweight.is_meta
    x = torch.randn(2, 256)
    torch.testing.assert_close(layer(x), F.linear(x, W, b), rtol=1e-4, atol=1e-4)

    with pytest.raises(RuntimeError):  # shapes are checked by load_state_dict
        GPTQLinear(256, 64, bits=4, group_size=64, device="meta").load_state_dict(sd, assign=True)


def test_from_quantized_runs_the_gptq_result():
    lin = torch.nn.Linear(128, 32)
    X = torch.randn(64, 128)
    gptq = GPTQ(128)
    gptq.add_batch(X)
    w = lin.weight.detach()
    for result in (gptq.quantize(w, 4, group_size=32, act_order=True), rtn_quantize(w, 3, 32)):
        layer = GPTQLinear.from_quantized(result, bias=lin.bias.detach())
        torch.testing.assert_close(
            layer(X), F.linear(X, result.weight, lin.bias.detach()), rtol=1e-4, atol=1e-4
        )


# ------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("group_size,in_f", [(32, 256), (64, 256), (128, 256), (-1, 512)])
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_int4_kernel_matches_dequantized_reference(group_size, in_f, act_order):
    layer, W, b = random_layer(in_f, 64, 4, group_size, act_order, device="cuda")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs sm80+")
    assert layer.prepare(keep_source=True)
    x = torch.randn(3, 5, in_f, device="cuda").bfloat16()
    ref = F.linear(x.float(), W, b)
    y = layer(x)
    dense_bf16 = F.linear(x, W.bfloat16(), b.bfloat16())
    assert rel_err(y, ref) < max(3 * rel_err(dense_bf16, ref), 1e-2)
    assert not layer.uses_kernel(torch.float16)  # fp16 activations take the dequantize path
    torch.testing.assert_close(
        layer(x.half()).float(), F.linear(x.half().float(), W, b), rtol=1e-2, atol=1e-2
    )


@pytest.mark.cuda
@needs_cuda
def test_cuda_backward_and_device_move():
    layer, W, b = random_layer(256, 64, 4, 128, act_order=True)
    layer.prepare(keep_source=True)  # CPU kernel layout
    layer = layer.cuda()  # kernel layouts are per device: rebuilt lazily on CUDA
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (layer(x).float() ** 2).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (F.linear(x_ref.float(), W.cuda(), b.cuda()) ** 2).sum().backward()
    torch.testing.assert_close(
        x.grad.float(), x_ref.grad, rtol=5e-2, atol=5e-2 * x_ref.grad.abs().max().item()
    )


def test_gptq_int4_default_precision_on_cpus(monkeypatch):
    """bf16 activations (torch's int4 kernel) on AVX-512 CPUs with native bf16; without it only when that kernel
    keeps up with litquant's fp32 one, which is timed; fp32 (the device default) on AVX2-only CPUs."""
    from litquant import precision
    from litquant.quantization import gptq_plugin as gp
    from litquant.quantization.modes import get_mode

    mode, cpu = get_mode("gptq.int4"), torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_avx512", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert mode.preferred_precision(cpu) == "bf16-true"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    for keeps_up, expected in ((True, "bf16-true"), (False, None)):
        monkeypatch.setattr(gp, "int4_kernel_keeps_up", lambda: keeps_up)
        assert mode.preferred_precision(cpu) == expected
    assert get_mode("gptq.int8").preferred_precision(cpu) is None
    monkeypatch.setattr(precision, "cpu_has_avx512", lambda: False)
    assert mode.preferred_precision(cpu) is None
    monkeypatch.undo()
    # the timing itself runs (once per process) and decides
    gp.int4_kernel_keeps_up.cache_clear()
    assert isinstance(gp.int4_kernel_keeps_up(), bool)
