"""LoRA layers over every base (nn.Linear, bnb 4-bit / int8, GPTQ) against written-out formulas; qkv masking;
targets and trainable parameters; adapter files; merging into the dequantized base; `merge_lora` and
`generate --lora_path` end to end."""

from __future__ import annotations

import math

import bitsandbytes.functional as BF  # noqa: E402
import pytest
import torch
import torch.nn as nn
from conftest import make_checkpoint, run_cli  # noqa: E402

from litquant.checkpoint import WEIGHTS_FILE, load_model  # noqa: E402
from litquant.config import Config  # noqa: E402
from litquant.errors import UserError  # noqa: E402
from litquant.jobs.merge_lora import main as merge_lora_job  # noqa: E402
from litquant.lora import (  # noqa: E402
    LORA_FILE,
    LoRAConfig,
    LoRALinear,
    add_lora,
    load_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    save_lora,
)
from litquant.model import GPT  # noqa: E402
from litquant.precision import resolve  # noqa: E402
from litquant.quantization import bnb_linear  # noqa: F401  (silences bnb's import-time warning first)
from litquant.quantization import gptq_format as fmt  # noqa: E402
from litquant.quantization.gptq_linear import GPTQLinear  # noqa: E402


def _randomize_b(module: nn.Module, seed: int = 0) -> None:
    """B starts at zero; give it values so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def _update(x: torch.Tensor, lora: LoRALinear) -> torch.Tensor:
    """x A^T B^T * alpha/r, written out (dropout off)."""
    return (x @ lora.lora_A.detach().t() @ lora.lora_B.detach().t()) * (lora.alpha / lora.r)


# ---- the layer over each base ---------------------------------------------------------------------------------


def test_lora_over_linear_matches_formula_and_starts_at_zero():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    lora = LoRALinear(base, r=4, alpha=8, dropout=0.0)
    x = torch.randn(5, 32)
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the base at init
    assert lora.lora_A.abs().sum() > 0  # A is initialised (kaiming), not zero
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert lora.lora_A.abs().max() <= bound + 1e-6
    _randomize_b(lora)
    ref = x @ base.weight.t() + base.bias + _update(x, lora)
    torch.testing.assert_close(lora(x), ref, rtol=1e-5, atol=1e-6)


def _bnb_layer(mode: str, w: torch.Tensor, b: torch.Tensor):
    plugin = resolve("32-true", f"bnb.{mode}", "cpu")
    holder = nn.Sequential(nn.Linear(w.shape[1], w.shape[0]))
    with torch.no_grad():
        holder[0].weight.copy_(w)
        holder[0].bias.copy_(b)
    plugin.convert_module(holder)
    return holder[0]


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "int8-training"])
def test_lora_over_bnb_base_matches_reference_weight(mode):
    """Output and gradients against x @ W_ref^T with W_ref made by bitsandbytes' own functions (4-bit) or by the
    LLM.int8 row-absmax formula (int8)."""
    torch.manual_seed(1)
    w, b = torch.randn(64, 128) * 0.05, torch.randn(64) * 0.1
    base = _bnb_layer(mode, w, b)
    if mode == "int8-training":
        absmax = w.abs().amax(dim=1, keepdim=True)
        w_ref = torch.round(w * 127 / absmax) * absmax / 127
    else:
        packed, qs = BF.quantize_4bit(
            w, blocksize=64, quant_type="nf4", compress_statistics=mode.endswith("-dq")
        )
        w_ref = BF.dequantize_4bit(packed, qs)
    lora = LoRALinear(base, r=8, alpha=16, dropout=0.0)
    _randomize_b(lora)
    x = torch.randn(6, 128, requires_grad=True)
    y = lora(x)
    ref_x = x.detach().clone().requires_grad_(True)
    A = lora.lora_A.detach().clone().requires_grad_(True)
    B = lora.lora_B.detach().clone().requires_grad_(True)
    ref = ref_x @ w_ref.t() + b + (ref_x @ A.t() @ B.t()) * 2.0
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(lora.lora_A.grad, A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lora.lora_B.grad, B.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-4)  # through the frozen quantized base


def test_lora_over_gptq_base_matches_weight_from_codes():
    g = torch.Generator().manual_seed(2)
    in_f, out_f, bits, gs = 128, 64, 4, 32
    q = torch.randint(0, 16, (out_f, in_f), generator=g)
    zeros = torch.randint(1, 17, (in_f // gs, out_f), generator=g)
    scales = (torch.rand(in_f // gs, out_f, generator=g) * 0.02 + 0.005).half()
    g_idx = fmt.default_g_idx(in_f, gs)
    w_ref = scales.float().t()[:, g_idx.long()] * (q - zeros.t()[:, g_idx.long()]).float()
    base = GPTQLinear(in_f, out_f, bias=False, bits=bits, group_size=gs, dtype=torch.float32)
    base.load_state_dict(fmt.pack(q, zeros, scales, g_idx, bits), strict=False)
    base.prepare(keep_source=True)
    lora = LoRALinear(base, r=4, alpha=4, dropout=0.0)
    _randomize_b(lora)
    x = torch.randn(3, in_f, requires_grad=True)
    y = lora(x)
    torch.testing.assert_close(y, x.detach() @ w_ref.t() + _update(x.detach(), lora), rtol=1e-3, atol=1e-3)
    y.sum().backward()
    assert lora.lora_A.grad is not None and lora.lora_B.grad.abs().sum() > 0
    # merging dequantizes the GPTQ weight: the merged Linear is W_ref + B A * alpha/r
    holder = nn.Sequential(lora)
    merge_lora(holder)
    assert type(holder[0]) is nn.Linear
    torch.testing.assert_close(holder[0].weight, w_ref + lora.delta_weight(), rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(3)
    base = nn.Linear(16, 16)
    lora = LoRALinear(base, r=2, alpha=2, dropout=0.5)
    _randomize_b(lora)
    x = torch.randn(64, 16)
    lora.eval()
    torch.testing.assert_close(lora(x), base(x) + _update(x, lora))  # eval: no dropout
    lora.train()
    d = (lora(x) - base(x)).detach()
    assert not torch.allclose(d, _update(x, lora))  # train: dropout changes the update, not the base


# ---- qkv: only some of q/k/v -----------------------------------------------------------------------------------


def _tiny_gpt(name: str = "tiny-llama-test", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config.from_name(name))
    model.init_weights(std=0.05)
    return model


@pytest.mark.parametrize("parts", [("query", "value"), ("key",), ("query", "key", "value")])
def test_qkv_update_goes_to_the_enabled_rows_only(parts):
    model = _tiny_gpt()
    c = model.config
    flags = {p: p in parts for p in ("query", "key", "value")}
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, **flags))
    qkv = model.transformer.h[0].attn.qkv
    _randomize_b(model)
    sizes = {
        "query": c.n_head * c.head_size,
        "key": c.n_query_groups * c.head_size,
        "value": c.n_query_groups * c.head_size,
    }
    assert qkv.lora_B.shape[0] == sum(sizes[p] for p in parts)  # no rows for disabled parts
    x = torch.randn(2, 3, c.n_embd)
    base = qkv.base(x)
    out = qkv(x)
    start, upd, k = 0, _update(x, qkv), 0
    for p in ("query", "key", "value"):
        rows = slice(start, start + sizes[p])
        if p in parts:
            torch.testing.assert_close(out[..., rows], base[..., rows] + upd[..., k : k + sizes[p]])
            k += sizes[p]
        else:
            assert torch.equal(out[..., rows], base[..., rows])
        start += sizes[p]


@pytest.mark.parametrize(
    "name,mlp_names", [("tiny-llama-test", ["fc_1", "fc_2", "proj"]), ("tiny-pythia-test", ["fc", "proj"])]
)
def test_targets_and_trainable_parameters(name, mlp_names):
    model = _tiny_gpt(name)
    c = model.config
    cfg = LoRAConfig(r=4, query=True, key=False, value=True, projection=True, mlp=True, head=True)
    add_lora(model, cfg)
    mark_only_lora_as_trainable(model)
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    expected = sorted(
        [f"transformer.h.{i}.attn.{p}" for i in range(c.n_layer) for p in ("qkv", "proj")]
        + [f"transformer.h.{i}.mlp.{p}" for i in range(c.n_layer) for p in mlp_names]
        + ["lm_head"]
    )
    assert wrapped == expected
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.rpartition(".")[2] in ("lora_A", "lora_B") for n in trainable)
    # r * (in + enabled out rows) per wrapped layer
    qv = (c.n_head + c.n_query_groups) * c.head_size
    mlp = {
        "fc_1": (c.n_embd, c.intermediate_size),
        "fc_2": (c.n_embd, c.intermediate_size),
        "fc": (c.n_embd, c.intermediate_size),
        "proj": (c.intermediate_size, c.n_embd),
    }
    per_block = (
        4 * (c.n_embd + qv)
        + 4 * (c.n_head * c.head_size + c.n_embd)
        + sum(4 * sum(mlp[m]) for m in mlp_names)
    )
    assert sum(trainable.values()) == c.n_layer * per_block + 4 * (c.n_embd + c.padded_vocab_size)
    with pytest.raises(UserError, match="already has LoRA"):
        add_lora(model, cfg)


def test_only_adapters_train_over_a_quantized_base(tiny_checkpoint):
    model = load_model(tiny_checkpoint, resolve("32-true", "bnb.nf4", "cpu"), progress=False)
    add_lora(model, LoRAConfig(r=4, mlp=True))
    mark_only_lora_as_trainable(model)
    model.train()
    frozen = {
        n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()] if "lora_" not in n
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    losses = []
    for _ in range(5):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if n in frozen:
            assert torch.equal(t, frozen[n]), n


# ---- files and merging ----------------------------------------------------------------------------------------


def test_save_load_roundtrip_and_mismatch(tmp_path):
    model = _tiny_gpt()
    cfg = LoRAConfig(r=2, alpha=4, dropout=0.0, key=True)
    add_lora(model, cfg)
    _randomize_b(model)
    path = tmp_path / LORA_FILE
    save_lora(lora_state_dict(model), path, cfg, base_checkpoint_dir="somewhere")
    fresh = _tiny_gpt()  # same base weights (same seed)
    load_lora(fresh, tmp_path)  # the directory works too
    model.eval()
    fresh.eval()
    x = torch.randint(0, 256, (1, 10))
    assert torch.equal(model(x), fresh(x))
    assert fresh.lora_config == cfg
    other = _tiny_gpt("tiny-pythia-test")
    with pytest.raises(UserError, match="another base model"):
        load_lora(other, path)
    with pytest.raises(UserError, match="does not exist"):
        load_lora(_tiny_gpt(), tmp_path / "nope.safetensors")


def test_bad_lora_config_metadata_is_a_user_error(tmp_path):
    from litquant.io import save_safetensors
    from litquant.lora import lora_metadata, read_lora_metadata

    tensors = {"x": torch.zeros(1)}
    good = lora_metadata(LoRAConfig())
    for i, (value, message) in enumerate(
        [
            ("{not json", "lora_config in its metadata is not valid JSON"),
            ("[8, 16]", "lora_config: expected a JSON object, got list"),
            ('{"r": "8"}', "lora_config: r must be an integer, got '8'"),
            ('{"query": 1}', "lora_config: query must be true or false, got 1"),
            ('{"r": 0}', "lora_config: LoRA rank must be at least 1"),
        ]
    ):
        path = tmp_path / f"bad{i}.safetensors"
        save_safetensors(tensors, path, metadata={**good, "lora_config": value})
        with pytest.raises(UserError, match=message):
            read_lora_metadata(path)
    path = tmp_path / "other.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="not a litquant LoRA adapter file"):
        read_lora_metadata(path)


def test_merge_lora_releases_each_replaced_layer_before_the_next(monkeypatch):
    """No second copy of the Linears: when a layer is merged, the layers merged before it are gone."""
    import weakref

    import litquant.lora as lora_mod

    model = _tiny_gpt()
    add_lora(model, LoRAConfig(r=2, projection=True, mlp=True))
    alive = [weakref.ref(m) for m in model.modules() if isinstance(m, LoRALinear)]
    seen = []
    real = lora_mod.dequantized_weight

    def spy(module):
        seen.append(sum(r() is not None for r in alive))
        return real(module)

    monkeypatch.setattr(lora_mod, "dequantized_weight", spy)
    merge_lora(model, torch.bfloat16)
    assert seen == list(range(len(alive), 0, -1))
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "mlp" in n or "attn" in n)


@pytest.mark.parametrize("quantize", ["bnb.nf4", "none"])
def test_merge_lora_job_in_the_checkpoint_dtype_equals_the_fp32_route(tmp_path, quantize):
    """A bf16 base merges without an fp32 copy of the model (it loads in bf16) and gives the very tensors that
    loading in fp32, merging in fp32 and rounding the result to bf16 gives."""
    from safetensors.torch import load_file, save_file

    from litquant.lora import _merge_load_precision

    ckpt = make_checkpoint(tmp_path / "base", seed=6)
    assert _merge_load_precision(ckpt, None, torch.bfloat16, torch.device("cpu")) == "32-true"  # fp32 file
    weights = ckpt / WEIGHTS_FILE
    save_file(
        {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()},
        str(weights),
        metadata={"format": "pt", "litquant": "1"},
    )
    q = None if quantize == "none" else quantize
    assert _merge_load_precision(ckpt, q, torch.bfloat16, torch.device("cpu")) == "bf16-true"
    # bf16 -> fp16 rounds
    assert _merge_load_precision(ckpt, q, torch.float16, torch.device("cpu")) == "32-true"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the job merges
    model = load_model(ckpt, resolve("32-true", q, device), device, progress=False)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, mlp=True, head=True)
    add_lora(model, cfg)
    _randomize_b(model, seed=7)
    save_lora(
        lora_state_dict(model),
        tmp_path / "run" / LORA_FILE,
        cfg,
        base_checkpoint_dir=ckpt.resolve(),
        base_quantize=quantize,
        base_precision="32-true",
    )
    merge_lora(model)  # the reference: fp32 throughout, rounded to the checkpoint's bf16 at the end
    ref = {k: v.to(torch.bfloat16).cpu() for k, v in model.state_dict().items()}

    # --precision: the checkpoint's (bf16)
    out = merge_lora_job(tmp_path / "run", out_dir=tmp_path / "merged")
    got = load_file(str(out / WEIGHTS_FILE))
    assert set(got) == set(ref)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k]), k


@pytest.mark.parametrize("mode", ["nf4", "int8-training"])
def test_merge_into_dequantized_base_reproduces_the_adapted_model(tiny_checkpoint, mode):
    model = load_model(tiny_checkpoint, resolve("32-true", f"bnb.{mode}", "cpu"), progress=False)
    add_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, key=True, mlp=True))
    _randomize_b(model)
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        merged = model(x)
    assert all(type(m) is nn.Linear for m in model.modules() if hasattr(m, "in_features"))
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    # the merged state dict is a plain full-precision checkpoint's
    full = load_model(tiny_checkpoint, progress=False)
    assert set(model.state_dict()) == set(full.state_dict())


def test_merge_lora_job_and_generate_with_lora_path(tmp_path):
    ckpt = make_checkpoint(tmp_path / "base", name="tiny-llama-test", seed=4)
    model = load_model(ckpt, resolve("32-true", "bnb.nf4", "cpu"), progress=False)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, projection=True, mlp=True, head=True)
    add_lora(model, cfg)
    _randomize_b(model, seed=5)
    with torch.no_grad():  # a big update so greedy text changes
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.mul_(20)
    run_dir = tmp_path / "run"
    save_lora(
        lora_state_dict(model),
        run_dir / LORA_FILE,
        cfg,
        base_checkpoint_dir=ckpt.resolve(),
        base_quantize="bnb.nf4",
        base_precision="32-true",
    )

    out = run_cli("merge_lora", "--lora_path", str(run_dir), "--precision", "32-true")
    assert out.returncode == 0, out.stderr
    merged_dir = run_dir / "merged"
    assert (merged_dir / WEIGHTS_FILE).is_file() and (merged_dir / "tokenizer.json").is_file()
    merged = load_model(merged_dir, progress=False)
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)

    # quantize=none merges into the full-precision weights instead: a different (not dequantized) base
    out_fp = merge_lora_job(run_dir, quantize="none", out_dir=tmp_path / "merged_fp", precision="32-true")
    fp = load_model(out_fp, progress=False)
    base_fp = load_model(ckpt, progress=False)
    w = dict(base_fp.named_parameters())["transformer.h.0.attn.proj.weight"]
    delta = model.transformer.h[0].attn.proj.delta_weight()
    torch.testing.assert_close(dict(fp.named_parameters())["transformer.h.0.attn.proj.weight"], w + delta)

    from litquant.jobs.generate import main as generate

    kw = dict(prompt="The value", max_new_tokens=10, temperature=0.0)
    plain = generate(checkpoint_dir=ckpt, quantize="bnb.nf4", precision="32-true", **kw)
    adapted = generate(checkpoint_dir=ckpt, quantize="bnb.nf4", precision="32-true", lora_path=run_dir, **kw)
    via_merged = generate(checkpoint_dir=merged_dir, precision="32-true", **kw)
    assert adapted == via_merged  # adapter on the nf4 base == the merged checkpoint
    assert adapted != plain  # and the adapter changes the text
    with pytest.raises(UserError, match="LoRA adapter .* does not exist"):
        merge_lora_job(tmp_path / "missing")
