"""`litquant quantize gptq` (quantize/gptq.py), the gptq.* plugins and the calibration data.

Quality is measured on the bundled model and its held-out text (GPTQ against round-to-nearest with the same
quantizer); the walk itself (true-sequential order, inputs through the quantized blocks, one block on the
device at a time) against a reference written here on a fully materialised model.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn
from conftest import REPO, SAMPLE_TEXT, make_checkpoint, run_cli
from safetensors.torch import load_file

import litquant.quantization.gptq_model as gptq_model
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, WEIGHTS_FILE, build_model, load_model
from litquant.config import Config
from litquant.data.calibration import calibration_tokens, load_documents
from litquant.errors import UserError
from litquant.jobs import quantize as job
from litquant.precision import quantize_modes, resolve
from litquant.quantization import cpu_kernels, gptq_format
from litquant.quantization.gptq import GPTQ, rtn_quantize
from litquant.quantization.gptq_linear import GPTQLinear
from litquant.quantization.modes import get_mode
from litquant.tokenizer import Tokenizer

QUIET = dict(accelerator="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("gptq") / "tiny", seed=3)


def _dense_with(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Put dequantized weights into a full-precision model's Linears."""
    for name, w in weights.items():
        model.get_submodule(name).weight.data = w.to(model.get_submodule(name).weight.dtype)
    return model


def _dequantized(path, bits: int) -> dict[str, torch.Tensor]:
    sd = load_file(path)
    mods = sorted(k[: -len(".qweight")] for k in sd if k.endswith(".qweight"))
    return {
        m: gptq_format.dequantize(
            sd[f"{m}.qweight"], sd[f"{m}.qzeros"], sd[f"{m}.scales"], sd[f"{m}.g_idx"], bits
        )
        for m in mods
    }


# ------------------------------------------------------------------------------------ quality (bundled model)

needs_bundled = pytest.mark.skipif(
    not (DEFAULT_CHECKPOINT_DIR / WEIGHTS_FILE).is_file(),
    reason="the bundled checkpoints/litquant-tiny is not there",
)
# act-order with 128 windows: on the bundled model the perplexity gaps below are small (RTN-4 costs ~0.3%), so the
# calibration sample matters; measured over seeds 0-3 the GPTQ/RTN gap ratio was 0.12-0.78 at 4 bits and 0.42-0.55
# at 3 bits, the KL ratio 0.44-0.46 and 0.47-0.49 (n_samples=32 without act-order: 4-bit ratio up to 1.2)
# asymmetric, like the RTN baseline below (rtn_quantize): the same grid for both
Q = dict(group_size=128, act_order=True, sym=False, n_samples=128, seq_len=256, seed=0, precision="32-true")


@pytest.fixture(scope="module")
def bundled_gptq(tmp_path_factory):
    """The bundled model quantized at 4 and 3 bits with groups of 128 (keys 4, 3), and at 3 bits with one group
    per output channel (key "3pc", the paper's main setting), each in its own output dir."""
    out = {}
    for key, bits, group_size in ((4, 4, 128), (3, 3, 128), ("3pc", 3, -1)):
        d = tmp_path_factory.mktemp(f"bundled{key}")
        job.gptq(DEFAULT_CHECKPOINT_DIR, bits=bits, output_dir=d, **{**Q, "group_size": group_size}, **QUIET)
        out[key] = d
    return out


