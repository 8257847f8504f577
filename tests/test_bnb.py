"""bitsandbytes plugins: layer numerics against dequantize-then-matmul and a written-out LLM.int8, error bounds
against full precision, storage accounting, a tiny GPT end to end, pre-quantized files, frozen-weight training,
and that loading never holds more than one layer's full-precision weight."""

from __future__ import annotations

import dataclasses
import gc
import math
import os

import bitsandbytes.functional as BF  # noqa: E402
import pytest
import torch
import torch.nn as nn

from litquant.checkpoint import WEIGHTS_FILE, build_model, load_model, save_checkpoint
from litquant.config import Config
from litquant.errors import UserError
from litquant.io import safetensors_metadata
from litquant.precision import fabric_plugin, quantize_modes, resolve
from litquant.quantization import bnb as qb

# before bitsandbytes: it silences bnb's import-time warning
from litquant.quantization import (
    bnb_linear as bl,
)
from litquant.utils import weight_bytes_by_dtype

FOUR_BIT = ["nf4", "nf4-dq", "fp4", "fp4-dq"]
ALL_MODES = [*FOUR_BIT, "int8", "int8-training"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# Relative error (Frobenius) of a layer's output vs full precision, normal weights and inputs. 4-bit with 16 levels
# per block of 64 gives ~9% (nf4) / ~11% (fp4) weight error; int8 rounding is ~0.4% of a row's absmax per weight,
# plus the same for the row-quantized input (LLM.int8) -> ~1%.
LAYER_BOUND = {"nf4": 0.12, "nf4-dq": 0.12, "fp4": 0.15, "fp4-dq": 0.15, "int8": 0.02, "int8-training": 0.01}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quantized_layer(
    mode: str, w: torch.Tensor, b: torch.Tensor | None, precision: str = "32-true", device="cpu"
):
    """An nn.Linear holding (w, b), converted by the plugin (the path Fabric's setup_module takes)."""
    plugin = resolve(precision, f"bnb.{mode}", device)
    holder = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=device))
    with torch.no_grad():
        holder[0].weight.copy_(w)
        if b is not None:
            holder[0].bias.copy_(b)
    plugin.convert_module(holder.eval())
    return holder[0]


def bnb_reference_state(mode: str, w: torch.Tensor):
    quant_type, dq = qb.FOUR_BIT[mode]
    return BF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type=quant_type)


# ---- 4-bit layers ----------------------------------------------------------------------------------------


# (50, 98): blocks of 64 straddle rows, last one partial
@pytest.mark.parametrize("shape", [(96, 256), (50, 98)])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", FOUR_BIT)
@pytest.mark.parametrize("chunk", [None, 128])  # 128: quantized chunk by chunk, as large Linears are
def test_4bit_layer_matches_dequantize_then_matmul(mode, device, shape, chunk, monkeypatch):
    if chunk:
        monkeypatch.setattr(bl, "QUANTIZE_CHUNK", chunk)
    torch.manual_seed(0)
    out_f, in_f = shape
    w, b = torch.randn(out_f, in_f, device=device) * 0.05, torch.randn(out_f, device=device) * 0.1
    x = torch.randn(2, 7, in_f, device=device)
    layer = quantized_layer(mode, w, b, device=device)

    packed, qs = bnb_reference_state(mode, w)  # bitsandbytes' own quantization of the same weight
    assert torch.equal(layer.weight, packed)
    assert torch.equal(layer.absmax, qs.absmax)
    if qs.nested:
        assert torch.equal(layer.nested_absmax, qs.state2.absmax) and torch.equal(layer.offset, qs.offset)

    with torch.no_grad():
        y = layer(x)
    reference = x @ BF.dequantize_4bit(packed, qs).t() + b
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    assert rel(y, x @ w.t() + b) < LAYER_BOUND[mode]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_codes_are_nearest_levels_and_decode_by_hand(quant_type):
    """Independent of bnb's decoder: unpack the nibbles (first value in the high nibble), look the codes up in
    the published level table and scale by the block's absmax; every weight must sit on its nearest level."""
    torch.manual_seed(1)
    w = torch.randn(64, 192)
    layer = quantized_layer(quant_type, w, None)
    levels = BF.get_4bit_type(quant_type, device="cpu")
    byte = layer.weight.reshape(-1)
    codes = torch.stack((byte >> 4, byte & 0xF), dim=1).reshape(-1).long()
    absmax = w.reshape(-1, 64).abs().amax(dim=1)
    torch.testing.assert_close(layer.absmax, absmax)
    scaled = (w.reshape(-1, 64) / absmax[:, None]).reshape(-1)
    chosen = (scaled - levels[codes]).abs()
    best = (scaled[:, None] - levels[None, :]).abs().min(dim=1).values
    assert torch.all(chosen <= best + 1e-6)
    by_hand = (levels[codes].reshape(-1, 64) * absmax[:, None]).reshape(64, 192)
    torch.testing.assert_close(layer.dequantize(torch.float32), by_hand)


