"""Hugging Face bitsandbytes checkpoints both ways: `convert_hf_checkpoint` on a model transformers + bitsandbytes
quantized and saved, `convert_lit_checkpoint --quantize bnb.<mode>` back to that layout.

Oracle: transformers + bitsandbytes on CPU. They quantize a small random Llama (and GPT-NeoX, whose q/k/v are
interleaved in one layer) and save it; litquant imports it and must compute the same logits; transformers loads
litquant's export with a plain `from_pretrained` and must compute them too. bitsandbytes' AVX512-BF16 CPU path
rounds absmax to bf16, so it is turned off on the oracle's layers: both sides then compute in fp32.
The model sizes keep each q/k/v piece a whole number of double-quantization groups (256 blocks of 64 weights),
which is what real models have; a smaller one shows the refusal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, make_checkpoint
from safetensors.torch import load_file, save_file

from litquant.checkpoint import load_model
from litquant.errors import UserError
from litquant.jobs import quantize as quantize_job
from litquant.jobs.convert import convert_hf_checkpoint, convert_lit_checkpoint
from litquant.precision import resolve

T = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' bitsandbytes quantizer needs it

MODES = {
    "bnb.nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "bnb.nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "bnb.fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "bnb.fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "bnb.int8": dict(load_in_8bit=True),
}
# fp32 on both sides; 4-bit layers dequantize to the same weights bit for bit, so only summation order differs
FP32_TOL = 1e-5
# LLM.int8 quantizes each input row to int8, bitsandbytes from the input rounded to fp16 and litquant from fp32, so
# the two differ by activation-rounding noise: 1.5-3.5% of the logits' scale here, about as far as either is from
# the dense product of the same int8 weights. Those weights are checked exactly: bnb.int8-training (dequantize +
# matmul) against transformers' full-precision model of CB * SCB / 127.
INT8_TOL = 0.05


def _vocab(d: Path) -> int:
    from litquant.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([SAMPLE_TEXT], 320, d).vocab_size


def _llama(vocab: int, **kw):
    cfg = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)
    return T.LlamaConfig(vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=64, **{**cfg, **kw})


def _neox(vocab: int):
    return T.GPTNeoXConfig(
        vocab_size=vocab,
        num_hidden_layers=2,
        max_position_embeddings=64,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        rotary_pct=0.25,
    )


def _fp32_oracle(model):
    """bitsandbytes' layers off their AVX512-BF16 CPU path (absmax rounded to bf16): exact fp32, as litquant."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model.eval()


def make_fp(d: Path, cfg_fn, seed: int = 0, **kw) -> Path:
    """A random HF model (full precision) with a small trained tokenizer."""
    d.mkdir(parents=True)
    cfg = cfg_fn(_vocab(d), **kw)
    torch.manual_seed(seed)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def quantize_hf(fp: Path, out: Path, **bnb) -> torch.nn.Module:
    """transformers + bitsandbytes quantize `fp` on CPU and save_pretrained it to `out` (tokenizer files too)."""
    q = T.AutoModelForCausalLM.from_pretrained(fp, quantization_config=T.BitsAndBytesConfig(**bnb))
    q.save_pretrained(out)
    for f in fp.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return _fp32_oracle(q)


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def lit_logits(d: Path, mode: str, ids: torch.Tensor, precision: str = "32-true") -> torch.Tensor:
    with torch.no_grad():
        return load_model(d, resolve(precision, mode, "cpu"), progress=False)(ids).float()


def quantized_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The quantization state of a litquant bnb file (every tensor of its quantized layers but the bias)."""
    sd = load_file(path)
    layers = {k.removesuffix(".absmax") for k in sd if k.endswith(".absmax")}
    return {k: v for k, v in sd.items() if k.rpartition(".")[0] in layers and not k.endswith(".bias")}


def _int8_dense(fp: Path, hf_int8: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the full-precision HF model whose int8 layers hold CB * SCB / 127 (bnb's int8 dequantization)."""
    model = T.AutoModelForCausalLM.from_pretrained(fp).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scb = hf_int8.get(name.removesuffix(".weight") + ".SCB")
            if scb is not None:
                p.copy_(hf_int8[name].float() * (scb[:, None] / 127))
    return hf_logits(model, IDS)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def fp_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_bnb")
    return {"llama": make_fp(root / "llama", _llama), "neox": make_fp(root / "neox", _neox, seed=1)}


IDS = torch.tensor([[3, 17, 40, 99, 250, 8, 60, 61, 2, 120, 5, 77]])