@torch.inference_mode()
def _ppl_and_kl(models: dict[str, nn.Module], tokens: torch.Tensor, window: int = 256) -> dict[str, tuple]:
    """Per model: (perplexity, mean KL(fp || model) per token) over non-overlapping windows; "fp" is the reference."""
    x = tokens[: tokens.numel() // window * window].view(-1, window)
    nll, kl, n = dict.fromkeys(models, 0.0), dict.fromkeys(models, 0.0), 0
    for b in x.split(16):
        ref = torch.log_softmax(models["fp"](b[:, :-1]).float(), -1)
        for name, m in models.items():
            lq = ref if name == "fp" else torch.log_softmax(m(b[:, :-1]).float(), -1)
            nll[name] += float(-lq.gather(-1, b[:, 1:, None]).sum())
            kl[name] += float((ref.exp() * (ref - lq)).sum())
        n += b[:, 1:].numel()
    return {k: (math.exp(nll[k] / n), kl[k] / n) for k in models}


@needs_bundled
def test_gptq_beats_rtn_on_heldout_perplexity(bundled_gptq):
    """The paper's pattern on the bundled model's held-out text. Measured (fp 47.09): g128 4-bit RTN 47.21, GPTQ
    47.08; g128 3-bit RTN 47.67, GPTQ 47.39; per-channel 3-bit RTN 47.90, GPTQ 47.36 (KL to fp 0.030 vs 0.014).
    A 5M model with 256-wide layers loses little even to RTN at g128 (two groups per row), so the widest gap
    shows where the paper measures it: 3 bits, per channel."""
    from litquant.data.corpus import heldout_text

    tokens = Tokenizer(DEFAULT_CHECKPOINT_DIR).encode(heldout_text(), bos=False)
    src = load_file(DEFAULT_CHECKPOINT_DIR / WEIGHTS_FILE)
    models = {"fp": load_model(DEFAULT_CHECKPOINT_DIR, progress=False)}
    for key, bits, group_size in ((4, 4, 128), (3, 3, 128), ("3pc", 3, -1)):
        file = bundled_gptq[key] / f"lit_model_gptq.{bits}bit.safetensors"
        rtn = {
            m: rtn_quantize(src[m + ".weight"].float(), bits, group_size).weight
            for m in _dequantized(file, bits)
        }
        models[f"rtn{key}"] = _dense_with(load_model(DEFAULT_CHECKPOINT_DIR, progress=False), rtn)
        models[f"gptq{key}"] = load_model(
            bundled_gptq[key], resolve("32-true", f"gptq.int{bits}"), progress=False
        )
    result = _ppl_and_kl(models, tokens)
    print({k: (round(p, 4), round(kl, 5)) for k, (p, kl) in result.items()})
    gap = {k: abs(p - result["fp"][0]) for k, (p, _) in result.items()}  # GPTQ-4 can land a hair below fp
    kl = {k: v for k, (_, v) in result.items()}
    # 4 bit, g128: GPTQ is closer to full precision than round-to-nearest with the same grid and groups
    assert gap["gptq4"] < gap["rtn4"] and kl["gptq4"] < 0.7 * kl["rtn4"], result
    # 3 bit: RTN degrades several times more than at 4 bits; GPTQ keeps well under 60% of that at g128, and
    # per channel RTN loses at least 2.5x the perplexity GPTQ does (measured 3.0x) and twice its KL
    assert gap["rtn3"] > 3 * gap["rtn4"], result
    assert gap["gptq3"] < 0.6 * gap["rtn3"] and kl["gptq3"] < 0.6 * kl["rtn3"], result
    assert gap["gptq3pc"] < gap["rtn3pc"] / 2.5 and kl["gptq3pc"] < 0.55 * kl["rtn3pc"], result
    assert gap["gptq4"] < gap["gptq3"], result


@needs_bundled
@pytest.mark.parametrize("bits", [4, 3])
def test_per_layer_output_error_below_rtn_on_calibration_inputs(bundled_gptq, bits):
    """||X (W - Ŵ)ᵀ||² for every quantized layer, X = that layer's inputs on the calibration windows in the
    quantized model (what true-sequential GPTQ saw), for GPTQ's Ŵ and for round-to-nearest's."""
    tokens = calibration_tokens(
        Tokenizer(DEFAULT_CHECKPOINT_DIR), Q["n_samples"], Q["seq_len"], None, Q["seed"]
    )
    src = load_file(DEFAULT_CHECKPOINT_DIR / WEIGHTS_FILE)
    model = load_model(
        bundled_gptq[bits], resolve("32-true", f"gptq.int{bits}", keep_source=True), progress=False
    )
    errors: dict[str, list[float]] = {}

    def hook(name, W, W_gptq, W_rtn):
        def fn(module, args, output):
            x = args[0].reshape(-1, W.shape[1])
            e = errors.setdefault(name, [0.0, 0.0])
            e[0] += float(((x @ (W - W_gptq).t()) ** 2).sum())
            e[1] += float(((x @ (W - W_rtn).t()) ** 2).sum())

        return fn

    for name, m in model.named_modules():
        if isinstance(m, GPTQLinear):
            W = src[name + ".weight"].float()
            m.register_forward_hook(hook(name, W, m.dequantized_weight(), rtn_quantize(W, bits, 128).weight))
    with torch.no_grad():
        for b in tokens.split(8):
            model(b)
    assert len(errors) == 5 * model.config.n_layer
    worse = {n: e for n, e in errors.items() if not e[0] < e[1]}
    assert not worse, worse
    ratio = sum(e[0] for e in errors.values()) / sum(e[1] for e in errors.values())
    assert ratio < 0.8, ratio


# ------------------------------------------------------------------------------------ the walk


def _reference_true_sequential(checkpoint, tokens, settings, batch_size):
    """True-sequential GPTQ on a fully materialised model: every step's Hessian from a full forward of the
    model whose earlier layers (this block's included) are already replaced by their quantized weights."""
    model = load_model(checkpoint, progress=False)
    out = {}
    for i, block in enumerate(model.transformer.h):
        for group in (("attn.qkv",), ("attn.proj",), ("mlp.fc_1", "mlp.fc_2"), ("mlp.proj",)):
            layers = {n: block.get_submodule(n) for n in group}
            gptqs = {n: GPTQ(layer.in_features) for n, layer in layers.items()}
            handles = [layer.register_forward_hook(gptqs[n].hook) for n, layer in layers.items()]
            with torch.no_grad():
                for b in tokens.split(batch_size):
                    model(b)
            for h in handles:
                h.remove()
            for n, layer in layers.items():
                r = gptqs[n].quantize(layer.weight, **settings)
                layer.weight.data = r.weight
                out[f"transformer.h.{i}.{n}"] = r.pack()
    return out


@pytest.mark.parametrize("act_order", [False, True])
def test_job_matches_true_sequential_reference_and_streams_one_block(tiny, tmp_path, monkeypatch, act_order):
    settings = dict(
        bits=4,
        group_size=64,
        sym=False,
        act_order=act_order,
        damp_percent=0.01,
        block_size=32,
        static_groups=False,
    )
    built, on_device = [], []
    real_build, real_load = gptq_model.build_model, gptq_model._load_block

    def build(config, device):
        built.append(real_build(config, device))
        return built[-1]

    def load_block(f, block, *args):
        stored = real_load(f, block, *args)
        model = built[-1]
        on_device.append(sum(any(not p.is_meta for p in b.parameters()) for b in model.transformer.h))
        assert model.transformer.wte.weight.is_meta and model.lm_head.weight.is_meta
        return stored

    monkeypatch.setattr(gptq_model, "build_model", build)
    monkeypatch.setattr(gptq_model, "_load_block", load_block)
    out = job.gptq(
        tiny,
        bits=4,
        group_size=64,
        act_order=act_order,
        sym=False,
        block_size=32,
        n_samples=12,
        seq_len=48,
        batch_size=4,
        output_dir=tmp_path,
        seed=7,
        precision="32-true",
        **QUIET,
    )
    assert on_device == [1, 1]  # each block is loaded alone, never the whole model

    tokens = calibration_tokens(Tokenizer(tiny), 12, 48, None, 7)
    ref = _reference_true_sequential(tiny, tokens, settings, batch_size=4)
    got = load_file(out)
    assert len(ref) == 10
    for module, tensors in ref.items():
        for attr, t in tensors.items():
            assert torch.equal(got[f"{module}.{attr}"], t), f"{module}.{attr}"
    if act_order:
        assert not torch.equal(got["transformer.h.0.attn.qkv.g_idx"], gptq_format.default_g_idx(128, 64))
    # everything that is not a quantized weight is copied as saved
    src = load_file(tiny / WEIGHTS_FILE)
    plain = {k for k in src if k.rpartition(".")[0] not in ref}
    assert plain == {k for k in got if k.rpartition(".")[0] not in ref}
    assert all(torch.equal(src[k], got[k]) for k in plain)
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qc == dict(
        bits=4,
        group_size=64,
        desc_act=act_order,
        sym=False,
        damp_percent=0.01,
        true_sequential=True,
        static_groups=False,
        quant_method="gptq",
        checkpoint_format="gptq",
    )
    assert (tmp_path / "model_config.yaml").is_file() and (tmp_path / "tokenizer.json").is_file()


def test_gptq_quantizes_the_stored_weights_not_the_calibration_dtype_copy(tiny, tmp_path, monkeypatch):
    """An fp32 checkpoint calibrated in bf16: the forward passes run in bf16, GPTQ gets the fp32 weights."""
    from litquant.quantization.gptq import GPTQ

    src = load_file(tiny / WEIGHTS_FILE)
    assert src["transformer.h.0.attn.qkv.weight"].dtype == torch.float32
    seen, real_quantize = [], GPTQ.quantize

    def quantize(self, weight, **kw):
        seen.append(weight)
        return real_quantize(self, weight, **kw)

    monkeypatch.setattr(GPTQ, "quantize", quantize)
    job.gptq(
        tiny, n_samples=4, seq_len=32, group_size=64, precision="bf16-true", output_dir=tmp_path, **QUIET
    )
    assert len(seen) == 10 and all(w.dtype == torch.float32 for w in seen)
    assert torch.equal(seen[0], src["transformer.h.0.attn.qkv.weight"])


def test_not_true_sequential_uses_one_forward_per_block(tiny, tmp_path):
    """true_sequential=False: every Linear's Hessian from the block's unquantized forward; mlp.proj then
    differs from the true-sequential result (its inputs did not go through quantized fc_1/fc_2)."""
    a = load_file(job.gptq(tiny, n_samples=8, seq_len=32, group_size=64, output_dir=tmp_path / "a", **QUIET))
    b = load_file(
        job.gptq(
            tiny,
            n_samples=8,
            seq_len=32,
            group_size=64,
            true_sequential=False,
            output_dir=tmp_path / "b",
            **QUIET,
        )
    )
    assert torch.equal(a["transformer.h.0.attn.qkv.qweight"], b["transformer.h.0.attn.qkv.qweight"])
    assert not torch.equal(a["transformer.h.0.mlp.proj.qweight"], b["transformer.h.0.mlp.proj.qweight"])
    assert json.loads((tmp_path / "b" / "quantize_config.json").read_text())["true_sequential"] is False


# ------------------------------------------------------------------------------------ CLI end to end


def test_cli_quantize_then_generate_with_gptq_int4(tiny, tmp_path):
    out = tmp_path / "q"
    p = run_cli(
        "quantize",
        "gptq",
        "--checkpoint_dir",
        str(tiny),
        "--n_samples",
        "8",
        "--seq_len",
        "32",
        "--group_size",
        "64",
        "--act_order",
        "true",
        "--output_dir",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    assert re.search(r"Time for quantization: [\d.]+ sec total", p.stderr)
    assert re.search(r"Memory used: \d+\.\d\d GB", p.stderr)
    assert (out / "lit_model_gptq.4bit.safetensors").is_file() and not (out / WEIGHTS_FILE).exists()

    g = run_cli(
        "generate",
        "--checkpoint_dir",
        str(out),
        "--quantize",
        "gptq.int4",
        "--prompt",
        "The",
        "--max_new_tokens",
        "10",
        "--temperature",
        "0",
        "--precision",
        "32-true",
    )
    assert g.returncode == 0, g.stderr
    assert re.search(r"Time for inference 1: [\d.]+ sec total, [\d.]+ tokens/sec", g.stderr)
    assert "int32" in g.stderr.split("Weights:")[1].splitlines()[0]  # the packed storage is what is held

    # reference: a dense fp32 model with the dequantized weights, greedy, full forward per token, no KV cache
    tok = Tokenizer(tiny)
    model = _dense_with(
        load_model(tiny, progress=False), _dequantized(out / "lit_model_gptq.4bit.safetensors", 4)
    )
    ids = tok.encode("The")
    with torch.no_grad():
        for _ in range(10):
            nxt = int(model(ids[None])[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([nxt])])
            if nxt in tok.stop_ids:
                break
    assert g.stdout.rstrip("\n") == tok.decode(ids)


def test_bad_flags_are_one_line_errors(tiny):
    p = run_cli("quantize", "gptq", "--checkpoint_dir", str(tiny), "--bits", "5")
    assert p.returncode == 1
    assert p.stderr.strip() == "error: --bits must be one of 2, 3, 4, 8, got 5"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(group_size=0), "--group_size must be a positive integer or -1"),
        (dict(damp_percent=2.0), r"--damp_percent must be in \[0, 1\]"),
        (dict(n_samples=0), "--n_samples must be at least 1"),
        (dict(seq_len=100000), r"--seq_len must be in \[2, 64\]"),
        (dict(calibration_data="/no/such/file.txt"), "--calibration_data '/no/such/file.txt' does not exist"),
        (dict(checkpoint_dir="/no/such/dir"), "checkpoint directory '/no/such/dir' does not exist"),
        (dict(output_dir=__file__), r"--output_dir .*: cannot create it"),  # a file, found before any work
    ],
)
def test_bad_values_raise_user_errors(tiny, kwargs, message):
    kwargs = {"checkpoint_dir": tiny, **kwargs}
    with pytest.raises(UserError, match=message):
        job.gptq(**kwargs, **QUIET)