@pytest.mark.parametrize("mode", ["nf4", "fp4-dq"])
def test_4bit_bf16_on_cpu_fused_kernel_and_fallback_agree(mode, monkeypatch):
    """bf16 in eval mode on CPU: litquant's fused kernel for few rows, tiles + matmul for many rows, and bitsandbytes'
    own path (without litquant's kernels); all against the fp32 dequantize-then-matmul reference at bf16 accuracy.
    Computing must not change what is saved."""
    from litquant.quantization import cpu_kernels

    torch.manual_seed(2)
    w, b = torch.randn(64, 128) * 0.05, torch.randn(64) * 0.1
    layer = quantized_layer(mode, w, b, precision="bf16-true")
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    reference_w = layer.dequantize(torch.float32)
    for rows in (3, bl.GEMV_MAX_ROWS_4BIT + 5):
        x = torch.randn(rows, 128).to(torch.bfloat16)
        reference = x.float() @ reference_w.t() + b.to(torch.bfloat16).float()
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == torch.bfloat16
        assert rel(y, reference) < 1e-2
        monkeypatch.setattr(cpu_kernels, "usable", lambda t: False)
        with torch.no_grad():
            y_plain = layer(x)
        monkeypatch.undo()
        assert rel(y_plain, reference) < 1e-2
    with torch.no_grad():
        layer(torch.randn(1, 128).to(torch.bfloat16))
    assert all(torch.equal(saved[k], v) for k, v in layer.state_dict().items())


def test_nf4_beats_fp4_on_normal_weights():
    torch.manual_seed(3)
    w = torch.randn(256, 512)
    x = torch.randn(16, 512)
    err = {}
    for mode in ("nf4", "fp4"):
        layer = quantized_layer(mode, w, None)
        with torch.no_grad():
            err[mode] = (rel(layer.dequantize(torch.float32), w), rel(layer(x), x @ w.t()))
    assert err["nf4"][0] < err["fp4"][0] and err["nf4"][1] < err["fp4"][1]


def test_double_quant_saves_037_bit_per_param():
    out_f, in_f = 2048, 1024
    n = out_f * in_f
    blocks = n // 64
    plain = quantized_layer("nf4", torch.randn(out_f, in_f), None)
    dq = quantized_layer("nf4-dq", torch.randn(out_f, in_f), None)
    bytes_plain, bytes_dq = (
        sum(weight_bytes_by_dtype(plain).values()),
        sum(weight_bytes_by_dtype(dq).values()),
    )
    assert bytes_plain == n // 2 + 4 * blocks  # packed codes + fp32 absmax per block
    # uint8 absmax per block + fp32 scale per 256 absmax values + the 256-entry fp32 code + the fp32 offset
    assert bytes_dq == n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
    saved = 8 * (bytes_plain - bytes_dq) / n
    asymptotic = 32 / 64 - 8 / 64 - 32 / (64 * 256)  # = 0.373 bit/param (QLoRA: "~0.37")
    assert abs(saved - asymptotic) <= 8 * (4 * 256 + 4) / n + 1e-12
    assert abs(saved - 0.37) < 0.01


