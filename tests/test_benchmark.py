"""`litquant benchmark`: outputs, agreement with generate/evaluate, per-mode memory, --random_init."""

import json
import re
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_checkpoint, run_cli

from litquant.benchmark.measure import run_stats
from litquant.benchmark.modes import default_modes
from litquant.errors import UserError
from litquant.jobs.benchmark import main
from litquant.precision import quantize_modes
from litquant.quantization.gptq_plugin import gptq_file

SMALL = ["--prompt_tokens", "24", "--max_new_tokens", "8", "--ppl_tokens", "256", "--threads", "1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bench") / "tiny-llama-test")


def _check_medians(result: dict) -> None:
    runs = result["runs"]
    assert (
        statistics.median(r["decode_steps"] / r["decode_s"] for r in runs) == result["decode_tokens_per_sec"]
    )
    assert (
        statistics.median(r["prompt_tokens"] / r["prefill_s"] for r in runs)
        == result["prefill_tokens_per_sec"]
    )
    assert statistics.median(r["prefill_s"] for r in runs) == result["time_to_first_token_s"]
    # what `litquant generate` prints: new tokens / whole generation time
    assert (
        statistics.median(r["new_tokens"] / (r["prefill_s"] + r["decode_s"]) for r in runs)
        == result["tokens_per_sec"]
    )