def test_unpackable_shapes_fail_before_any_work(tmp_path):
    d = make_checkpoint(tmp_path / "odd", n_embd=80, n_head=4, n_query_groups=4, intermediate_size=160)
    with pytest.raises(UserError, match=r"attn\.qkv: cannot pack a 3-bit GPTQ layer with in_features=80"):
        job.gptq(d, bits=3, group_size=32, n_samples=2, seq_len=16, **QUIET)


# ------------------------------------------------------------------------------------ the plugins


def test_registry_names_and_honest_help():
    modes = quantize_modes()
    assert {"gptq.int2", "gptq.int3", "gptq.int4", "gptq.int8"} <= set(modes)
    assert "int4" in get_mode("gptq.int4").help and "kernel" in get_mode("gptq.int4").help
    for b in (2, 3, 8):
        assert "dequantize" in get_mode(f"gptq.int{b}").help
    with pytest.raises(UserError, match="unknown option"):
        resolve("32-true", "gptq.int4", bogus=1)


@pytest.mark.parametrize(
    "bits,precision", [(4, "32-true"), (4, "bf16-true"), (3, "32-true"), (8, "32-true"), (2, "32-true")]
)
def test_plugin_loads_into_gptq_linears_matching_dequantized_reference(tiny, tmp_path, bits, precision):
    out = job.gptq(
        tiny, bits=bits, group_size=64, act_order=True, n_samples=6, seq_len=32, output_dir=tmp_path, **QUIET
    )
    plugin = resolve(precision, f"gptq.int{bits}")
    dtype = plugin.dtype
    model = load_model(tmp_path, plugin, progress=False)
    quantized = {n for n, m in model.named_modules() if isinstance(m, GPTQLinear)}
    assert quantized == {k[: -len(".qweight")] for k in load_file(out) if k.endswith(".qweight")}
    assert len(quantized) == 10 and isinstance(model.lm_head, nn.Linear)
    layers = [model.get_submodule(n) for n in quantized]
    # repacked for torch's int4 kernel at load, AutoGPTQ qweight released (AVX2 builds: litquant's int16 kernel
    # takes bf16 activations on the AutoGPTQ layout, nothing repacked)
    if bits == 4 and dtype == torch.bfloat16 and not (cpu_kernels.lib() is not None and cpu_kernels.i16()):
        assert all(m._kernel is not None and m.qweight is None for m in layers)
    # fp32: litquant's kernel reads qweight as it is, one copy
    elif bits == 4 and cpu_kernels.lib() is not None:
        assert all(m._kernel is None and m.qweight is not None for m in layers)
        assert all(m._c_kernel_ok(torch.empty(1, m.in_features)) for m in layers)
    ref = _dense_with(load_model(tiny, resolve(precision), progress=False), _dequantized(out, bits))
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, y_ref = model(ids), ref(ids)
    assert y.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()) < tol