# ---- int8 layers ----------------------------------------------------------------------------------------


def llm_int8_reference(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, threshold: float = 6.0
) -> torch.Tensor:
    """LLM.int8 written out: weight rows scaled by their absmax to int8; input columns with any |x| >= threshold
    multiply in full precision (with the dequantized weight); the other columns are quantized per input row by
    that row's absmax; int32 products rescaled by both absmaxes / 127^2. Rounding to int8 is done in fp32 as
    round(v * (127 / absmax)) so ties fall the same way as in the layer; everything after that in fp64."""
    x, w = x.float(), w.float()
    w_absmax = w.abs().amax(dim=1)
    w_q = torch.round(w * (127.0 / w_absmax)[:, None]).double()
    w_deq = w_q * w_absmax[:, None].double() / 127
    cols = (x.abs() >= threshold).any(dim=0)
    x_rest = x.clone()
    x_rest[:, cols] = 0
    x_absmax = x_rest.abs().amax(dim=1)
    x_q = torch.round(x_rest * (127.0 / x_absmax)[:, None]).double()
    y = (x_q @ w_q.t()) * x_absmax[:, None].double() * w_absmax[None, :].double() / 127**2
    return y + x[:, cols].double() @ w_deq[:, cols].t() + b.double()


@pytest.mark.parametrize("device", DEVICES)
def test_int8_layer_matches_written_out_llm_int8(device):
    torch.manual_seed(4)
    w, b = torch.randn(48, 160) * 0.05, torch.randn(48) * 0.1
    x = torch.randn(9, 160)
    x[2, 5], x[7, 100], x[0, 31] = 40.0, -25.0, 6.0  # outlier columns 5, 100 and 31 (|x| >= 6 counts)
    layer = quantized_layer("int8", w.to(device), b.to(device), device=device)

    w_absmax = w.abs().amax(dim=1)
    assert torch.equal(layer.weight.cpu(), torch.round(w * (127.0 / w_absmax)[:, None]).to(torch.int8))
    with torch.no_grad():
        y = layer(x.to(device)).cpu()
    reference = llm_int8_reference(x, w, b)
    torch.testing.assert_close(y.double(), reference, rtol=1e-4, atol=1e-4)

    full = x @ w.t() + b
    assert rel(y, full) < LAYER_BOUND["int8"] + 0.01
    # the decomposition is what keeps the error small: quantizing the outliers with their rows is much worse
    assert rel(y, full) < 0.5 * rel(llm_int8_reference(x, w, b, threshold=math.inf), full.double())


