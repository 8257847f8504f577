"""The finetune jobs: data loading and masking, batch layout, LR schedule, the bundled task (learned by a short
QLoRA run), config files, logs, checkpoints and resume after a kill, optimizers, full finetuning, LoRA over a GPTQ
base, and the quantize -> finetune -> merge -> GPTQ -> generate pipeline."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_checkpoint, run_cli

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, WEIGHTS_FILE, load_model
from litquant.data.instructions import (
    BUNDLED_TASK_FILE,
    IGNORE_INDEX,
    collate,
    encode_dataset,
    encode_example,
    exact_match,
    format_prompt,
    generate_bundled_task,
    load_instructions,
    load_splits,
    split_train_val,
    task_kind,
)
from litquant.errors import UserError
from litquant.jobs.finetune import full, lora
from litquant.lora import LORA_FILE, load_lora
from litquant.precision import resolve
from litquant.prompts import Alpaca, PromptStyle
from litquant.tokenizer import Tokenizer
from litquant.training.args import DataArgs, EvalArgs, TrainArgs
from litquant.training.data import train_batch_indices
from litquant.training.optim import lr_at
from litquant.training.run import RunSpec

BUNDLED = DEFAULT_CHECKPOINT_DIR
HAS_BUNDLED = (BUNDLED / WEIGHTS_FILE).is_file()
QLORA_YAML = REPO / "config_hub" / "finetune" / "litquant-tiny" / "qlora.yaml"
LORA_YAML = REPO / "config_hub" / "finetune" / "litquant-tiny" / "lora.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Jobs run in-process here: one intra-op thread keeps them fast on 2 shared cores (and like the CLI runs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _reverse_rows(n: int = 64, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = "cat dog fish bird tree leaf rock sand".split()
    rows = []
    for _ in range(n):
        w = rng.sample(words, 3)
        rows.append({"instruction": "Reverse: " + " ".join(w), "input": "", "output": " ".join(reversed(w))})
    return rows


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny random model and a tiny dataset, for the job mechanics."""
    root = tmp_path_factory.mktemp("finetune")
    ckpt = make_checkpoint(root / "ckpt", name="tiny-llama-test", seed=7)
    data = root / "reverse.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _reverse_rows()) + "\n")
    return root, ckpt, data


def _small_kwargs(ckpt, data, out_dir, steps=6, **train):
    return dict(
        checkpoint_dir=ckpt,
        out_dir=out_dir,
        accelerator="cpu",
        precision="32-true",
        lora_dropout=0.1,
        lora_mlp=True,
        data=DataArgs(path=data, prompt_style="default", max_seq_length=64),
        train=TrainArgs(
            global_batch_size=8,
            micro_batch_size=4,
            max_steps=steps,
            learning_rate=0.02,
            lr_warmup_steps=2,
            **train,
        ),
        eval=EvalArgs(interval=3, max_iters=2, sample_max_new_tokens=4),
    )


# ---- data ---------------------------------------------------------------------------------------------------


def test_load_json_jsonl_and_directories(tmp_path):
    rows = _reverse_rows(10)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]))
    assert load_instructions(tmp_path / "a.json") == rows
    assert load_instructions(tmp_path / "b.jsonl") == rows[:4]
    assert len(load_instructions(tmp_path)) == 14  # a directory: every .json/.jsonl in it
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    (split_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:7]))
    (split_dir / "val.json").write_text(json.dumps(rows[7:]))
    train, val = load_splits(split_dir, 0.5, 0)
    assert train == rows[:7] and val == rows[7:]  # its own split, not a random one

    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    (tmp_path / "broken.json").write_text('[{"instruction": "x", "output": ')
    with pytest.raises(UserError, match="holds no examples"):
        load_instructions(tmp_path / "empty.json")
    with pytest.raises(UserError, match="need 'instruction' and 'output'"):
        load_instructions(tmp_path / "nofield.jsonl")
    with pytest.raises(UserError, match="cannot read instruction data"):
        load_instructions(tmp_path / "broken.json")
    with pytest.raises(UserError, match="does not exist"):
        load_instructions(tmp_path / "missing.json")


