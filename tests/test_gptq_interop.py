"""AutoGPTQ-format interop: `convert_lit_checkpoint --quantize gptq.int<b>` and `convert_hf_checkpoint` on a
GPTQ model.

Oracles: hand-made AutoGPTQ-layout HF directories whose layers are random integer codes, so the exact weight
each layer stands for is known (scale * (q - zero)) and transformers runs that weight densely; the
`gptqmodel` library, when its benchmark venv exists, loading what we export.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import REPO, make_checkpoint
from safetensors.torch import load_file, save_file

from litquant.checkpoint import load_model
from litquant.errors import UserError
from litquant.jobs import quantize as job
from litquant.jobs.convert import convert_hf_checkpoint, convert_lit_checkpoint
from litquant.precision import resolve
from litquant.quantization import gptq_format as fmt

transformers = pytest.importorskip("transformers")
T = transformers
QUIET = dict(accelerator="cpu")


def _gptq_files(d: Path) -> dict[str, torch.Tensor]:
    return load_file(next(d.glob("lit_model_gptq.*bit.safetensors")))


# ------------------------------------------------------------------------------------ export, then import back


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    return {
        "llama": make_checkpoint(root / "llama", seed=1),
        "pythia": make_checkpoint(root / "pythia", name="tiny-pythia-test", seed=2),
    }


@pytest.mark.parametrize(
    "family,bits,act_order,group_size",
    [
        ("llama", 4, True, 64),
        ("llama", 3, False, 32),
        ("llama", 8, True, -1),
        ("llama", 2, False, 64),
        ("pythia", 4, True, 64),
    ],
)
def test_export_layout_and_exact_round_trip(checkpoints, tmp_path, family, bits, act_order, group_size):
    src = tmp_path / "q"
    job.gptq(
        checkpoints[family],
        bits=bits,
        group_size=group_size,
        act_order=act_order,
        n_samples=6,
        seq_len=32,
        output_dir=src,
        **QUIET,
    )
    hf = tmp_path / "hf"
    convert_lit_checkpoint(src, hf, quantize=f"gptq.int{bits}")

    config = json.loads((hf / "config.json").read_text())
    qc = json.loads((src / "quantize_config.json").read_text())
    assert config["quantization_config"] == qc == json.loads((hf / "quantize_config.json").read_text())
    assert qc["bits"] == bits and qc["desc_act"] == act_order and qc["checkpoint_format"] == "gptq"
    assert (hf / "tokenizer.json").is_file()

    ours, theirs = _gptq_files(src), load_file(hf / "model.safetensors")

    def deq(sd, m):
        return fmt.dequantize(
            sd[f"{m}.qweight"], sd[f"{m}.qzeros"], sd[f"{m}.scales"], sd[f"{m}.g_idx"], bits
        )

    if family == "llama":
        attn = "model.layers.{}.self_attn.{}_proj"
        linears = [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
        names = {
            f"model.layers.{i}.{l}.{a}"
            for i in range(2)
            for l in linears
            for a in ("qweight", "qzeros", "scales", "g_idx")
        }
        assert names <= set(theirs)
        # no dense copy of a quantized layer
        assert not any(k.endswith(".weight") and "proj" in k for k in theirs)
        for i in range(2):  # q/k/v are the rows of our fused layer, weight for weight
            fused = deq(ours, f"transformer.h.{i}.attn.qkv")
            pieces = [deq(theirs, attn.format(i, p)) for p in "qkv"]
            assert [p.shape[0] for p in pieces] == [128, 64, 64]
            assert torch.equal(torch.cat(pieces), fused)
            assert all(
                torch.equal(theirs[attn.format(i, p) + ".g_idx"], ours[f"transformer.h.{i}.attn.qkv.g_idx"])
                for p in "qkv"
            )
    else:  # GPT-NeoX: one fused query_key_value, rows interleaved per head as [q, k, v]
        from litquant.config import Config
        from litquant.hf.weights import interleave_qkv

        c = Config.from_file(src / "model_config.yaml")
        hf_qkv = "gpt_neox.layers.0.attention.query_key_value"
        assert torch.equal(deq(theirs, hf_qkv), interleave_qkv(deq(ours, "transformer.h.0.attn.qkv"), c))
        assert torch.equal(theirs[hf_qkv + ".bias"], interleave_qkv(ours["transformer.h.0.attn.qkv.bias"], c))

    back = tmp_path / "back"
    back.mkdir()
    for f in hf.iterdir():
        (back / f.name).write_bytes(f.read_bytes())
    convert_hf_checkpoint(back)
    again = _gptq_files(back)
    assert set(again) == set(ours)
    for k in ours:
        assert again[k].dtype == ours[k].dtype and torch.equal(again[k], ours[k]), k
    assert json.loads((back / "quantize_config.json").read_text()) == qc


def test_export_errors(checkpoints, tmp_path):
    with pytest.raises(UserError, match=r"has no lit_model_gptq\.4bit\.safetensors.*litquant quantize gptq"):
        convert_lit_checkpoint(checkpoints["llama"], tmp_path / "x", quantize="gptq.int4")
    # bnb modes export too (tests/test_hf_bnb.py), from the file `litquant quantize bnb` writes
    with pytest.raises(
        UserError, match=r"has no lit_model_bnb\.nf4\.safetensors.*litquant quantize bnb --mode nf4"
    ):
        convert_lit_checkpoint(checkpoints["llama"], tmp_path / "x", quantize="bnb.nf4")


# ------------------------------------------------------------------------------------ hand-made AutoGPTQ models


def _llama_cfg():
    return T.LlamaConfig(
        vocab_size=96,
        num_hidden_layers=2,
        max_position_embeddings=64,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
    )


def _neox_cfg():
    return T.GPTNeoXConfig(
        vocab_size=96,
        num_hidden_layers=2,
        max_position_embeddings=64,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        rotary_pct=0.25,
    )


def make_hf_gptq(
    d: Path,
    cfg,
    bits: int = 4,
    group_size: int = 32,
    act_order: bool = True,
    v2: bool = False,
    g_idx: bool = True,
    zero_bias: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """An AutoGPTQ-layout HF directory with random codes per layer; returns the HF model holding the weights
    those codes stand for (scale * (q - zero)), densely."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (
            name,
            p,
        ) in model.named_parameters():  # embeddings/norms/biases at a scale where layout errors show
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))
    state = {k: v for k, v in model.state_dict().items()}
    perms: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) and ".layers." in name):
            continue
        out_f, in_f = mod.weight.shape
        groups = fmt.num_groups(in_f, group_size)
        q = torch.randint(0, 2**bits, (out_f, in_f), generator=gen)
        zmax = 2**bits - 1 if v2 else 2**bits  # v2 stores the zero itself, so 2**bits does not fit
        zeros = torch.randint(1, zmax + 1, (groups, out_f), generator=gen)
        scales = (torch.rand(groups, out_f, generator=gen) * 2 + 0.5).div(math.sqrt(in_f) * 2**bits).half()
        gi = fmt.default_g_idx(in_f, group_size)
        if act_order:  # q/k/v share their input, hence their permutation (as AutoGPTQ produces it)
            key = name.rsplit(".", 1)[0] + (
                ".attn_in" if name.endswith(("q_proj", "k_proj", "v_proj")) else name
            )
            perms.setdefault(key, torch.randperm(in_f, generator=gen))
            gi = gi[perms[key]]
        gl = gi.long()
        with torch.no_grad():
            mod.weight.copy_(scales.float().t()[:, gl] * (q - zeros.t()[:, gl]).float())
        packed = fmt.pack(q, zeros + 1 if v2 else zeros, scales, gi, bits)
        del state[name + ".weight"]
        state.update({f"{name}.{k}": v for k, v in packed.items() if g_idx or k != "g_idx"})
        if mod.bias is not None:
            state[name + ".bias"] = mod.bias.detach().half().float().clone()
            with torch.no_grad():
                mod.bias.copy_(state[name + ".bias"])
        elif zero_bias:
            state[name + ".bias"] = torch.zeros(out_f, dtype=torch.float16)
    d.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"), metadata={"format": "pt"}
    )
    model.config.save_pretrained(d)
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"] = dict(
        quant_method="gptq",
        bits=bits,
        group_size=group_size,
        desc_act=act_order,
        sym=False,
        damp_percent=0.01,
        true_sequential=True,
        static_groups=False,
        checkpoint_format="gptq_v2" if v2 else "gptq",
    )
    (d / "config.json").write_text(json.dumps(c))
    return model