# ---- import: transformers' files, litquant's logits -------------------------------------------------------------


@pytest.mark.parametrize(
    "family,mode",
    [("llama", m) for m in MODES] + [("neox", "bnb.nf4-dq"), ("neox", "bnb.int8")],
)
def test_import_export_agree_with_transformers(fp_models, tmp_path, family, mode):
    hf_dir = tmp_path / "hf"
    oracle = quantize_hf(fp_models[family], hf_dir, **MODES[mode])
    original = load_file(hf_dir / "model.safetensors")
    ref = hf_logits(oracle, IDS)

    convert_hf_checkpoint(hf_dir)
    lit_file = hf_dir / f"lit_model_bnb.{mode.removeprefix('bnb.')}.safetensors"
    assert lit_file.is_file() and not (hf_dir / "lit_model.safetensors").exists()
    imported = load_file(lit_file)
    # carried bit for bit: a renamed layer's tensors are the HF ones
    proj = "model.layers.1.self_attn.o_proj" if family == "llama" else "gpt_neox.layers.1.attention.dense"
    lit_proj = "transformer.h.1.attn.proj"
    if mode == "bnb.int8":
        assert torch.equal(imported[f"{lit_proj}.weight"], original[f"{proj}.weight"])
        assert torch.equal(imported[f"{lit_proj}.absmax"], original[f"{proj}.SCB"])
    else:
        assert torch.equal(imported[f"{lit_proj}.weight"], original[f"{proj}.weight"])
        assert torch.equal(imported[f"{lit_proj}.absmax"], original[f"{proj}.weight.absmax"])
        if mode.endswith("-dq"):
            assert torch.equal(
                imported[f"{lit_proj}.nested_absmax"], original[f"{proj}.weight.nested_absmax"]
            )
    assert imported["lm_head.weight"].dtype == torch.float32  # transformers left lm_head unquantized

    ours = lit_logits(hf_dir, mode, IDS)
    diff = float((ours - ref).abs().max())
    tol = INT8_TOL * float(ref.abs().max()) if mode == "bnb.int8" else FP32_TOL
    print(
        f"{family} {mode}: max |litquant - transformers| = {diff:.3g} (logits up to {float(ref.abs().max()):.3g})"
    )
    assert diff < tol, diff
    if mode == "bnb.int8":  # the same int8 weights dequantized (bnb.int8-training) = transformers' fp32 model
        exact = float(
            (lit_logits(hf_dir, "bnb.int8-training", IDS) - _int8_dense(fp_models[family], original))
            .abs()
            .max()
        )
        print(f"{family} bnb.int8-training: max |litquant - transformers on CB * SCB / 127| = {exact:.3g}")
        assert exact < FP32_TOL, exact

    # export: transformers' own tensors back, byte for byte, and transformers loads them as they are
    out = tmp_path / "out"
    convert_lit_checkpoint(hf_dir, out, quantize=mode)
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(original)
    for k, v in original.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_storage"] == "uint8"
    reloaded = _fp32_oracle(T.AutoModelForCausalLM.from_pretrained(out))
    assert torch.equal(hf_logits(reloaded, IDS), ref)

    # and import(export(x)) is x: the same quantized tensors, bit for bit
    convert_hf_checkpoint(out)
    again, first = quantized_tensors(out / lit_file.name), quantized_tensors(lit_file)
    assert set(again) == set(first)
    for k, v in first.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k