def test_keep_source_allows_training_through_the_base(tiny, tmp_path):
    job.gptq(tiny, n_samples=6, seq_len=32, group_size=64, output_dir=tmp_path, **QUIET)
    model = load_model(tmp_path, resolve("32-true", "gptq.int4", keep_source=True), progress=False)
    layer = model.transformer.h[0].attn.qkv
    x = torch.randn(3, 128, requires_grad=True)
    assert layer.qweight is not None and (layer._kernel is not None or layer._c_kernel_ok(x))
    layer(x).pow(2).sum().backward()
    W = layer.dequantized_weight()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ W.t() + layer.bias if layer.bias is not None else x2 @ W.t()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)


def test_plugin_errors(tiny, tmp_path):
    with pytest.raises(UserError, match=r"has no lit_model_gptq\.4bit\.safetensors.*litquant quantize gptq"):
        load_model(tiny, resolve("32-true", "gptq.int4"), progress=False)
    job.gptq(tiny, bits=8, n_samples=4, seq_len=16, group_size=64, output_dir=tmp_path, **QUIET)
    with pytest.raises(UserError, match=r"found: lit_model_gptq\.8bit\.safetensors"):
        load_model(tmp_path, resolve("32-true", "gptq.int4"), progress=False)
    with pytest.raises(UserError, match="no quantized lm_head"):
        load_model(tmp_path, resolve("32-true", "gptq.int8", quantize_lm_head=True), progress=False)
    # a file renamed to another bit width: its header says 8 bits
    (tmp_path / "lit_model_gptq.8bit.safetensors").rename(tmp_path / "lit_model_gptq.4bit.safetensors")
    with pytest.raises(UserError, match="quantized with 8 bits but --quantize gptq.int4 needs 4"):
        load_model(tmp_path, resolve("32-true", "gptq.int4"), progress=False)


