"""`litquant estimate`: published sizes, and the estimate against what each plugin really holds after loading."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_TEXT, make_checkpoint, run_cli

from litquant.config import Config, n_params
from litquant.errors import UserError
from litquant.estimate import (
    GPU_HEADROOM,
    GPUS,
    estimate,
    fits,
    kv_cache_bytes,
    lora_params,
    model_shapes,
    weight_bytes,
)
from litquant.jobs.estimate import main

GB, GIB = 1e9, 2**30
BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints" / "litquant-tiny"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The bundled model when it is there (the issue asks for it), else one of the same config."""
    if (BUNDLED / "lit_model.safetensors").is_file():
        return BUNDLED
    return make_checkpoint(tmp_path_factory.mktemp("est") / "litquant-tiny", name="litquant-tiny")


def test_llama2_7b_matches_published_sizes():
    config = Config.from_name("Llama-2-7b-hf")
    assert n_params(config) == 6_738_415_616  # the published parameter count of Llama-2-7b
    bf16 = weight_bytes(config, "bf16-true")["bytes"]
    assert abs(bf16 / GB - 13.5) / 13.5 < 0.01  # "13.5 GB" (litgpt measures 13.52 GB peak on an A100)
    nf4 = weight_bytes(config, "bnb.nf4", "bf16-true")["bytes"]
    nf4_dq = weight_bytes(config, "bnb.nf4-dq", "bf16-true")["bytes"]
    # "~3.9 GB": nf4 is 3.88 GiB (4.17e9 bytes; the 0.5 bit/param of fp32 absmax included), nf4-dq 3.87e9 bytes
    assert abs(nf4 / GIB - 3.9) / 3.9 < 0.02
    assert abs(nf4_dq / GB - 3.9) / 3.9 < 0.02
    # double quantization saves ~0.37 bit per quantized parameter (QLoRA) ...
    q_params = weight_bytes(config, "bnb.nf4")["quantized_params"]
    assert q_params == 32 * 4096 * (3 * 4096 + 4096 + 3 * 11008)  # every block Linear, no lm_head
    assert abs(8 * (nf4 - nf4_dq) / q_params - 0.37) < 0.01
    # ... which is the gap litgpt measured on an A100 between nf4 (4.57 GB) and nf4-dq (4.26 GB) peaks
    assert abs((nf4 - nf4_dq) / GB - (4.57 - 4.26)) < 0.03
    int8 = weight_bytes(config, "bnb.int8")["bytes"]
    assert int8 == q_params + 4 * 32 * (3 * 4096 + 4096 + 2 * 11008 + 4096) + 2 * (
        n_params(config) - q_params
    )


def test_seed_table_before_overheads_and_kv_cache():
    # the seeds' 7.3B model: FP32 29.2 GB, BF16 14.6 GB, INT8 7.3 GB, INT4 3.65 GB before overheads
    config = Config.from_name("Mistral-7B-v0.1")
    rows = {r["mode"]: r for r in estimate(config, ["32-true", "bf16-true", "bnb.int8", "bnb.nf4"])["rows"]}
    for mode, published in (("32-true", 29.2), ("bf16-true", 14.6), ("bnb.int8", 7.3), ("bnb.nf4", 3.65)):
        assert abs(rows[mode]["nominal_bytes"] / GB - published) / published < 0.015, mode
    # Llama-2-7b's fp16 KV cache: 0.5 MiB per token (2 x 32 layers x 4096 x 2 bytes), 2 GiB at 4096 tokens
    llama = Config.from_name("Llama-2-7b-hf")
    assert kv_cache_bytes(llama, 1, 1, 2) == 2**19
    assert kv_cache_bytes(llama, 4096, 2, 2) == 4 * GIB
    # GQA: Mistral keeps 8 of 32 heads' keys/values
    assert kv_cache_bytes(config, 4096, 1, 2) == kv_cache_bytes(llama, 4096, 1, 2) // 4