@pytest.mark.parametrize("shape", [(96, 256), (50, 99)])
@pytest.mark.parametrize("mode", ["int8", "int8-training"])
def test_int8_bound_on_normal_inputs(mode, shape):
    torch.manual_seed(5)
    w, b = torch.randn(*shape) * 0.05, torch.randn(shape[0]) * 0.1
    x = torch.randn(4, 5, shape[1])
    layer = quantized_layer(mode, w, b)
    with torch.no_grad():
        y = layer(x)
    assert rel(y, x @ w.t() + b) < LAYER_BOUND[mode]
    if mode == "int8":
        reference = llm_int8_reference(x.reshape(-1, shape[1]), w, b).reshape(4, 5, -1)
        torch.testing.assert_close(y.double(), reference, rtol=1e-4, atol=1e-4)
    if mode == "int8-training":  # dequantize-then-matmul, no input quantization
        torch.testing.assert_close(y, x @ layer.dequantize(torch.float32).t() + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_int8_keeps_half_precision_compute(precision):
    """No fp16 round trip for bf16 (Lightning's plugin forces fp16): large activations stay finite."""
    torch.manual_seed(6)
    w = torch.randn(32, 64) * 0.05
    layer = quantized_layer("int8", w, None, precision=precision)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = layer(x.to(layer.compute_dtype))
    assert y.dtype == layer.compute_dtype
    assert (
        rel(y.float(), llm_int8_reference(x.to(layer.compute_dtype).float(), w, torch.zeros(32)).float())
        < 1e-2
    )
    if precision == "bf16-true":
        big = torch.full((1, 64), 5.0) * 3e4  # fp16 overflows at 65504, every column is an outlier here
        with torch.no_grad():
            out = layer(big.to(torch.bfloat16))
        assert torch.isfinite(out).all()


# ---- training through frozen quantized weights ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["int8-training", "nf4", "int8"])
def test_backward_reaches_input_and_weight_stays_frozen(mode):
    torch.manual_seed(7)
    w, b = torch.randn(64, 128) * 0.05, torch.randn(64) * 0.1
    layer = quantized_layer(mode, w, b).train()
    frozen = {k: v.clone() for k, v in layer.quantized_state().items()}
    assert [n for n, _ in layer.named_parameters()] == [
        "bias"
    ]  # the weight is no parameter: no optimizer sees it

    x = torch.randn(3, 5, 128, requires_grad=True)
    g = torch.randn(3, 5, 64)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ layer.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g.sum(dim=(0, 1)), rtol=1e-5, atol=1e-5)

    torch.optim.SGD(layer.parameters(), lr=0.1).step()
    assert all(torch.equal(frozen[k], v) for k, v in layer.quantized_state().items())


# ---- the plugin on a module ------------------------------------------------------------------------------


def test_convert_module_is_idempotent_and_survives_fabric_and_casts():
    import lightning as L

    torch.manual_seed(8)
    config = Config.from_name("tiny-llama-test")
    model = build_model(config, "cpu")
    model.eval()
    x = torch.randint(0, config.padded_vocab_size, (1, 6))
    plugin = resolve("32-true", "bnb.nf4", "cpu")
    plugin.convert_module(model)
    qkv = model.transformer.h[0].attn.qkv
    assert isinstance(qkv, bl.Linear4bit) and type(model.lm_head) is nn.Linear
    state = {k: v.clone() for k, v in qkv.state_dict().items()}
    with torch.no_grad():
        before = model(x)

    plugin.convert_module(model)  # second call (Fabric.setup_module does this): nothing changes
    assert model.transformer.h[0].attn.qkv is qkv
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=fabric_plugin(plugin))
    wrapped = fabric.setup_module(model)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), before, rtol=0, atol=0)
    assert all(torch.equal(state[k], v) for k, v in qkv.state_dict().items())

    model.to(torch.bfloat16)  # a module cast must not touch the quantization state
    assert qkv.weight.dtype == torch.uint8 and qkv.absmax.dtype == torch.float32
    assert torch.equal(qkv.absmax, state["absmax"])


def test_registry_and_option_errors():
    modes = quantize_modes()
    assert {f"bnb.{m}" for m in ALL_MODES} <= set(modes)
    with pytest.raises(UserError, match="bnb.nf4-dq") as e:
        resolve("32-true", "bnb.nf5", "cpu")
    assert all(m in str(e.value) for m in modes)
    with pytest.raises(UserError, match="quantize_lm_head"):
        resolve("32-true", "bnb.nf4", "cpu", blocksize=128)
    with pytest.raises(UserError, match="--accelerator cpu"):
        resolve("32-true", "bnb.int8", "meta")
    with pytest.raises(UserError, match="precision"):
        resolve("64-true", "bnb.nf4", "cpu")


# ---- a tiny GPT end to end --------------------------------------------------------------------------------

