"""Multi-device finetuning on CPU: 2 processes with the gloo backend (DDP, and FSDP2 `fully_shard`) must end with
the same adapter on both ranks and reproduce the single-process run with the same global batch, step by step."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_checkpoint, run_cli
from safetensors.torch import load_file

from litquant.lora import LORA_FILE

pytestmark = pytest.mark.slow  # each case starts 2 Python processes (~15 s)

STEPS = 5


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("multidevice")
    ckpt = make_checkpoint(root / "ckpt", name="tiny-llama-test", seed=3)
    rng = random.Random(0)
    words = "cat dog fish bird tree leaf rock sand".split()
    rows = []
    for _ in range(64):
        w = rng.sample(words, 3)
        rows.append({"instruction": "Reverse: " + " ".join(w), "input": "", "output": " ".join(reversed(w))})
    data = root / "reverse.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, ckpt, data


def _args(ckpt, data, out_dir, quantize):
    args = [
        "--checkpoint_dir",
        str(ckpt),
        "--out_dir",
        str(out_dir),
        "--data.path",
        str(data),
        "--data.prompt_style",
        "default",
        "--data.max_seq_length",
        "64",
        "--train.global_batch_size",
        "8",
        "--train.micro_batch_size",
        "4",
        "--train.max_steps",
        str(STEPS),
        "--train.learning_rate",
        "0.02",
        "--train.lr_warmup_steps",
        "0",
        "--lora_dropout",
        "0",
        "--lora_mlp",
        "true",
        "--eval.interval",
        "100",
        "--eval.max_iters",
        "2",
        "--eval.sample_max_new_tokens",
        "0",
        "--accelerator",
        "cpu",
        "--precision",
        "32-true",
        "--logger",
        "csv",
    ]
    return args + (["--quantize", quantize] if quantize else [])


@pytest.fixture(scope="module")
def single_runs(setup_dir):
    """The reference: one process, micro-batch 4, gradient accumulation 2 (global batch 8)."""
    root, ckpt, data = setup_dir
    out = {}
    for quantize in (None, "bnb.nf4"):
        out_dir = root / f"single-{quantize}"
        res = run_cli("finetune", "lora", *_args(ckpt, data, out_dir, quantize), env={"OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stderr
        out[quantize] = out_dir
    return out


def _compare(out_dir, ref_dir, first_step: int = 1):
    multi = json.loads((out_dir / "metrics.json").read_text())
    single = json.loads((ref_dir / "metrics.json").read_text())
    assert multi["world_size"] == 2 and single["world_size"] == 1
    ls, lm = torch.tensor(single["train_losses"]), torch.tensor(multi["train_losses"])
    assert lm[:, 0].tolist() == list(range(first_step, STEPS + 1)) and ls[:, 0].tolist() == list(
        range(1, STEPS + 1)
    )
    assert ls[-1, 1] < ls[0, 1] - 0.1  # it trained (so matching curves are not trivially flat)
    torch.testing.assert_close(lm[:, 1], ls[first_step - 1 :, 1], rtol=1e-5, atol=1e-5)
    assert multi["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    a, b = load_file(str(out_dir / LORA_FILE)), load_file(str(ref_dir / LORA_FILE))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    return multi


@pytest.mark.parametrize("strategy,quantize", [("ddp", "bnb.nf4"), ("fsdp", "bnb.nf4"), ("fsdp", None)])
def test_two_processes_match_single_process(setup_dir, single_runs, strategy, quantize):
    """DDP and FSDP2 over a bnb 4-bit base (QLoRA; under FSDP the 4-bit storage stays replicated, the adapters and
    full-precision weights are sharded) and FSDP over a full-precision base, which also saves a checkpoint."""
    root, ckpt, data = setup_dir
    out_dir = root / f"{strategy}-{quantize}"
    extra = ["--train.save_interval", "2"] if quantize is None else []
    res = run_cli(
        "finetune",
        "lora",
        *_args(ckpt, data, out_dir, quantize),
        "--devices",
        "2",
        "--strategy",
        strategy,
        *extra,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "distributed_backend=gloo" in res.stderr + res.stdout
    multi = _compare(out_dir, single_runs[quantize])
    if strategy == "ddp":  # both ranks hold a full replica: compared weight by weight across ranks
        assert multi["max_rank_divergence"] == 0.0


def test_fsdp_checkpoint_resumes_on_two_processes(setup_dir, single_runs):
    """The sharded run above saved the full (gathered) adapter + optimizer state at step 2; two ranks resume from
    it and continue on the single-process curve."""
    root, ckpt, data = setup_dir
    checkpoint = root / "fsdp-None" / "step-000002"
    if not checkpoint.is_dir():
        pytest.skip("needs the FSDP run of test_two_processes_match_single_process")
    out_dir = root / "fsdp-resumed"
    res = run_cli(
        "finetune",
        "lora",
        *_args(ckpt, data, out_dir, None),
        "--devices",
        "2",
        "--strategy",
        "fsdp",
        "--resume",
        str(checkpoint),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    multi = _compare(out_dir, single_runs[None], first_step=3)
    assert multi["start_step"] == 2