def test_skipped_modules_stay_in_full_precision(fp_models, tmp_path):
    hf_dir = tmp_path / "hf"
    skip = ["lm_head", "model.layers.1.mlp.down_proj"]
    oracle = quantize_hf(fp_models["llama"], hf_dir, **MODES["bnb.nf4-dq"], llm_int8_skip_modules=skip)
    ref = hf_logits(oracle, IDS)
    convert_hf_checkpoint(hf_dir)
    sd = load_file(hf_dir / "lit_model_bnb.nf4-dq.safetensors")
    assert sd["transformer.h.1.mlp.proj.weight"].dtype == torch.float32
    assert "transformer.h.1.mlp.proj.absmax" not in sd and "transformer.h.0.mlp.proj.absmax" in sd
    assert float((lit_logits(hf_dir, "bnb.nf4-dq", IDS) - ref).abs().max()) < FP32_TOL

    out = tmp_path / "out"
    convert_lit_checkpoint(hf_dir, out, quantize="bnb.nf4-dq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    assert torch.equal(hf_logits(_fp32_oracle(T.AutoModelForCausalLM.from_pretrained(out)), IDS), ref)


# ---- export: litquant's own bnb files to transformers -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nf4-dq", "fp4", "int8"])
def test_litquant_bnb_file_exports_and_comes_back_byte_identical(tmp_path, mode):
    ckpt = make_checkpoint(
        tmp_path / "lit", seed=3, n_embd=256, n_head=8, n_query_groups=2, intermediate_size=512
    )
    src = quantize_job.bnb(ckpt, mode=mode)
    out = tmp_path / "hf"
    convert_lit_checkpoint(ckpt, out, quantize=f"bnb.{mode}")
    assert (out / "tokenizer.json").is_file()
    theirs = hf_logits(_fp32_oracle(T.AutoModelForCausalLM.from_pretrained(out)), IDS)
    ours = lit_logits(ckpt, f"bnb.{mode}", IDS)
    diff = float((ours - theirs).abs().max())
    print(f"litquant bnb.{mode} file -> transformers: max |litquant - transformers| = {diff:.3g}")
    assert diff < (INT8_TOL * float(theirs.abs().max()) if mode == "int8" else FP32_TOL), diff
    if mode == "int8":  # the int8 weights: transformers' full-precision model of CB * SCB / 127
        convert_lit_checkpoint(ckpt, tmp_path / "fp")
        dense = _int8_dense(tmp_path / "fp", load_file(out / "model.safetensors"))
        assert float((lit_logits(ckpt, "bnb.int8-training", IDS) - dense).abs().max()) < FP32_TOL

    back = _copy(out, tmp_path / "back")
    convert_hf_checkpoint(back)
    again, first = quantized_tensors(back / src.name), quantized_tensors(src)
    assert set(again) == set(first)
    for k, v in first.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k  # offsets: one per layer, as stored


def test_sharded_export_loads(fp_models, tmp_path):
    hf_dir = tmp_path / "hf"
    oracle = quantize_hf(fp_models["llama"], hf_dir, **MODES["bnb.nf4"])
    convert_hf_checkpoint(hf_dir)
    out = tmp_path / "out"
    convert_lit_checkpoint(hf_dir, out, quantize="bnb.nf4", max_shard_size=200_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    q_proj = [k for k in index if k.startswith("model.layers.0.self_attn.q_proj.weight")]
    assert len({index[k] for k in q_proj}) == 1  # a layer's tensors stay in one shard
    reloaded = _fp32_oracle(T.AutoModelForCausalLM.from_pretrained(out))
    assert torch.equal(hf_logits(reloaded, IDS), hf_logits(oracle, IDS))


# ---- running it: the mode it holds, QLoRA, merging --------------------------------------------------------------


@pytest.fixture(scope="module")
def imported_nf4(fp_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("imported") / "nf4-dq"
    quantize_hf(fp_models["llama"], d, **MODES["bnb.nf4-dq"])
    convert_hf_checkpoint(d)
    return d


def test_offsets_per_group_on_every_path(imported_nf4, monkeypatch):
    """The fused qkv of an import keeps q/k/v's own offsets (one per 256-block group); bitsandbytes' ops (the path
    without litquant's kernels) and the kernels dequantize it alike."""
    qkv = load_file(imported_nf4 / "lit_model_bnb.nf4-dq.safetensors")["transformer.h.0.attn.qkv.offset"]
    assert qkv.dim() == 1 and len(set(qkv.tolist())) == 3
    with_kernels = lit_logits(imported_nf4, "bnb.nf4-dq", IDS)
    monkeypatch.setenv("LITQUANT_CPU_KERNELS", "0")
    assert float((lit_logits(imported_nf4, "bnb.nf4-dq", IDS) - with_kernels).abs().max()) < FP32_TOL


def test_another_mode_is_a_one_line_error(imported_nf4):
    for other in ("bnb.fp4", "bnb.nf4", "bnb.int8"):
        with pytest.raises(
            UserError, match=r"holds bnb\.nf4-dq weights, not .*: run with --quantize bnb.nf4-dq"
        ) as e:
            load_model(imported_nf4, resolve("32-true", other, "cpu"), progress=False)
        assert "\n" not in str(e.value)


def test_qlora_from_the_import_and_merge(imported_nf4, tmp_path):
    from litquant.jobs.finetune import lora
    from litquant.jobs.merge_lora import main as merge_lora_job
    from litquant.lora import load_lora
    from litquant.training.args import DataArgs, EvalArgs, TrainArgs

    words = "cat dog fish bird tree leaf rock sand".split()
    rows = [{"instruction": f"Repeat: {w}", "input": "", "output": w} for w in words * 4]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = tmp_path / "run"
    result = lora(
        checkpoint_dir=imported_nf4,
        out_dir=run,
        accelerator="cpu",
        precision="32-true",
        quantize="bnb.nf4-dq",
        lora_mlp=True,
        logger="csv",
        data=DataArgs(path=data, prompt_style="default", max_seq_length=32),
        train=TrainArgs(
            global_batch_size=4, micro_batch_size=4, max_steps=4, learning_rate=0.05, lr_warmup_steps=1
        ),
        eval=EvalArgs(interval=100, max_iters=1, sample_max_new_tokens=2),
    )
    losses = [v for _, v in result["train_losses"]]
    assert losses[-1] < losses[0]

    merged = merge_lora_job(run, out_dir=tmp_path / "merged")  # dequantizes the imported base
    adapted = load_model(imported_nf4, resolve("32-true", "bnb.nf4-dq", "cpu"), progress=False)
    load_lora(adapted, run)
    adapted.eval()  # no adapter dropout
    full = load_model(merged, progress=False)
    assert full.transformer.wte.weight.dtype == torch.float32  # the import's full-precision dtype
    with torch.no_grad():
        torch.testing.assert_close(full(IDS), adapted(IDS), rtol=1e-4, atol=1e-4)


# ---- bad input: one line, nothing written -----------------------------------------------------------------------


def _edit_weights(d: Path, fn) -> None:
    sd = load_file(d / "model.safetensors")
    fn(sd)
    save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"}
    )


def _edit_config(d: Path, **quant) -> None:
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"].update(quant)
    (d / "config.json").write_text(json.dumps(c))


def _set_quant_state(sd: dict, layer: str, **changes) -> None:
    key = f"{layer}.weight.quant_state.bitsandbytes__nf4"
    state = {**json.loads(bytes(sd[key].tolist())), **changes}
    sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


@pytest.fixture(scope="module")
def nf4_hf(fp_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad") / "nf4-dq"
    quantize_hf(fp_models["llama"], d, **MODES["bnb.nf4-dq"])
    return d


@pytest.mark.parametrize(
    "case,match",
    [
        ("shape", r"o_proj'.*quant_state shape \[256, 128\] but the config needs \[256, 256\]"),
        ("absmax", r"mlp\.down_proj' has no weight\.absmax"),
        ("storage", r"bnb_4bit_quant_storage 'bfloat16' is not supported"),
        ("quant_map", r"quant_map is not bitsandbytes' nf4 table"),
        ("blocksize", r"blocksize 128 \(litquant runs blocksize 64\)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(nf4_hf, tmp_path, case, match):
    d = _copy(nf4_hf, tmp_path / "m")
    o_proj, down = "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"
    if case == "shape":
        _edit_weights(d, lambda sd: _set_quant_state(sd, o_proj, shape=[256, 128]))
    elif case == "absmax":
        _edit_weights(d, lambda sd: sd.pop(f"{down}.weight.absmax"))
    elif case == "storage":
        _edit_config(d, bnb_4bit_quant_storage="bfloat16")
    elif case == "quant_map":
        _edit_weights(d, lambda sd: sd[f"{o_proj}.weight.quant_map"].mul_(2))
    else:
        _edit_weights(d, lambda sd: _set_quant_state(sd, o_proj, blocksize=128))
    with pytest.raises(UserError, match=match) as e:
        convert_hf_checkpoint(d)
    assert "\n" not in str(e.value)
    assert not list(d.glob("lit_model*")) and not (d / "model_config.yaml").exists()


def test_double_quant_groups_straddling_q_k_v_are_refused(tmp_path):
    """hidden 128 with 2 of 4 kv heads: k_proj is 64 x 128, 128 blocks, half a double-quantization group."""
    fp = make_fp(tmp_path / "fp", _llama, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    d = tmp_path / "m"
    quantize_hf(fp, d, **MODES["bnb.nf4-dq"])
    with pytest.raises(
        UserError, match=r"transformer\.h\.0\.attn\.qkv: its double-quantization groups .* straddle"
    ):
        convert_hf_checkpoint(d)
    assert not list(d.glob("lit_model*"))
    # without double quantization the same model fuses exactly
    d2 = tmp_path / "m2"
    oracle = quantize_hf(fp, d2, **MODES["bnb.nf4"])
    convert_hf_checkpoint(d2)
    assert float((lit_logits(d2, "bnb.nf4", IDS) - hf_logits(oracle, IDS)).abs().max()) < FP32_TOL