def test_split_is_seeded_and_disjoint():
    rows = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(100)]
    t1, v1 = split_train_val(rows, 0.1, seed=3)
    t2, v2 = split_train_val(rows, 0.1, seed=3)
    t3, v3 = split_train_val(rows, 0.1, seed=4)
    assert (t1, v1) == (t2, v2) and v1 != v3
    assert len(v1) == 10 and len(t1) == 90
    assert {r["instruction"] for r in t1}.isdisjoint(r["instruction"] for r in v1)


def test_prompt_masking_truncation_and_collate(tiny_checkpoint):
    tok = Tokenizer(tiny_checkpoint)
    style = Alpaca()
    ex = {"instruction": "Add the numbers.", "input": "1 2", "output": "3 and more"}
    prompt_ids = tok.encode(style.apply("Add the numbers.", input="1 2"))
    enc = encode_example(tok, style, ex, max_seq_length=1000)
    n = prompt_ids.numel()
    assert enc.prompt_len == n and torch.equal(enc.input_ids[:n], prompt_ids)
    assert (enc.labels[:n] == IGNORE_INDEX).all()  # the prompt is masked ...
    assert torch.equal(enc.labels[n:], enc.input_ids[n:])  # ... the answer is not
    assert enc.input_ids[-1].item() == tok.eos_id
    assert tok.decode(enc.input_ids[n:]) == "3 and more"
    unmasked = encode_example(tok, style, ex, max_seq_length=1000, mask_prompt=False)
    assert torch.equal(unmasked.labels, unmasked.input_ids)

    cut = encode_example(tok, style, ex, max_seq_length=n + 2)
    assert cut.input_ids.numel() == n + 2 and torch.equal(cut.input_ids, enc.input_ids[: n + 2])
    kept, kept_rows = encode_dataset(tok, style, [ex, {**ex, "input": "word " * 200}], max_seq_length=n + 2)
    assert len(kept) == 1 and kept_rows == [ex]  # the second one has no answer token left

    x, y = collate([cut, enc], pad_id=tok.eos_id)
    assert x.shape == y.shape == (2, enc.input_ids.numel())
    assert (y[0, n + 2 :] == IGNORE_INDEX).all() and (x[0, n + 2 :] == tok.eos_id).all()


def test_batch_layout_gives_every_device_count_the_same_global_batch():
    def run(world: int) -> RunSpec:
        return RunSpec(
            kind="lora",
            checkpoint_dir=Path("."),
            out_dir=Path("."),
            precision=None,
            quantize=None,
            devices=world,
            num_nodes=1,
            strategy="auto",
            accelerator="cpu",
            data=DataArgs(seed=5),
            train=TrainArgs(global_batch_size=8, micro_batch_size=2),
            eval=EvalArgs(),
            optimizer="AdamW",
            logger="csv",
            resume=False,
            seed=0,
            hparams={},
        )

    n = 50  # 6 steps per epoch, 2 examples left over
    for step in (0, 5, 6, 13):
        one = train_batch_indices(n, step, run(1), 0)  # 4 micro-batches of accumulation
        assert len(one) == 4 and all(len(b) == 2 for b in one)
        four = [
            b for r in range(4) for b in train_batch_indices(n, step, run(4), r)
        ]  # 1 micro-batch per rank
        two = [b for r in range(2) for b in train_batch_indices(n, step, run(2), r)]
        assert one == two == four  # the same micro-batches, in the same order
    epoch0 = [i for s in range(6) for b in train_batch_indices(n, s, run(1), 0) for i in b]
    assert len(set(epoch0)) == 48  # an epoch visits distinct examples
    epoch1 = [i for s in range(6, 12) for b in train_batch_indices(n, s, run(1), 0) for i in b]
    assert epoch1 != epoch0  # and the next one reshuffles