@pytest.mark.parametrize(
    "case",
    [
        dict(cfg=_llama_cfg),
        dict(cfg=_llama_cfg, bits=3, act_order=False, zero_bias=True),
        dict(cfg=_llama_cfg, v2=True, g_idx=False, act_order=False, group_size=64),
        dict(cfg=_llama_cfg, bits=8, group_size=-1),
        dict(cfg=_neox_cfg),
    ],
    ids=[
        "llama-4bit-act-order",
        "llama-3bit-zero-bias",
        "llama-v2-no-g_idx",
        "llama-8bit-per-channel",
        "neox-4bit",
    ],
)
def test_import_matches_transformers_on_the_dequantized_weights(tmp_path, case):
    case = dict(case)
    cfg = case.pop("cfg")()
    hf = make_hf_gptq(tmp_path / "m", cfg, **case)
    bits = case.get("bits", 4)
    original = load_file(tmp_path / "m" / "model.safetensors")
    convert_hf_checkpoint(tmp_path / "m")
    assert (tmp_path / "m" / f"lit_model_gptq.{bits}bit.safetensors").is_file()
    assert not (tmp_path / "m" / "lit_model.safetensors").exists()

    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        for precision, tol in (("32-true", 1e-4), ("bf16-true", 0.06)):
            ours = load_model(tmp_path / "m", resolve(precision, f"gptq.int{bits}"), progress=False)(
                ids
            ).float()
            err = float((ours - ref).abs().max() / ref.abs().max())
            assert err < tol, (precision, err)

    if not case.get("v2") and case.get("g_idx", True) and not case.get("zero_bias"):
        # and back: exporting the imported model gives the original AutoGPTQ tensors, bit for bit
        convert_lit_checkpoint(tmp_path / "m", tmp_path / "out", quantize=f"gptq.int{bits}")
        exported = load_file(tmp_path / "out" / "model.safetensors")
        # transformers 5 says lm_head in memory; files (and our export) embed_out
        if cfg.model_type == "gpt_neox":
            original["embed_out.weight"] = original.pop("lm_head.weight")
        assert set(exported) == set(original)
        for k, v in original.items():
            assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k