# Through 2 blocks of 5 quantized Linears the per-layer errors above add up (random weights, std 0.05).
GPT_BOUND = {"nf4": 0.25, "nf4-dq": 0.25, "fp4": 0.3, "fp4-dq": 0.3, "int8": 0.04, "int8-training": 0.03}


def make_checkpoint(path, dtype=torch.float32, seed=0, **overrides):
    config = Config.from_name("tiny-llama-test", **overrides)
    torch.manual_seed(seed)
    model = build_model(config, "cpu")
    model.init_weights(std=0.05)
    save_checkpoint({k: v.to(dtype) for k, v in model.state_dict().items()}, config, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bnb") / "tiny")


@pytest.fixture(scope="module")
def fp32_logits(checkpoint):
    model = load_model(checkpoint, None, "cpu", progress=False)
    with torch.no_grad():
        return model(PROMPT)


PROMPT = torch.tensor([[3, 17, 42, 99, 7, 250, 11, 64, 128, 5]])


def greedy(model, prompt: torch.Tensor, steps: int, cached: bool) -> list[int]:
    """Greedy tokens after `prompt` (1, T): with the KV cache (prefill + one token per step) or recomputing all."""
    device = prompt.device
    tokens = prompt[0].tolist()
    with torch.no_grad():
        if cached:
            model.set_kv_cache(1, max_seq_length=len(tokens) + steps)
            logits = model(prompt, torch.arange(len(tokens), device=device), len(tokens))
            for _ in range(steps):
                tokens.append(int(logits[0, -1].argmax()))
                pos = torch.tensor([len(tokens) - 1], device=device)
                logits = model(torch.tensor([[tokens[-1]]], device=device), pos, len(tokens))
            model.clear_kv_cache()
        else:
            for _ in range(steps):
                tokens.append(int(model(torch.tensor([tokens], device=device))[0, -1].argmax()))
    return tokens[prompt.shape[1] :]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ALL_MODES)
def test_tiny_gpt_logits_and_greedy_generation(mode, device, checkpoint, fp32_logits):
    plugin = resolve("32-true", f"bnb.{mode}", device)
    model = load_model(checkpoint, plugin, device, progress=False)
    linears = [
        n for n, m in model.named_modules() if isinstance(m, (nn.Linear, bl.Linear4bit, bl.Linear8bit))
    ]
    quantized = [n for n, m in model.named_modules() if isinstance(m, (bl.Linear4bit, bl.Linear8bit))]
    assert quantized == [n for n in linears if n.startswith("transformer.h.")] and len(quantized) == 10
    assert type(model.lm_head) is nn.Linear and model.transformer.wte.weight.dtype == torch.float32
    with torch.no_grad():
        logits = model(PROMPT.to(device)).cpu()

    # the same GPT in fp32 with every quantized weight replaced by its dequantized value
    reference = load_model(checkpoint, None, device, progress=False)
    with torch.no_grad():
        for name in quantized:
            reference.get_submodule(name).weight.copy_(model.get_submodule(name).dequantize(torch.float32))
        dequantized_logits = reference(PROMPT.to(device)).cpu()
    if mode == "int8":  # LLM.int8 also quantizes the inputs of each layer
        assert rel(logits, dequantized_logits) < 0.02
    else:
        torch.testing.assert_close(logits, dequantized_logits, rtol=1e-4, atol=1e-4)

    assert rel(logits, fp32_logits) < GPT_BOUND[mode]
    assert greedy(model, PROMPT.to(device), 8, cached=True) == greedy(
        model, PROMPT.to(device), 8, cached=False
    )


def test_tiny_gpt_bf16_and_quantized_lm_head(checkpoint, fp32_logits):
    plugin = resolve("bf16-true", "bnb.nf4", "cpu", quantize_lm_head=True)
    model = load_model(checkpoint, plugin, "cpu", progress=False)
    assert isinstance(model.lm_head, bl.Linear4bit) and model.transformer.wte.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(PROMPT)
    assert logits.dtype == torch.bfloat16 and rel(logits.float(), fp32_logits) < GPT_BOUND["nf4"] + 0.05
    assert len(greedy(model, PROMPT, 4, cached=True)) == 4