def test_lr_schedule():
    t = TrainArgs(learning_rate=1.0, min_lr=0.1, lr_warmup_steps=4)
    assert [lr_at(s, 20, t) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, t) == pytest.approx(1.0)
    assert lr_at(12, 20, t) == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()))
    assert lr_at(20, 20, t) == pytest.approx(0.1)


def test_bundled_task_file_is_reproducible_and_correct():
    import ast

    committed = json.loads(BUNDLED_TASK_FILE.read_text())
    assert committed == generate_bundled_task()  # the committed file is what the seeded generator makes
    assert len({(r["instruction"], r["input"]) for r in committed}) == len(committed)  # no duplicates
    kinds = [task_kind(r) for r in committed]
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "func": 750,
        "call": 750,
        "import": 750,
        "attribute": 750,
    }
    ops = {"sum": "+", "difference": "-", "product": "*", "quotient": "/", "remainder": "%"}
    for r in committed[:400]:
        w = r["instruction"].rstrip(".").split()
        ast.parse(r["output"])  # every answer is valid Python
        if task_kind(r) == "func":  # Write a Python function NAME that returns the OP of A and B
            name, op, a, b = w[4], w[8], w[10], w[12]
            assert r["output"] == f"def {name}({a}, {b}):\n    return {a} {ops[op]} {b}"
            code = {}
            exec(r["output"], code)  # and it computes the operation
            assert code[name](7, 3) == eval(f"7 {ops[op]} 3")
        elif task_kind(r) == "call":  # Call NAME with A and B
            assert r["output"] == f"{w[1]}({w[3]}, {w[5]})"
        elif task_kind(r) == "import":  # Import NAME from the MODULE module
            assert r["output"] == f"from {w[4]} import {w[1]}"
        else:  # Get the ATTR attribute of OBJ
            assert r["output"] == f"{w[5]}.{w[2]}"


# ---- the bundled task: QLoRA on the bundled model learns it -------------------------------------------------


@pytest.fixture(scope="module")
def bundled_qlora(tmp_path_factory):
    """The shipped QLoRA config on the bundled model, shortened: validation and exact match before and after."""
    if not HAS_BUNDLED:
        pytest.skip("the bundled model checkpoints/litquant-tiny is not there")
    out_dir = tmp_path_factory.mktemp("bundled") / "qlora"
    cfg = yaml.safe_load(QLORA_YAML.read_text())
    train = {**cfg["train"], "max_steps": 100, "save_interval": None}
    ev = {
        **cfg["eval"],
        "interval": 1000,
        "initial_validation": True,
        "exact_match_examples": 60,
        "sample_max_new_tokens": 0,
    }
    kwargs = {k: v for k, v in cfg.items() if k not in ("train", "eval", "data", "out_dir")}
    metrics = lora(
        **kwargs, out_dir=out_dir, data=DataArgs(**cfg["data"]), train=TrainArgs(**train), eval=EvalArgs(**ev)
    )
    return out_dir, metrics, cfg


@pytest.mark.slow
def test_qlora_on_the_bundled_model_learns_the_bundled_task(bundled_qlora):
    out_dir, m, cfg = bundled_qlora
    assert cfg["quantize"].startswith("bnb.")  # it is QLoRA: a 4-bit frozen base
    assert m["val_loss"] < m["val_loss_before"] - 1.0, m
    assert m["exact_match_before"] <= 0.05  # the base model cannot do it ...
    # ... after 100 steps it often can (held-out examples; the full 300-step config reaches ~0.8)
    assert m["exact_match"] >= m["exact_match_before"] + 0.2, m
    assert (out_dir / LORA_FILE).is_file()


# ---- config files, errors --------------------------------------------------------------------------------------