def test_gpu_fit_uses_driver_memory_less_headroom():
    for name, mib in GPUS:
        assert name in fits(mib * 2**20 - GPU_HEADROOM)
        assert name not in fits(mib * 2**20 - GPU_HEADROOM + 1)
    seventy = Config.from_name("Llama-2-70b-hf")
    bf16 = estimate(seventy, ["bf16-true"], context_length=2048)["rows"][0]
    assert bf16["fits"] == ["H200 141GB"]  # 138 GB of weights
    # nf4: 39.6 GB of weights squeeze onto a 40 GiB A100 at batch 1, not with 8 sequences' KV cache (5.4 GB)
    nf4 = estimate(seventy, ["bnb.nf4"], context_length=2048, batch_size=1)["rows"][0]
    nf4_b8 = estimate(seventy, ["bnb.nf4"], context_length=2048, batch_size=8)["rows"][0]
    assert nf4["fits"][0] == "A100 40GB" and nf4_b8["fits"][0] == "A100 80GB"
    assert nf4_b8["kv_cache_bytes"] == 8 * nf4["kv_cache_bytes"] == 8 * 2 * 80 * 8 * 128 * 2048 * 2


@pytest.mark.parametrize(
    "mode,precision,options",
    [
        ("32-true", "32-true", {}),
        ("16-true", "16-true", {}),
        ("bf16-true", "bf16-true", {}),
        ("bnb.nf4", "32-true", {}),
        ("bnb.nf4", "bf16-true", {}),
        ("bnb.nf4-dq", "32-true", {}),
        ("bnb.fp4", "bf16-true", {}),
        ("bnb.fp4-dq", "bf16-true", {}),
        ("bnb.int8", "32-true", {}),
        ("bnb.int8-training", "bf16-true", {}),
        ("bnb.nf4", "32-true", {"quantize_lm_head": True}),
    ],
)
def test_estimate_matches_measured_weight_bytes_of_each_plugin(tiny_model_dir, mode, precision, options):
    from litquant.checkpoint import load_model
    from litquant.precision import quantize_modes, resolve
    from litquant.utils import weight_bytes_by_dtype

    quant = None if mode == precision else mode
    if quant is not None and quant not in quantize_modes():
        pytest.skip(f"{quant} is not registered yet")
    model = load_model(tiny_model_dir, resolve(precision, quant, "cpu", **options), "cpu", progress=False)
    measured = sum(weight_bytes_by_dtype(model).values())
    est = weight_bytes(
        model.config, mode, precision, quantize_lm_head=options.get("quantize_lm_head", False)
    )["bytes"]
    assert abs(est - measured) / measured < 0.02, (est, measured)


def test_estimate_matches_measured_gptq_int4(tmp_path, monkeypatch):
    # the estimate counts gptq.int4 in bf16 as torch's int4 kernel holds it (AVX2 builds keep the smaller AutoGPTQ
    # layout for their int16 kernel instead): pin that path
    monkeypatch.setenv("LITQUANT_EXACT_KERNELS", "1")
    from litquant.precision import quantize_modes

    if "gptq.int4" not in quantize_modes():
        pytest.skip("gptq.int4 is not registered yet")
    from litquant.checkpoint import load_model
    from litquant.jobs.quantize import gptq as quantize_gptq
    from litquant.precision import resolve
    from litquant.utils import weight_bytes_by_dtype

    ckpt = make_checkpoint(tmp_path / "ckpt")  # GPTQ's cost grows with the width: the smallest config
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT)
    quantize_gptq(
        ckpt, bits=4, group_size=64, n_samples=2, seq_len=32, accelerator="cpu", calibration_data=calib
    )
    model = load_model(ckpt, resolve("bf16-true", "gptq.int4", "cpu"), "cpu", progress=False)
    measured = sum(weight_bytes_by_dtype(model).values())
    est = weight_bytes(model.config, "gptq.int4", "bf16-true", gptq_group_size=64)["bytes"]
    assert abs(est - measured) / measured < 0.02, (est, measured)