def test_weight_bytes_count_packed_weights_and_constants(checkpoint):
    model = load_model(checkpoint, resolve("32-true", "bnb.nf4", "cpu"), "cpu", progress=False)
    layers = [m for m in model.modules() if isinstance(m, bl.Linear4bit)]
    by = weight_bytes_by_dtype(model)
    assert by["uint8"] == sum((m.in_features * m.out_features + 1) // 2 for m in layers)
    unquantized = sum(p.numel() for n, p in model.named_parameters()) * 4
    assert by["float32"] == unquantized + sum(4 * m.num_blocks for m in layers)


# ---- pre-quantized files ---------------------------------------------------------------------------------


def state_of(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


@pytest.mark.parametrize("mode", ["nf4-dq", "fp4", "int8"])
def test_prequantized_file_round_trip_is_bit_identical(mode, tmp_path):
    from litquant.jobs.quantize import bnb as quantize_bnb

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=1)
    path = quantize_bnb(ckpt, mode=f"bnb.{mode}" if mode == "fp4" else mode)
    assert path.name == f"lit_model_bnb.{mode}.safetensors"
    meta = safetensors_metadata(path)
    assert meta["mode"] == mode and meta["dtype"] == "source"
    if mode != "int8":
        assert meta["blocksize"] == "64" and meta["double_quant"] == str(mode.endswith("-dq")).lower()
    source_size = (ckpt / WEIGHTS_FILE).stat().st_size
    assert path.stat().st_size < source_size / (2.5 if mode != "int8" else 2)

    on_load = resolve("32-true", f"bnb.{mode}", "cpu")
    on_load.use_prequantized = False
    reference = load_model(ckpt, on_load, "cpu", progress=False)
    plugin = resolve("32-true", f"bnb.{mode}", "cpu")
    assert plugin.load_plan(ckpt).weights_file == path.name
    loaded = load_model(ckpt, plugin, "cpu", progress=False)
    a, b = state_of(reference), state_of(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with torch.no_grad():
        assert torch.equal(reference(PROMPT), loaded(PROMPT))

    if mode == "int8":  # int8-training stores the same thing
        assert resolve("32-true", "bnb.int8-training", "cpu").load_plan(ckpt).weights_file == path.name
    assert (
        resolve("32-true", f"bnb.{mode}", "cpu", quantize_lm_head=True).load_plan(ckpt).weights_file
        == WEIGHTS_FILE
    )


def test_prequantized_file_staleness_and_dtype(tmp_path, capsys):
    from litquant.jobs.quantize import bnb as quantize_bnb

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=2)
    quantize_bnb(ckpt, mode="nf4", precision="bf16-true")
    assert "Memory used:" in capsys.readouterr().err
    name = "lit_model_bnb.nf4.safetensors"
    assert resolve("bf16-true", "bnb.nf4", "cpu").load_plan(ckpt).weights_file == name
    # embeddings kept in bf16
    assert resolve("32-true", "bnb.nf4", "cpu").load_plan(ckpt).weights_file == WEIGHTS_FILE

    source = ckpt / WEIGHTS_FILE
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the source changed after quantizing
    plan = resolve("bf16-true", "bnb.nf4", "cpu").load_plan(ckpt)
    assert plan.weights_file == WEIGHTS_FILE and "stale" in plan.note  # load_model prints the note

    source.unlink()  # without the source, a file that does not fit is an error, not a silent fallback
    assert resolve("bf16-true", "bnb.nf4", "cpu").load_plan(ckpt).weights_file == name
    with pytest.raises(UserError, match="litquant quantize bnb"):
        resolve("32-true", "bnb.nf4", "cpu").load_plan(ckpt).weights_file
    with pytest.raises(UserError, match="nf4-dq"):
        quantize_bnb(ckpt, mode="nf3")


def test_prequantized_file_from_another_mode_is_rejected(tmp_path):
    from litquant.jobs.quantize import bnb as quantize_bnb

    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3)
    quantize_bnb(ckpt, mode="nf4")
    (ckpt / "lit_model_bnb.nf4.safetensors").rename(ckpt / "lit_model_bnb.nf4-dq.safetensors")
    plugin = resolve("32-true", "bnb.nf4-dq", "cpu")
    assert plugin.load_plan(ckpt).weights_file == WEIGHTS_FILE  # the metadata says nf4
    plan = plugin.load_plan(ckpt)  # force the file: the tensors do not fit
    plugin.load_plan = lambda d: dataclasses.replace(plan, weights_file="lit_model_bnb.nf4-dq.safetensors")
    with pytest.raises(UserError, match="nf4-dq layer needs uint8"):
        load_model(ckpt, plugin, "cpu", progress=False)