def test_quantized_lm_head_in_file_is_loaded(tiny, tmp_path):
    """A file that quantizes lm_head too (some GPTQ exports do): the plugin swaps it because the file says so."""
    job.gptq(tiny, n_samples=4, seq_len=16, group_size=64, output_dir=tmp_path, **QUIET)
    path = tmp_path / "lit_model_gptq.4bit.safetensors"
    from litquant.io import safetensors_metadata, save_safetensors

    sd, meta = load_file(path), safetensors_metadata(path)
    r = rtn_quantize(sd.pop("lm_head.weight").float(), 4, 64)
    sd.update({f"lm_head.{k}": v for k, v in r.pack().items()})
    save_safetensors(sd, path, metadata=meta)
    model = load_model(tmp_path, resolve("32-true", "gptq.int4", quantize_lm_head=True), progress=False)
    assert isinstance(model.lm_head, GPTQLinear)
    ids = torch.randint(0, 200, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            model.lm_head(torch.ones(1, 128)), torch.ones(1, 128) @ r.weight.t(), rtol=1e-4, atol=1e-4
        )
        assert model(ids).shape == (1, 8, model.config.padded_vocab_size)


# ------------------------------------------------------------------------------------ calibration data


def test_calibration_windows_come_from_the_text_and_are_seeded(tiny, tmp_path):
    tok = Tokenizer(tiny)
    f = tmp_path / "calib.txt"
    f.write_text(SAMPLE_TEXT)
    a = calibration_tokens(tok, 6, 20, f, seed=1)
    assert a.shape == (6, 20) and a.dtype == torch.long
    assert torch.equal(a, calibration_tokens(tok, 6, 20, f, seed=1))
    assert not torch.equal(a, calibration_tokens(tok, 6, 20, f, seed=2))
    stream = tok.encode(SAMPLE_TEXT, bos=False).tolist() + [tok.eos_id]
    windows = {tuple(stream[i : i + 20]) for i in range(len(stream) - 19)}
    assert all(tuple(w) in windows for w in a.tolist())