def test_config_file_with_cli_overrides_and_print_config(tmp_path):
    out = run_cli(
        "finetune",
        "lora",
        "--config",
        str(QLORA_YAML),
        "--train.max_steps",
        "7",
        "--lora_r",
        "2",
        "--print_config",
    )
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    file_cfg = yaml.safe_load(QLORA_YAML.read_text())
    assert printed["train"]["max_steps"] == 7 and printed["lora_r"] == 2  # flags win over the file
    assert printed["quantize"] == file_cfg["quantize"]
    # the file over defaults
    assert printed["train"]["micro_batch_size"] == file_cfg["train"]["micro_batch_size"]
    assert {"data", "train", "eval", "optimizer", "resume", "lora_alpha"} <= set(printed)  # complete
    # the printed YAML is itself a valid config
    (tmp_path / "printed.yaml").write_text(out.stdout)
    again = run_cli("finetune", "lora", "--config", str(tmp_path / "printed.yaml"), "--print_config")
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == printed


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train.max_stepz", "3"], "max_stepz"),
        (["--lora_r", "two"], 'Parser key "lora_r"'),
        (["--config", "BAD_KEY_YAML"], "does not accept option 'max_step'"),
    ],
)
def test_bad_flags_and_config_keys_are_one_clear_line(tmp_path, args, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: 4\ntrain:\n  max_step: 3\n")
    args = [str(bad) if a == "BAD_KEY_YAML" else a for a in args]
    proc = subprocess.run(
        [sys.executable, str(REPO / "finetune" / "lora.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_run_settings_are_user_errors(small, tmp_path):
    root, ckpt, data = small
    kw = _small_kwargs(ckpt, data, tmp_path / "x")
    with pytest.raises(UserError, match="multiple of micro_batch_size"):
        lora(**{**kw, "train": TrainArgs(global_batch_size=6, micro_batch_size=4)})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no examples"):
        lora(**{**kw, "data": DataArgs(path=tmp_path / "empty.jsonl", prompt_style="default")})
    with pytest.raises(UserError, match="unknown prompt style"):
        lora(**{**kw, "data": DataArgs(path=data, prompt_style="nope")})
    with pytest.raises(UserError, match="fewer than one global batch"):
        lora(**{**kw, "train": TrainArgs(global_batch_size=64, micro_batch_size=4)})
    with pytest.raises(UserError, match="unknown --optimizer"):
        lora(**kw, optimizer="SGD")
    # optimizer and evaluation values outside their range: caught before anything loads
    for train, message in [
        (dict(beta2=1.0), r"--train.beta1 and --train.beta2 must be in \[0, 1\)"),
        (dict(beta1=-0.1), r"--train.beta1 and --train.beta2 must be in \[0, 1\)"),
        (dict(weight_decay=-0.01), "--train.weight_decay must be at least 0"),
        (dict(max_norm=0.0), "--train.max_norm must be positive"),
        (dict(lr_warmup_steps=-1), "--train.lr_warmup_steps must be at least 0"),
    ]:
        with pytest.raises(UserError, match=message):
            lora(**{**kw, "train": TrainArgs(global_batch_size=8, micro_batch_size=4, **train)})
    with pytest.raises(UserError, match="--eval.max_iters must be at least 1"):
        lora(**{**kw, "eval": EvalArgs(max_iters=0)})
    with pytest.raises(
        UserError, match="--eval.exact_match_examples and --eval.sample_max_new_tokens must be at"
    ):
        lora(**{**kw, "eval": EvalArgs(exact_match_examples=-1)})


# ---- logs, checkpoints, resume ---------------------------------------------------------------------------------


def _csv_metrics(out_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((out_dir / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def _cli_args(ckpt, data, out_dir, steps, save_interval):
    return [
        "--checkpoint_dir",
        str(ckpt),
        "--out_dir",
        str(out_dir),
        "--accelerator",
        "cpu",
        "--precision",
        "32-true",
        "--lora_dropout",
        "0.1",
        "--lora_mlp",
        "true",
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
        str(steps),
        "--train.learning_rate",
        "0.02",
        "--train.lr_warmup_steps",
        "2",
        "--train.save_interval",
        str(save_interval),
        "--eval.interval",
        "1000",
        "--eval.max_iters",
        "2",
        "--eval.sample_max_new_tokens",
        "0",
    ]


@pytest.mark.slow
def test_resume_after_kill_continues_the_same_loss_curve(small, tmp_path):
    root, ckpt, data = small
    steps = 40
    ref = lora(
        **{
            **_small_kwargs(ckpt, data, tmp_path / "ref", steps=steps),
            "eval": EvalArgs(interval=1000, max_iters=2, sample_max_new_tokens=0),
        }
    )

    out_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "litquant.cli", "finetune", "lora", *_cli_args(ckpt, data, out_dir, steps, 4)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while not (out_dir / "step-000008").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: as if the machine went away
    proc.wait()
    assert not (out_dir / LORA_FILE).exists(), "the run finished before it could be killed"
    saved = sorted(p.name for p in out_dir.glob("step-*"))
    assert "step-000008" in saved and all((out_dir / s / "train_state.safetensors").is_file() for s in saved)
    latest = int(saved[-1][5:])

    res = run_cli(
        "finetune",
        "lora",
        *_cli_args(ckpt, data, out_dir, steps, 4),
        "--resume",
        "true",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"Resuming from {out_dir / saved[-1]} at step {latest}" in res.stdout + res.stderr
    resumed = json.loads((out_dir / "metrics.json").read_text())
    assert resumed["start_step"] == latest
    assert [s for s, _ in resumed["train_losses"]] == list(range(latest + 1, steps + 1))
    ref_losses = dict((s, v) for s, v in ref["train_losses"])
    for s, v in resumed["train_losses"]:
        assert v == pytest.approx(ref_losses[s], rel=1e-5, abs=1e-6), (s, v, ref_losses[s])
    from safetensors.torch import load_file

    a, b = load_file(str(out_dir / LORA_FILE)), load_file(str(tmp_path / "ref" / LORA_FILE))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert not list(out_dir.glob(".step-*.tmp"))  # no half-written checkpoint left behind

    # a fresh run into the same out_dir must not silently mix with the old checkpoints
    again = run_cli("finetune", "lora", *_cli_args(ckpt, data, out_dir, steps, 4))
    assert again.returncode == 1 and "pass --resume true" in again.stderr

    # logs: TensorBoard scalars and CSV columns of both runs (the killed one and the resumed one)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for version in (out_dir / "logs" / "tensorboard").glob("version_*"):
        acc = EventAccumulator(str(version))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_sec", "val_loss", "memory_gb"} <= tags
    rows = _csv_metrics(out_dir)
    logged_steps = sorted({int(r["step"]) for r in rows if r.get("loss")})
    assert logged_steps[-1] == steps and latest + 1 in logged_steps
    hp = yaml.safe_load((out_dir / "hyperparameters.yaml").read_text())
    assert hp["train"]["max_steps"] == steps and hp["lora_mlp"] is True and hp["resume"] is True


@pytest.mark.parametrize(
    "value,parsed",
    [("true", True), ("false", False), ("auto", "auto"), ("out/run/step-000004", "out/run/step-000004")],
)
def test_resume_flag_parses_true_false_auto_and_a_path(value, parsed, capsys):
    from litquant.cli import main as cli

    with pytest.raises(SystemExit) as exit_:
        cli(["finetune", "lora", "--resume", value, "--print_config"])
    assert exit_.value.code in (None, 0)
    assert yaml.safe_load(capsys.readouterr().out)["resume"] == parsed


def test_resume_true_without_a_checkpoint_is_one_line_naming_out_dir(small, tmp_path):
    root, ckpt, data = small
    out_dir = tmp_path / "fresh"
    with pytest.raises(UserError, match=f"--resume true: {re.escape(str(out_dir))} holds no checkpoint"):
        lora(**_small_kwargs(ckpt, data, out_dir, steps=2), resume=True)
    assert not out_dir.exists()  # refused before anything started
    res = run_cli("finetune", "lora", *_cli_args(ckpt, data, out_dir, 2, 4), "--resume", "true")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: --resume true: ") and str(out_dir) in lines[0]


def test_resume_auto_starts_from_scratch_then_continues_the_latest_checkpoint(small, tmp_path, capsys):
    root, ckpt, data = small
    out_dir = tmp_path / "auto"
    kw = {
        **_small_kwargs(ckpt, data, out_dir, steps=4, save_interval=2),
        "eval": EvalArgs(interval=1000, max_iters=1, sample_max_new_tokens=0),
    }
    first = lora(**kw, resume="auto")
    out = capsys.readouterr().out
    assert (
        f"--resume auto: no checkpoint in {out_dir}, starting from scratch" in out and "Resuming" not in out
    )
    assert first["start_step"] == 0 and (out_dir / "step-000002").is_dir()
    again = lora(**kw, resume="auto")
    out = capsys.readouterr().out
    assert f"Resuming from {out_dir / 'step-000002'} at step 2" in out and "--resume auto" not in out
    assert again["start_step"] == 2 and [s for s, _ in again["train_losses"]] == [3, 4]
    assert [v for _, v in again["train_losses"]] == pytest.approx(
        [v for _, v in first["train_losses"][2:]], rel=1e-5, abs=1e-6
    )


def test_bnb_optimizer_state_is_checkpointed_and_paged_falls_back_on_cpu(small, tmp_path, capsys):
    root, ckpt, data = small
    kw = {**_small_kwargs(ckpt, data, tmp_path / "opt", steps=4, save_interval=2), "lora_r": 32}
    m = lora(**kw, optimizer="PagedAdamW8bit")
    assert "paged optimizers page to CPU memory from a GPU; on CPU using AdamW8bit" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "opt" / "step-000002" / "train_state.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    a_state = "optimizer/state/transformer.h.0.attn.qkv.lora_A/__bnb_optimizer_quant_state__"
    # bnb's 8-bit Adam state
    assert dtypes[f"{a_state}/state1"] == torch.uint8 and f"{a_state}/absmax1" in dtypes
    resumed = lora(
        **{**kw, "out_dir": tmp_path / "opt"},
        optimizer="PagedAdamW8bit",
        resume=tmp_path / "opt" / "step-000002",
    )
    assert [s for s, _ in resumed["train_losses"]] == [3, 4]
    assert resumed["train_losses"][-1][1] == pytest.approx(m["train_losses"][-1][1], rel=1e-5)


def test_resume_from_a_mismatched_or_damaged_checkpoint_is_one_clear_line(small, tmp_path):
    """A step dir of the other kind of run, a truncated or incomplete one, another LoRA config or optimizer: each is
    a UserError naming the problem (the CLI prints it as one `error:` line), never a raw KeyError/SafetensorError."""
    import shutil

    from litquant.io import save_safetensors

    root, ckpt, data = small
    kw = {
        **_small_kwargs(ckpt, data, tmp_path / "lora", steps=4, save_interval=2),
        "eval": EvalArgs(interval=1000, max_iters=1, sample_max_new_tokens=0),
    }
    lora(**kw)
    step = tmp_path / "lora" / "step-000002"
    assert (step / LORA_FILE).is_file() and (step / "train_state.safetensors").is_file()

    def resume(directory: Path, **over):
        return lora(**{**kw, "out_dir": tmp_path / "resumed", **over}, resume=directory)

    full_kw = {k: v for k, v in kw.items() if not k.startswith("lora_")}
    with pytest.raises(UserError, match=r"is a checkpoint of a LoRA run .*, not of a full finetuning run"):
        full(**{**full_kw, "out_dir": tmp_path / "full"}, resume=step)

    def damaged(name: str, damage) -> Path:
        d = tmp_path / name
        shutil.copytree(step, d)
        damage(d)
        return d

    def truncate(path: Path) -> None:
        os.truncate(path, path.stat().st_size // 2)

    with pytest.raises(UserError, match="lit_model.lora.safetensors is not a valid safetensors file"):
        resume(damaged("trunc-weights", lambda d: truncate(d / LORA_FILE)))
    with pytest.raises(UserError, match="train_state.safetensors is not a valid safetensors file"):
        resume(damaged("trunc-state", lambda d: truncate(d / "train_state.safetensors")))
    with pytest.raises(
        UserError, match="is not a complete checkpoint: lit_model.lora.safetensors is missing"
    ):
        resume(damaged("no-weights", lambda d: (d / LORA_FILE).unlink()))
    no_counters = {"format": "pt", "litquant_train_state": "1"}
    with pytest.raises(UserError, match="its metadata lacks valid 'counters' and 'optimizer' entries"):
        resume(
            damaged(
                "no-counters",
                lambda d: save_safetensors(
                    {"_empty": torch.zeros(0)}, d / "train_state.safetensors", metadata=no_counters
                ),
            )
        )
    # these two fail after loading the model: the files are fine, they do not fit this run
    with pytest.raises(
        UserError, match=r"lacks transformer\.h\.0\.attn\.proj\.lora_A.*another model or LoRA config"
    ):
        resume(step, lora_projection=True)
    with pytest.raises(
        UserError, match="holds the state of a torch.optim.adamw.AdamW optimizer.*--optimizer"
    ):
        resume(step, optimizer="AdamW8bit")

    out = run_cli(
        "finetune",
        "full",
        "--checkpoint_dir",
        str(ckpt),
        "--out_dir",
        str(tmp_path / "cli"),
        "--accelerator",
        "cpu",
        "--data.path",
        str(data),
        "--resume",
        str(step),
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and "is a checkpoint of a LoRA run" in lines[0]


# ---- full finetuning -------------------------------------------------------------------------------------------


def test_full_finetune_writes_a_usable_checkpoint(small, tmp_path):
    root, ckpt, data = small
    kw = _small_kwargs(ckpt, data, tmp_path / "full", steps=6)
    kw.pop("lora_dropout"), kw.pop("lora_mlp")
    m = full(**kw)
    losses = [v for _, v in m["train_losses"]]
    assert losses[-1] < losses[0]
    final = tmp_path / "full" / "final"
    tuned, base = load_model(final, progress=False), load_model(ckpt, progress=False)
    assert m["trainable_parameters"] == sum(p.numel() for p in base.parameters())
    changed = [
        n
        for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters())
        if not torch.equal(a, b)
    ]
    assert len(changed) == len(list(base.parameters()))  # every weight trained
    assert (final / "tokenizer.json").is_file()
    with pytest.raises(UserError, match="use `litquant finetune lora --quantize"):
        full(**kw, quantize="bnb.nf4")


# ---- GPTQ: adapters over a GPTQ base, and the deployment pipeline ---------------------------------------------


def _gptq(checkpoint_dir: Path, group_size: int = 64) -> None:
    from litquant.jobs.quantize import gptq

    gptq(checkpoint_dir, bits=4, group_size=group_size, n_samples=8, seq_len=64, batch_size=4)


@pytest.mark.slow
def test_lora_trains_over_a_gptq_base(small, tmp_path):
    root, ckpt, data = small
    import shutil

    base = tmp_path / "gptq-base"
    shutil.copytree(ckpt, base)
    _gptq(base)
    m = lora(**{**_small_kwargs(base, data, tmp_path / "run", steps=8), "quantize": "gptq.int4"})
    losses = [v for _, v in m["train_losses"]]
    assert losses[-1] < losses[0] - 0.1
    # the adapter applies on top of the same GPTQ base for generation (an inference-only load, qweight released):
    # the logits move (greedy strings of an 8-step adapter may well coincide, or both be empty)
    from litquant.api import LLM

    plain = LLM.load(base, "gptq.int4", "32-true", accelerator="cpu", progress=False)
    tuned = LLM.load(base, "gptq.int4", "32-true", tmp_path / "run", accelerator="cpu", progress=False)
    ids = plain.tokenizer.encode("Reverse: cat dog fish").reshape(1, -1)
    with torch.inference_mode():
        delta = (tuned.model(ids) - plain.model(ids)).abs().max().item()
    assert delta > 0.05
    # merging dequantizes the GPTQ weights: the merged full-precision model computes what adapter + GPTQ base did
    from litquant.jobs.merge_lora import main as merge_lora_job

    merged = merge_lora_job(tmp_path / "run", out_dir=tmp_path / "merged", precision="32-true")
    adapted = load_model(base, resolve("32-true", "gptq.int4", "cpu", keep_source=True), progress=False)
    load_lora(adapted, tmp_path / "run")
    x = torch.randint(0, adapted.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(merged, progress=False)(x), adapted(x), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_pipeline_qlora_merge_gptq_generate(bundled_qlora, tmp_path):
    """The deployment workflow: bnb QLoRA -> merge into the dequantized base -> GPTQ the merged model -> generate
    with --quantize gptq.int4; the GPTQ model still solves the task about as well as the adapter did."""
    from litquant.jobs.merge_lora import main as merge_lora_job

    out_dir, m, cfg = bundled_qlora
    merged = merge_lora_job(out_dir, out_dir=tmp_path / "merged")
    _gptq(merged, group_size=128)
    tok = Tokenizer(merged)
    style = PromptStyle.from_name(cfg["data"]["prompt_style"])
    _, val = load_splits(None, cfg["data"]["val_split_fraction"], cfg["data"]["seed"])
    examples = val[:60]
    model = load_model(merged, resolve("bf16-true", "gptq.int4", "cpu"), progress=False)
    with torch.autocast("cpu", enabled=False):
        acc, answers = exact_match(model, tok, style, examples)
    assert acc >= m["exact_match"] - 0.15, (acc, m["exact_match"])
    assert acc > m["exact_match_before"] + 0.15

    from litquant.jobs.generate import main as generate

    ex = next(e for e, a in zip(examples, answers) if a.strip() == e["output"])
    text = generate(
        checkpoint_dir=merged,
        quantize="gptq.int4",
        prompt=format_prompt(style, ex),
        temperature=0.0,
        max_new_tokens=32,
    )[0]
    assert text.endswith(ex["output"])


# ---- GPU: QLoRA of a 7B-shaped model ---------------------------------------------------------------------------


def qlora_7b_step_memory(micro_batch_size: int = 1, seq_len: int = 512, steps: int = 3) -> dict:
    """Peak CUDA memory and tokens/sec of QLoRA training steps on a randomly initialised Llama-2-7B-shaped model
    (nf4 base, bf16, adapters on every attention and MLP Linear, r=8, AdamW)."""
    from litquant.checkpoint import build_model
    from litquant.config import Config
    from litquant.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable
    from litquant.quantization.bnb_linear import Linear4bit

    device = torch.device("cuda")
    plugin = resolve("bf16-true", "bnb.nf4", device)
    torch.cuda.reset_peak_memory_stats(device)
    model = plugin.convert_module(build_model(Config.from_name("Llama-2-7b-hf"), "meta"))
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Linear4bit):
                m.quantize_(
                    torch.randn(
                        m.out_features, m.in_features, device=device, dtype=torch.bfloat16, generator=g
                    )
                    * 0.02
                )
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    add_lora(
        model,
        LoRAConfig(r=8, alpha=16, dropout=0.05, query=True, key=True, value=True, projection=True, mlp=True),
        dtype=torch.bfloat16,
    )
    mark_only_lora_as_trainable(model)
    model.train()
    model.max_seq_length = seq_len
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, 32000, (micro_batch_size, seq_len + 1), device=device)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
        "tokens_per_sec": micro_batch_size * seq_len / min(times[1:]),
        "loss": loss.item(),
    }


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_7b_shaped_peak_memory_under_12gb():
    r = qlora_7b_step_memory(micro_batch_size=1, seq_len=512)
    assert torch.isfinite(torch.tensor(r["loss"]))
    assert r["peak_gb"] <= 12.0, r  # litgpt's QLoRA nf4 Llama-2-7B: 14.14 GB