# ---- loading memory -----------------------------------------------------------------------------------------


def _live_float_tensors(shapes: set, exclude: set) -> int:
    """Live float tensors (anywhere in the process) with a full-precision Linear weight's shape, minus `exclude`."""
    seen = set()
    for obj in gc.get_objects():
        # type() rather than isinstance: no __class__ lookups on arbitrary objects (some warn when touched)
        if (
            type(obj) in (torch.Tensor, nn.Parameter)
            and not obj.is_meta
            and obj.is_floating_point()
            and tuple(obj.shape) in shapes
            and id(obj) not in exclude
        ):
            seen.add(obj.untyped_storage().data_ptr())
    return len(seen)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_loading_holds_one_full_precision_layer_at_a_time(mode, tmp_path, monkeypatch):
    # sizes no other test uses, so the census only sees this checkpoint's tensors
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=4, n_layer=3, n_embd=160, intermediate_size=352)
    config = Config.from_name("tiny-llama-test", n_layer=3, n_embd=160, intermediate_size=352)
    shapes = {(160 * 2, 160), (160, 160), (352, 160), (160, 352)}  # qkv (GQA), proj, fc_1/fc_2, mlp.proj
    assert config.head_size * (config.n_head + 2 * config.n_query_groups) == 320

    probe = [torch.zeros(160, 160), torch.zeros(352, 160)]  # the census itself works
    assert _live_float_tensors(shapes, set()) >= 2
    del probe

    counts = []
    cls = bl.Linear4bit if mode == "nf4" else bl.Linear8bit
    original = cls.quantize_

    def counting_quantize(self, weight):
        original(self, weight)
        counts.append(_live_float_tensors(shapes, set()))

    monkeypatch.setattr(cls, "quantize_", counting_quantize)
    load_model(ckpt, resolve("32-true", f"bnb.{mode}", "cpu"), "cpu", progress=False)
    assert len(counts) == 3 * 5
    # after each quantization only the tensor just read from the file is alive in full precision
    assert max(counts) <= 1


@CUDA
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_cuda_loading_peak_stays_near_quantized_size(mode, tmp_path):
    ckpt = make_checkpoint(
        tmp_path / "ckpt", seed=5, n_layer=8, n_embd=512, intermediate_size=1376, n_head=8, n_query_groups=8
    )
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(ckpt, resolve("bf16-true", f"bnb.{mode}", "cuda"), "cuda", progress=False)
    torch.cuda.synchronize()
    final = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    largest_fp32_layer = 1376 * 512 * 4
    assert peak <= final + 3 * largest_fp32_layer
    full = sum(m.in_features * m.out_features * 2 for m in model.modules() if isinstance(m, bl._QuantLinear))
    assert final < full  # and the quantized model is smaller than its bf16 linears alone