def test_import_errors(tmp_path):
    def fresh(name: str, **kw) -> Path:
        make_hf_gptq(tmp_path / name, _llama_cfg(), **kw)
        return tmp_path / name

    d = fresh("fmt")
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"]["checkpoint_format"] = "marlin"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match="checkpoint_format 'marlin' is not supported"):
        convert_hf_checkpoint(d)

    d = fresh("gidx")
    sd = load_file(d / "model.safetensors")
    g = sd["model.layers.0.self_attn.k_proj.g_idx"]
    sd["model.layers.0.self_attn.k_proj.g_idx"] = g.flip(0).contiguous()
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(UserError, match="q/k/v were quantized with different g_idx"):
        convert_hf_checkpoint(d)

    d = fresh("bias", act_order=False)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.bias"] = torch.ones(128, dtype=torch.float16)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(UserError, match="has a bias but the config has none"):
        convert_hf_checkpoint(d)

    d = fresh("shape", act_order=False)
    c = json.loads((d / "config.json").read_text())
    c["intermediate_size"] = 256
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match=r"down_proj' is 64x128 \(out x in\) but the config needs 64x256"):
        convert_hf_checkpoint(d)

    d = fresh("missing", act_order=False)
    sd = load_file(d / "model.safetensors")
    for a in ("qweight", "qzeros", "scales", "g_idx"):
        del sd[f"model.layers.1.self_attn.v_proj.{a}"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(
        UserError, match=r"incomplete quantized attention: transformer\.h\.1\.attn\.qkv lacks v"
    ):
        convert_hf_checkpoint(d)


def test_export_dtype_from_the_file_and_truncated_file(tmp_path):
    """config.json's torch_dtype is the stored embedding's dtype (read from the header, not the data); a
    truncated GPTQ file is a one-line UserError before anything is written."""
    d = tmp_path / "m"
    make_hf_gptq(d, _llama_cfg(), act_order=False)
    convert_hf_checkpoint(d, dtype="bfloat16")
    convert_lit_checkpoint(d, tmp_path / "out", quantize="gptq.int4")
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert c["torch_dtype"] == "bfloat16" and c["quantization_config"]["bits"] == 4
    assert (
        load_file(tmp_path / "out" / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    )

    f = d / "lit_model_gptq.4bit.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match=r"lit_model_gptq\.4bit\.safetensors .*truncated or corrupt") as e:
        convert_lit_checkpoint(d, tmp_path / "out2", quantize="gptq.int4")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------ gptqmodel as an oracle

VENV_PY = REPO / "benchmarks" / ".venvs" / "gptqmodel" / "bin" / "python"
_LOAD = r"""
import sys, torch
from gptqmodel import GPTQModel
from safetensors.torch import save_file
m = GPTQModel.load(sys.argv[1], device="cpu", dtype=torch.float32)
ids = torch.tensor([[int(t) for t in sys.argv[3].split(",")]])
with torch.inference_mode():
    logits = m.model(ids).logits.float()
kinds = sorted({type(x).__name__ for x in m.model.modules() if hasattr(x, "qweight")})
save_file({"logits": logits[0].contiguous()}, sys.argv[2], metadata={"kinds": ",".join(kinds)})
"""


@pytest.mark.skipif(
    not VENV_PY.exists(), reason="no gptqmodel venv (python benchmarks/peer_gptqmodel.py makes it)"
)
def test_gptqmodel_loads_our_export_to_the_same_logits(checkpoints, tmp_path):
    # gptqmodel refuses asymmetric v1 files it did not write (AutoGPTQ once stored zero 0 as -1); sym is its default
    src = tmp_path / "q"
    job.gptq(
        checkpoints["llama"],
        bits=4,
        group_size=64,
        sym=True,
        act_order=True,
        n_samples=6,
        seq_len=32,
        output_dir=src,
        **QUIET,
    )
    convert_lit_checkpoint(src, tmp_path / "hf", quantize="gptq.int4")
    ids = [1, 17, 40, 99, 3, 250, 8, 60, 61, 2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["GPTQMODEL_CPU_WORKERS"] = "2"
    p = subprocess.run(
        [
            str(VENV_PY),
            "-c",
            _LOAD,
            str(tmp_path / "hf"),
            str(tmp_path / "l.safetensors"),
            ",".join(map(str, ids)),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = load_file(tmp_path / "l.safetensors")["logits"]
    with torch.no_grad():
        ours = load_model(src, resolve("32-true", "gptq.int4"), progress=False)(torch.tensor([ids]))[0]
        fp = load_model(checkpoints["llama"], progress=False)(torch.tensor([ids]))[0]
    # gptqmodel's CPU kernel (TorchFusedLinear) rounds activations to bf16 even at dtype=float32 (its exact
    # TorchLinear takes fp16/bf16 only), so the two agree to bf16 rounding, far below the quantization error
    diff = float((ours - theirs).abs().max())
    assert diff < 0.02 * float(ours.abs().max()), diff
    assert float((fp - ours).abs().max()) > 5 * diff, (float((fp - ours).abs().max()), diff)
