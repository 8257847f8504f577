"""Step checkpoints (`out_dir/step-000100/`: the trained weights + `train_state.safetensors`) and `--resume`.

A checkpoint is written to a temporary directory and renamed into place, so a killed run never leaves a half-written
one; resuming reads safetensors only (nothing is unpickled) and checks the checkpoint fits this run first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from litquant.checkpoint import WEIGHTS_FILE
from litquant.errors import UserError
from litquant.io import open_safetensors, safetensors_metadata, save_safetensors
from litquant.lora import LORA_FILE
from litquant.training.optim import optimizer_class
from litquant.training.run import RunSpec
from litquant.training.state import gather_params, load_optimizer_state, load_params, optimizer_state

TRAIN_STATE_FILE = "train_state.safetensors"
# the weights file a step checkpoint of each kind of run (RunSpec.kind) holds, and how errors name that kind
RUN_WEIGHTS = {"lora": LORA_FILE, "full": WEIGHTS_FILE}
RUN_NAMES = {"lora": "a LoRA run (`finetune lora`)", "full": "a full finetuning run (`finetune full`)"}


# ---- finding and checking the checkpoint to resume (before any process starts) --------------------------------


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete step checkpoints in out_dir, oldest first (an interrupted save leaves only a .tmp directory)."""
    if not out_dir.is_dir():
        return []
    dirs = [
        p
        for p in out_dir.glob("step-*")
        if p.is_dir() and p.name[5:].isdigit() and (p / TRAIN_STATE_FILE).is_file()
    ]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def find_resume_dir(run: RunSpec) -> Optional[Path]:
    """The checkpoint `--resume` names: false = none (and out_dir must not hold an earlier run's), true = the latest
    in out_dir (there must be one), auto = the latest in out_dir if there is one, else a checkpoint directory."""
    existing = checkpoint_dirs(run.out_dir)
    if run.resume is False or run.resume is None:
        if existing:
            raise UserError(
                f"{run.out_dir} already holds checkpoints of an earlier run ({existing[-1].name}): "
                "pass --resume true to continue it, or choose another --out_dir"
            )
        return None
    if run.resume is True or run.resume == "auto":
        if existing:
            return existing[-1]
        if run.resume is True:
            raise UserError(
                f"--resume true: {run.out_dir} holds no checkpoint (step-*/{TRAIN_STATE_FILE}) to "
                "continue; pass --resume auto to start from scratch when there is none"
            )
        return None
    path = Path(run.resume)
    if path.is_file():
        path = path.parent
    if not (path / TRAIN_STATE_FILE).is_file():
        raise UserError(f"--resume {str(run.resume)!r} is not a checkpoint directory (no {TRAIN_STATE_FILE})")
    return path


def check_resume_dir(run: RunSpec, directory: Path) -> None:
    """Before any process starts: the checkpoint `directory` is one this run can continue."""
    with open_safetensors(resume_weights_path(directory, RUN_WEIGHTS[run.kind])):
        pass  # its header is valid and its tensors lie within the file
    read_train_state(directory, run)


def resume_weights_path(directory: Path, weights_file: str) -> Path:
    """directory/weights_file, or a one-line error saying what kind of run the directory belongs to instead."""
    path = directory / weights_file
    if path.is_file():
        return path
    mine = next((k for k, f in RUN_WEIGHTS.items() if f == weights_file), None)
    other = next((k for k, f in RUN_WEIGHTS.items() if f != weights_file and (directory / f).is_file()), None)
    if other is not None and mine is not None:
        raise UserError(
            f"{directory} is a checkpoint of {RUN_NAMES[other]}, not of {RUN_NAMES[mine]} "
            f"(it holds {RUN_WEIGHTS[other]}, not {weights_file})"
        )
    raise UserError(f"{directory} is not a complete checkpoint: {weights_file} is missing")