def test_cli_writes_table_json_markdown_and_chart(ckpt, tmp_path):
    if "bnb.nf4" not in quantize_modes():
        pytest.skip("bnb modes are not registered")
    out = tmp_path / "out"
    # in one process: per-mode processes are tested with --random_init below
    p = run_cli(
        "benchmark",
        "--checkpoint_dir",
        str(ckpt),
        "--modes",
        "32-true,bnb.nf4@32-true",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--bandwidth_gbps",
        "100",
        "--isolate",
        "false",
        "--out_dir",
        str(out),
        *SMALL,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "benchmark.json").read_text())
    env = report["environment"]
    assert env["torch"] == torch.__version__
    import bitsandbytes

    assert env["bitsandbytes"] == bitsandbytes.__version__
    if (REPO / ".git").exists():
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert env["commit"].startswith(head)
    results = {r["mode"]: r for r in report["results"]}
    assert list(results) == ["32-true", "bnb.nf4@32-true"]
    fp32, nf4 = results["32-true"], results["bnb.nf4@32-true"]
    assert nf4["quantize"] == "bnb.nf4" and nf4["precision"] == "32-true" and fp32["quantize"] is None
    for r in (fp32, nf4):
        assert len(r["runs"]) == 2 and all(x["new_tokens"] == 8 and x["decode_steps"] == 7 for x in r["runs"])
        _check_medians(r)
        # bytes read per decoded token: all weights but the embedding table, plus the (32 positions) KV cache
        assert r["bytes_per_decode_step"] == r["weight_bytes"] - 512 * 128 * 4 + 2 * 2 * 2 * 32 * 32 * 4
        assert r["roofline_fraction"] == pytest.approx(
            r["decode_tokens_per_sec"] * r["bytes_per_decode_step"] / 1e11
        )
        assert r["ppl"]["tokens"] == 255 - 3 and r["ppl"]["window"] == 64  # 4 windows of 64: 4 x 63 targets
        assert r["peak_memory_bytes"] >= r["peak_memory_after_load_bytes"] > r["baseline_memory_bytes"] > 0
    assert nf4["weight_bytes"] < fp32["weight_bytes"]
    assert nf4["perplexity"] != fp32["perplexity"]
    # the terminal table and the Markdown one carry the same rows
    for line_start in ("32-true ", "bnb.nf4@32-true "):
        assert any(l.startswith(line_start) for l in p.stdout.splitlines())
    md = (out / "benchmark.md").read_text()
    assert "| mode | load s | weights MB |" in md and f"| {fp32['perplexity']:.3f} |" in md
    assert env["device_name"] in md and env["commit"] in md
    try:
        import matplotlib  # noqa: F401

        assert (out / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "Skipping the PNG chart" in p.stderr and not (out / "benchmark.png").exists()


def test_numbers_agree_with_generate_and_evaluate(ckpt, tmp_path):
    """Same generate() and perplexity() as the jobs: the same tokens and the same perplexity."""
    from litquant.jobs.evaluate import main as evaluate_main
    from litquant.jobs.generate import main as generate_main
    from litquant.tokenizer import Tokenizer

    report = main(
        ckpt,
        modes="32-true",
        prompt_tokens=24,
        max_new_tokens=8,
        runs=1,
        warmup=0,
        ppl_tokens=300,
        isolate=False,
        out_dir=tmp_path,
        accelerator="cpu",
    )
    r = report["results"][0]
    ev = evaluate_main(ckpt, precision="32-true", max_tokens=300, accelerator="cpu")
    assert ev["perplexity"] == r["perplexity"] and ev["tokens_scored"] == r["ppl"]["tokens"]

    samples = generate_main(
        r["prompt_text"],
        checkpoint_dir=ckpt,
        max_new_tokens=8,
        temperature=0.0,
        precision="32-true",
        accelerator="cpu",
    )
    tok = Tokenizer(ckpt)
    prompt = tok.encode(r["prompt_text"])
    assert prompt.numel() == 24
    # generate stops at a stop token; the benchmark always makes all 8: compare up to where generate stopped
    new = r["new_token_ids"]
    stop = next((i + 1 for i, t in enumerate(new) if t in tok.stop_ids), len(new))
    assert samples[0] == tok.decode(prompt.tolist() + new[:stop])
    assert r["text"] == tok.decode(prompt.tolist() + new)


def test_random_init_memory_is_per_mode_and_never_a_full_precision_copy(tmp_path):
    """pythia-160m (162M params, 85M in block Linears) with random weights, each mode in its own process."""
    from litquant.config import Config
    from litquant.estimate import weight_bytes

    if "bnb.nf4" not in quantize_modes():
        pytest.skip("bnb modes are not registered")
    report = main(
        random_init=True,
        model_name="pythia-160m",
        modes="32-true,bnb.nf4@32-true",
        prompt_tokens=8,
        max_new_tokens=4,
        runs=1,
        warmup=0,
        threads=1,
        out_dir=tmp_path,
        accelerator="cpu",
    )
    fp32, nf4 = report["results"]
    assert "error" not in fp32 and "error" not in nf4, report["results"]
    config = Config.from_name("pythia-160m")
    fp32_bytes = weight_bytes(config, "32-true")["bytes"]
    assert fp32["weight_bytes"] == fp32_bytes
    assert nf4["weight_bytes"] == pytest.approx(weight_bytes(config, "bnb.nf4", "32-true")["bytes"], rel=0.02)
    # no weights, no tokenizer: speed and memory only
    assert fp32["perplexity"] is None and fp32["text"] is None
    for r in (fp32, nf4):
        # the process's memory grew by at least the weights while loading
        assert r["peak_memory_after_load_bytes"] - r["baseline_memory_bytes"] >= 0.9 * r["weight_bytes"]
    # per layer: the nf4 process never held the fp32 model (650 MB), only its own weights (357 MB) + one layer
    assert nf4["peak_memory_after_load_bytes"] - nf4["baseline_memory_bytes"] < 0.85 * fp32_bytes
    # fresh counters per mode: the nf4 process's peak is its own, below the fp32 one
    assert nf4["peak_memory_bytes"] < fp32["peak_memory_bytes"]


def test_default_modes_follow_the_registry_and_the_gptq_file(tmp_path):
    registered = set(quantize_modes())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    modes = default_modes(ckpt, random_init=False)
    assert modes[:2] == ["32-true", "bf16-true"]
    expected_bnb = [
        m for m in ("bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8") if m in registered
    ]
    assert modes[2:] == expected_bnb
    (ckpt / gptq_file(4)).write_bytes(b"")
    with_gptq = default_modes(ckpt, random_init=False)
    assert ("gptq.int4" in with_gptq) == ("gptq.int4" in registered)
    assert "gptq.int4" not in default_modes(ckpt, random_init=True)


def test_run_stats_medians():
    runs = [
        dict(prompt_tokens=10, new_tokens=5, prefill_s=0.1, decode_s=0.4, decode_steps=4),
        dict(prompt_tokens=10, new_tokens=5, prefill_s=0.2, decode_s=0.8, decode_steps=4),
        dict(prompt_tokens=10, new_tokens=5, prefill_s=0.5, decode_s=2.0, decode_steps=4),
    ]
    s = run_stats(runs)
    assert s["prefill_tokens_per_sec"] == pytest.approx(50.0) and s["decode_tokens_per_sec"] == pytest.approx(
        5.0
    )
    assert s["time_to_first_token_s"] == 0.2 and s["tokens_per_sec"] == pytest.approx(5 / 1.0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(modes="bnb.nf9"), "unknown mode 'bnb.nf9'"),
        (dict(modes="bnb.nf4@fp8"), "unknown --precision 'fp8'"),
        (dict(prompt_tokens=60, max_new_tokens=8), "exceed the model's context of 64 tokens"),
        (dict(runs=0), "--runs must be at least 1"),
        (dict(compile=True, accelerator="cpu"), "--compile is for CUDA"),
        (dict(random_init=True), "--random_init needs --model_name"),
        (dict(model_name="pythia-160m"), "--model_name is for --random_init"),
        (dict(random_init=True, model_name="Llama-9b"), "unknown model name"),
    ],
)
def test_bad_input_fails_before_any_work(ckpt, tmp_path, kwargs, message):
    kwargs = {"accelerator": "cpu", "prompt_tokens": 24, "max_new_tokens": 8, **kwargs}
    with pytest.raises(UserError, match=re.escape(message)):
        main(ckpt, out_dir=tmp_path, **kwargs)
    assert not (tmp_path / "benchmark.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_static_cache_and_roofline(tmp_path):
    report = main(
        random_init=True,
        model_name="pythia-160m",
        modes="bf16-true,bnb.nf4",
        prompt_tokens=16,
        max_new_tokens=16,
        runs=2,
        warmup=2,
        compile=True,
        accelerator="cuda",
        out_dir=tmp_path,
    )
    for r in report["results"]:
        assert "error" not in r, r
        assert r["compiled"] and r["decode_tokens_per_sec"] > 0
        if report["bandwidth"]:
            assert 0 < r["roofline_fraction"] < 1.0


def test_gptq_file_and_peer_machine_info_come_from_litquant():
    """The benchmark's GPTQ file name is the plugin's; the peer scripts' machine() reports the CPU and commit
    as `litquant benchmark` does, under the keys their JSON has always had."""
    import importlib.util

    from litquant.benchmark.environment import cpu_name, git_commit

    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    m = common.machine()
    assert set(m) == {"cpu", "cores", "torch_threads", "torch", "commit", "loadavg_1m_at_start"}
    # (the +dirty mark may change meanwhile: other work goes on in this checkout)
    assert (
        m["cpu"] == cpu_name() and m["commit"].split("+")[0] == (git_commit() or "uncommitted").split("+")[0]
    )