def test_random_init_model_matches_estimate(monkeypatch):
    """The benchmark's --random_init builder and the estimate agree too (a named config, no checkpoint)."""
    monkeypatch.setenv(
        "LITQUANT_EXACT_KERNELS", "1"
    )  # gptq.int4 bf16: torch's int4 layout, as the estimate counts
    from litquant.benchmark.measure import random_model
    from litquant.precision import resolve
    from litquant.utils import weight_bytes_by_dtype

    config = Config.from_name("tiny-pythia-test")  # biases, LayerNorm, GptNeoxMLP: the other code paths
    from litquant.precision import quantize_modes

    modes = [
        ("32-true", "32-true"),
        ("bnb.nf4-dq", "bf16-true"),
        ("bnb.int8", "32-true"),
        ("gptq.int4", "bf16-true"),
    ]
    for mode, prec in modes:
        if mode != prec and mode not in quantize_modes():
            continue
        plugin = resolve(prec, None if mode == prec else mode, "cpu")
        model = random_model(config, plugin, torch.device("cpu"))
        measured = sum(weight_bytes_by_dtype(model).values())
        est = weight_bytes(config, mode, prec)["bytes"]
        assert abs(est - measured) / measured < 0.02, (mode, est, measured)


def test_lora_finetune_state():
    config = Config.from_name("Llama-2-7b-hf")
    linears, _ = model_shapes(config)
    # r x (in + out) over qkv (4096 -> 12288), proj (4096 -> 4096) and the three MLP Linears, 32 layers
    per_layer = (4096 + 12288) + (4096 + 4096) + 3 * (4096 + 11008)
    assert lora_params(linears, 8, "all") == 32 * 8 * per_layer
    assert lora_params(linears, 8, "qkv") == 32 * 8 * (4096 + 12288)
    lora = estimate(config, finetune="lora", context_length=512)["rows"]
    qlora = estimate(config, finetune="qlora", context_length=512)["rows"]
    # lora keeps the full-precision modes of the list, qlora the 4-bit ones
    assert [r["mode"] for r in lora] == ["32-true", "16-true", "bf16-true"]
    assert [r["mode"] for r in qlora] == ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq"]
    lora = lora[2:]
    # same adapters and activations; the base weights make the difference
    assert lora[0]["lora_state_bytes"] == qlora[0]["lora_state_bytes"] == 4 * 2 * 32 * 8 * per_layer
    assert lora[0]["activation_bytes"] == qlora[0]["activation_bytes"]
    assert (
        lora[0]["total_bytes"] - qlora[0]["total_bytes"] == lora[0]["weight_bytes"] - qlora[0]["weight_bytes"]
    )
    assert "T4 16GB" in qlora[0]["fits"] and "T4 16GB" not in lora[0]["fits"]