def read_train_state(directory: Path, run: RunSpec) -> tuple[dict, dict]:
    """(counters, optimizer skeleton) of a checkpoint's train_state.safetensors, checked against this run."""
    state_path = directory / TRAIN_STATE_FILE
    meta = safetensors_metadata(state_path)  # a missing, truncated or corrupt file is a UserError here
    if meta.get("litquant_train_state") != "1":
        raise UserError(f"{state_path} is not a litquant training state file")
    try:
        counters, skeleton = json.loads(meta["counters"]), json.loads(meta["optimizer"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UserError(
            f"{state_path}: its metadata lacks valid 'counters' and 'optimizer' entries "
            "(not written by `litquant finetune`, or corrupt)"
        ) from None
    if (
        not isinstance(counters, dict)
        or not isinstance(skeleton, dict)
        or not all(isinstance(counters.get(k), int) and counters[k] >= 0 for k in ("step", "tokens"))
    ):
        raise UserError(f"{state_path}: its 'counters' / 'optimizer' metadata is malformed (corrupt file?)")
    if counters.get("global_batch_size") != run.train.global_batch_size:
        raise UserError(
            f"{directory} was trained with --train.global_batch_size {counters.get('global_batch_size')}: "
            "resume with the same global batch size (the data position depends on it)"
        )
    return counters, skeleton


# ---- saving and loading (on every rank: gathering and loading sharded state are collectives) -------------------


def save_checkpoint_dir(fabric, run: RunSpec, weights, model, optimizer, counters: dict) -> Path:
    """out_dir/step-XXXXXX/{weights, train_state.safetensors}, written to a temp dir then renamed (atomic)."""
    params = gather_params(model.module, weights.trainable_only())
    opt_tensors, opt_rest = optimizer_state(model.module, optimizer.optimizer)
    final = run.out_dir / f"step-{counters['step']:06d}"
    if fabric.global_rank == 0:
        tmp = run.out_dir / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        weights.save(params, tmp)
        meta = {
            "format": "pt",
            "litquant_train_state": "1",
            "counters": json.dumps(counters),
            "optimizer": json.dumps(opt_rest),
        }
        save_safetensors(opt_tensors or {"_empty": torch.zeros(0)}, tmp / TRAIN_STATE_FILE, metadata=meta)
        if final.exists():  # a resumed run passing an older run's step again
            shutil.rmtree(final)
        os.replace(tmp, final)
    fabric.barrier()
    return final


def load_checkpoint_dir(fabric, run: RunSpec, weights, model, optimizer, directory: Path) -> dict:
    """Load a step checkpoint's weights and optimizer state into the (set up) model and optimizer; its counters."""
    weights_path = resume_weights_path(directory, weights.file)
    counters, skeleton = read_train_state(directory, run)
    saved_class, this_class = counters.get("optimizer_class"), optimizer_class(optimizer.optimizer)
    if saved_class is not None and saved_class != this_class:  # (older checkpoints do not record it)
        raise UserError(
            f"{directory} holds the state of a {saved_class} optimizer, this run uses {this_class}: "
            f"resume with the same --optimizer ({counters.get('optimizer')})"
        )
    with open_safetensors(weights_path) as f:
        params = {k: f.get_tensor(k) for k in f.keys()}
    saved = {n for n, p in model.module.named_parameters() if p.requires_grad or not weights.trainable_only()}
    missing = sorted(saved - set(params))
    if missing:
        raise UserError(
            f"{weights_path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            "(checkpoint of another model or LoRA config?)"
        )
    load_params(model.module, params, weights_path)
    state_path = directory / TRAIN_STATE_FILE
    with open_safetensors(state_path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith("optimizer/")}
    load_optimizer_state(model.module, optimizer.optimizer, tensors, skeleton, str(state_path))
    return counters


def resume_counters(fabric, run: RunSpec, weights, model, optimizer, num_train_examples: int) -> dict:
    """The run's starting counters: those of run.resume_dir after loading it (its data must be this run's), or
    step 0. Prints one line saying which when resuming, or when --resume auto found nothing to resume."""
    if run.resume_dir is None:
        if run.resume == "auto":
            fabric.print(f"--resume auto: no checkpoint in {run.out_dir}, starting from scratch")
        return {"step": 0, "tokens": 0}
    counters = load_checkpoint_dir(fabric, run, weights, model, optimizer, run.resume_dir)
    if counters.get("num_train_examples") != num_train_examples:
        raise UserError(
            f"{run.resume_dir} was trained on {counters.get('num_train_examples')} examples, this run "
            f"has {num_train_examples}: the data or its options changed"
        )
    fabric.print(f"Resuming from {run.resume_dir} at step {counters['step']}")
    return counters