def test_calibration_json_jsonl_and_directories(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first document\nwith two lines\n")
    (tmp_path / "d" / "b.jsonl").write_text(
        json.dumps({"text": "second", "id": 1}) + "\n" + json.dumps({"text": "third", "id": 2}) + "\n"
    )
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01")
    docs = load_documents(tmp_path / "d")
    assert sorted(docs) == ["first document\nwith two lines\n", "second", "third"]
    (tmp_path / "c.json").write_text(json.dumps([{"text": "x y z"}, {"text": "w"}]))
    assert load_documents(tmp_path / "c.json") == ["x y z", "w"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"content": "no text field"}) + "\n")
    with pytest.raises(UserError, match="has no 'text' field"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no .txt"):
        load_documents(tmp_path / "empty")


def test_calibration_too_little_text(tiny, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("a few words")
    with pytest.raises(UserError, match="fewer than one window"):
        calibration_tokens(Tokenizer(tiny), 4, 64, f)


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "name,model", [("gptq-litquant-tiny", "litquant-tiny"), ("gptq-llama-2-7b", "Llama-2-7b-hf")]
)
def test_config_hub_files_parse_and_fit_their_model(name, model):
    from conftest import REPO
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(job.gptq)
    cfg = parser.parse_args(["--config", str(REPO / "config_hub" / "quantize" / f"{name}.yaml")])
    config = Config.from_name(model)
    assert cfg.seq_len <= config.block_size
    gptq_model.check_shapes(config, cfg.bits)  # every Linear packs at this bit width
    block = build_model(config).transformer.h[0]
    assert all(m.in_features % cfg.group_size == 0 for m in block.modules() if isinstance(m, nn.Linear))


# ------------------------------------------------------------------------------------ defaults, gate, memory


def test_defaults_sym_calibration_and_the_quality_gate(tiny, tmp_path, capsys):
    """Without flags: symmetric (AutoGPTQ's default), a calibration size chosen and said, and a quality gate whose
    two perplexities are those of the base model and of the written GPTQ file, scored independently."""
    from litquant.evaluation import load_text, perplexity, text_tokens

    job.gptq(tiny, output_dir=tmp_path, precision="32-true", eval_tokens=300, **QUIET)
    err = capsys.readouterr().err
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qc["sym"] is True and qc["desc_act"] is False and qc["bits"] == 4
    n, t = map(int, re.search(r"Calibration: (\d+) x (\d+) tokens", err).groups())
    assert 8 <= n <= 128 and t == min(Config.from_checkpoint(tiny).block_size, 512)
    m = re.search(
        r"Quality gate: held-out perplexity ([\d.e+]+) quantized vs ([\d.e+]+) base .*, (\d+) tokens", err
    )
    assert m, err
    quant, base, scored = float(m.group(1)), float(m.group(2)), int(m.group(3))
    # the same windows scored by the evaluator: non-overlapping windows of the calibration length, tail dropped
    ids = text_tokens(Tokenizer(tiny), load_text(None)[0], 300)
    w = min(t, ids.numel())
    ids = ids[: ids.numel() // w * w]
    ref_base = perplexity(load_model(tiny, resolve("32-true"), progress=False), ids, w, w)
    ref_quant = perplexity(load_model(tmp_path, resolve("32-true", "gptq.int4"), progress=False), ids, w, w)
    assert scored == ref_base["tokens"]
    assert abs(base / ref_base["perplexity"] - 1) < 1e-3
    assert abs(quant / ref_quant["perplexity"] - 1) < 2e-3
    assert quant != base


def test_eval_tokens_zero_skips_the_gate_and_bad_values(tiny, tmp_path, capsys):
    job.gptq(tiny, n_samples=4, seq_len=32, eval_tokens=0, output_dir=tmp_path, **QUIET)
    assert "Quality gate" not in capsys.readouterr().err
    with pytest.raises(UserError, match="--eval_tokens"):
        job.gptq(tiny, n_samples=4, seq_len=32, eval_tokens=-3, output_dir=tmp_path, **QUIET)
    with pytest.raises(UserError, match="not found"):
        job.gptq(tiny, n_samples=4, seq_len=32, eval_data=tmp_path / "nope.txt", output_dir=tmp_path, **QUIET)


def gptq_memory_bound(
    config: Config, n_tokens: int, batch_tokens: int, bits: int, group_size: int, calib_bytes: int
) -> dict:
    """The README's formula for the peak of `quantize gptq` over the runtime: the quantized output, plus two blocks'
    weights in fp32, plus the calibration activations (the block inputs, and the attention's and MLP's cached
    `proj` inputs), plus one calibration batch on its way through a block (qkv, attention and MLP temporaries), plus
    GPTQ's working set for the widest layer (its Hessian, the Cholesky factor, the inverse and a temporary)."""
    block = build_model(config, "meta").transformer.h[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    one_block = sum(p.numel() for p in block.parameters()) * 4
    packed = sum(
        math.prod(s) * 4
        for m in linears
        for s in gptq_format.packed_shapes(m.in_features, m.out_features, bits, group_size).values()
    )
    activations = n_tokens * (2 * config.n_embd + config.intermediate_size) * calib_bytes
    batch = batch_tokens * (5 * config.n_embd + 3 * config.intermediate_size) * calib_bytes
    widest = max(m.in_features for m in linears)
    return dict(
        output=packed * config.n_layer,
        blocks=2 * one_block,
        activations=activations,
        batch=batch,
        gptq=4 * widest**2 * 4,
    )


_MEASURE_PEAK = """
import json, sys
from litquant.jobs import quantize as job
from litquant.utils import current_rss_bytes, peak_memory_bytes

ckpt, out = sys.argv[1], sys.argv[2]
# a small run first: the libraries' code (LAPACK, oneDNN, the kernels) pages in once per process; that is not the
# job's memory
job.gptq(ckpt, n_samples=2, seq_len=32, group_size=64, eval_tokens=0, precision="32-true", accelerator="cpu",
         output_dir=out + "/warm")
at_reset = []
real_reset = job.reset_peak_memory
job.reset_peak_memory = lambda d: (at_reset.append(current_rss_bytes()), real_reset(d))
job.gptq(ckpt, n_samples=32, seq_len=128, group_size=64, eval_tokens=0, precision="32-true", accelerator="cpu",
         output_dir=out + "/q")
print(json.dumps({"used": peak_memory_bytes("cpu") - at_reset[-1]}))
"""


def test_peak_memory_within_the_formula(tmp_path):
    """A model whose blocks dominate (4 x 7M-parameter blocks, a 320-token vocabulary): the job's resident-set
    peak over what the process held when quantization started (the job resets the peak there, once its calibration
    windows are made) stays within output + 2 blocks + activations. Measured in a fresh process, as a user runs it
    (what earlier tests left in this one's heap is not the job's), with glibc's mmap threshold fixed at 128 KiB: by
    default the threshold grows as tensors are freed, and then the heap keeps freed tensors resident, so the same job
    peaked anywhere in 185-270 MB from one process to the next. With the threshold fixed, every tensor returns to the
    OS when it is freed, and the peak is the job's live memory: 159.1-159.8 MB over 8 processes (Xeon, 2026-12-04)."""
    import subprocess
    import sys

    ckpt = make_checkpoint(
        tmp_path / "m",
        n_layer=4,
        n_embd=768,
        n_head=12,
        n_query_groups=4,
        intermediate_size=2048,
        block_size=128,
    )
    config = Config.from_checkpoint(ckpt)
    bound = sum(gptq_memory_bound(config, 32 * 128, 8 * 128, 4, 64, 4).values())
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE_PEAK, str(ckpt), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["used"]
    print(f"peak over start {peak / 1e6:.1f} MB, bound {bound / 1e6:.1f} MB")
    assert peak < bound, (peak, gptq_memory_bound(config, 32 * 128, 8 * 128, 4, 64, 4))