def test_cli_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "est.json"
    p = run_cli(
        "estimate",
        "--model_name",
        "meta-llama/Llama-2-7b-hf",
        "--context_length",
        "2048",
        "--out_file",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    for mode in (
        "32-true",
        "bf16-true",
        "bnb.int8",
        "bnb.nf4",
        "bnb.nf4-dq",
        "bnb.fp4",
        "bnb.fp4-dq",
        "gptq.int4",
    ):
        assert any(l.startswith(mode + " ") for l in lines), mode
    bf16_line = next(l for l in lines if l.startswith("bf16-true "))
    assert "13.48 GB" in bf16_line and "T4 16GB and larger" in bf16_line
    data = json.loads(out.read_text())
    assert data["params"] == 6_738_415_616 and data["context_length"] == 2048
    row = next(r for r in data["rows"] if r["mode"] == "bnb.nf4")
    assert row["total_bytes"] == row["weight_bytes"] + row["kv_cache_bytes"] + row["activation_bytes"]
    assert math.isclose(row["bits_per_quantized_param"], 4.5)


def test_checkpoint_dir_reads_config_and_gptq_settings(tiny_model_dir, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt, ignore=shutil.ignore_patterns("lit_model*"))
    (ckpt / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    res = main(checkpoint_dir=ckpt, modes="gptq.int4", precision="32-true", context_length=64)
    config = Config.from_checkpoint(ckpt)
    assert (
        res["rows"][0]["weight_bytes"]
        == weight_bytes(config, "gptq.int4", "32-true", gptq_group_size=32)["bytes"]
    )
    assert (
        res["rows"][0]["weight_bytes"]
        != weight_bytes(config, "gptq.int4", "32-true", gptq_group_size=128)["bytes"]
    )
    assert "gptq.int4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(model_name="Llama-9b"), "unknown model name 'Llama-9b'"),
        (dict(), "give exactly one of --model_name or --checkpoint_dir"),
        (dict(model_name="Llama-2-7b-hf", checkpoint_dir=Path("x")), "give exactly one of"),
        (dict(model_name="Llama-2-7b-hf", modes="bnb.nf5"), "cannot estimate mode 'bnb.nf5'"),
        (dict(model_name="Llama-2-7b-hf", finetune="dora"), "unknown --finetune 'dora'"),
        (dict(model_name="Llama-2-7b-hf", precision="fp8"), "unknown --precision 'fp8'"),
        (dict(model_name="Llama-2-7b-hf", batch_size=0), "must be at least 1"),
        (dict(checkpoint_dir=Path("/no/such/dir")), "does not exist"),
        (
            dict(model_name="Llama-2-7b-hf", gptq_group_size=0),
            "--gptq_group_size must be a positive integer or -1",
        ),
        (
            dict(model_name="Llama-2-7b-hf", gptq_group_size=-64),
            "--gptq_group_size must be a positive integer or -1",
        ),
        (dict(model_name="Llama-2-7b-hf", modes="bnb.nf4", gptq_group_size=0), "--gptq_group_size must be"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        main(**kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "mode,precision", [("bf16-true", "bf16-true"), ("bnb.nf4", "bf16-true"), ("bnb.int8", "bf16-true")]
)
def test_estimate_matches_cuda_allocated_memory(tiny_model_dir, mode, precision):
    from litquant.checkpoint import load_model
    from litquant.precision import resolve

    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load_model(
        tiny_model_dir,
        resolve(precision, None if mode == precision else mode, "cuda"),
        "cuda",
        progress=False,
    )
    allocated = torch.cuda.memory_allocated() - before
    est = weight_bytes(model.config, mode, precision)["bytes"]
    # the caching allocator rounds each tensor up to 512 bytes: allow that per tensor
    n_tensors = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    assert est <= allocated <= est * 1.02 + 512 * n_tensors


@pytest.mark.parametrize(
    "qc,message",
    [
        ({"bits": 5, "group_size": 128}, r"GPTQ bits must be one of \(2, 3, 4, 8\), got 5"),
        ({"bits": "4", "group_size": 128}, "GPTQ bits must be one of"),
        ({"bits": 4, "group_size": 0}, "group_size must be a positive integer or -1, got 0"),
        ({"bits": 4}, "group_size must be a positive integer or -1, got None"),
        ([4, 128], "expected a JSON object"),
    ],
)
def test_bad_quantize_config_is_a_user_error(tiny_model_dir, tmp_path, qc, message):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt, ignore=shutil.ignore_patterns("lit_model*"))
    (ckpt / "quantize_config.json").write_text(json.dumps(qc))
    with pytest.raises(UserError, match=message) as e:
        main(checkpoint_dir=ckpt)
    assert "quantize_config.json" in str(e.value) and "\n" not in str(e.value)


def test_gptq_group_size_given_is_used_as_is(tiny_model_dir, tmp_path):
    """--gptq_group_size -1 (one group per row) is not replaced by the checkpoint's or the default 128."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt, ignore=shutil.ignore_patterns("lit_model*"))
    (ckpt / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32}))
    config = Config.from_checkpoint(ckpt)
    res = main(checkpoint_dir=ckpt, modes="gptq.int4", gptq_group_size=-1)
    assert res["rows"][0]["weight_bytes"] == weight_bytes(config, "gptq.int4", gptq_group_size=-1)["bytes"]
    assert res["rows"][0]["weight_bytes"] != weight_bytes(config, "gptq.int4", gptq_group_size=32)["bytes"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 100, -1])
def test_gptq_file_bytes_match_packed_tensors(bits, group_size):
    from litquant.quantization.gptq_format import default_g_idx, num_groups, pack
    from litquant.quantization.modes import get_mode

    in_f, out_f = 256, 96
    groups = num_groups(in_f, group_size)
    t = pack(
        torch.randint(0, 2**bits, (out_f, in_f), dtype=torch.int32),
        torch.randint(1, 2**bits + 1, (groups, out_f), dtype=torch.int32),
        torch.rand(groups, out_f, dtype=torch.float16),
        default_g_idx(in_f, group_size),
        bits,
    )
    stored = sum(
        v.numel() * v.element_size() for k, v in t.items() if k in ("qweight", "qzeros", "scales", "g_idx")
    )
    assert get_mode(f"gptq.int{bits}").linear_bytes(in_f, out_f, group_size, runtime=False) == stored
