"""Shared fixtures: small checkpoints made on the fly (no downloads), CUDA marker handling."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# a few KB of text every Python carries, for tokenizers made in tests
import pydoc_data.topics  # noqa: E402

SAMPLE_TEXT = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:12])


def make_checkpoint(
    path: Path, name: str = "tiny-llama-test", seed: int = 0, vocab_size: int = 320, **overrides
) -> Path:
    """A litquant checkpoint dir with random weights (seeded) and a small trained BPE tokenizer."""
    from litquant.checkpoint import save_checkpoint
    from litquant.config import Config
    from litquant.model import GPT
    from litquant.tokenizer import train_bpe_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer([SAMPLE_TEXT], vocab_size, path)
    config = Config.from_name(name, vocab_size=tok.vocab_size, padded_vocab_size=None, **overrides)
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights(std=0.05)
    save_checkpoint(model.state_dict(), config, path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama-test")


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `litquant <args>` (through `python -m litquant.cli`, so no install is needed)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "litquant.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
    )


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---- litquant's CPU kernels: the builds their tests run against ------------------------------------------------

KERNEL_BUILDS = {"native": (), "avx2": ("-mno-avx512f",), "plain": ("-mno-avx512f", "-mno-avx2", "-mno-fma")}


def cpu_has(flag: str) -> bool:
    try:
        return flag in next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return False


def use_kernel_build(monkeypatch, name: str) -> str:
    """Point `cpu_kernels.lib()` (which every wrapper calls) at one build of the kernels."""
    from litquant.quantization import cpu_kernels as ck

    if name != "plain" and not cpu_has("avx2"):
        pytest.skip("no AVX2 on this CPU")
    handle = ck.load(KERNEL_BUILDS[name])
    monkeypatch.setattr(ck, "lib", lambda: handle)
    return name


def rel(a, b) -> float:
    """Relative error of a against b (Frobenius norm, fp64)."""
    return float((a.double() - b.double()).norm() / b.double().norm())
