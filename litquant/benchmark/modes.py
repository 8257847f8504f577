"""The modes a benchmark compares: names (`32-true`, `bnb.nf4`, `bnb.nf4@32-true`), defaults, checks, weight size."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from litquant.errors import UserError
from litquant.quantization.modes import all_modes, get_mode

DEFAULT_MODES = (
    "32-true",
    "bf16-true",
    "bnb.nf4",
    "bnb.nf4-dq",
    "bnb.fp4",
    "bnb.fp4-dq",
    "bnb.int8",
    "gptq.int4",
)
PRECISION_MODES = ("32-true", "16-true", "bf16-true")


def split_mode(mode: str, precision: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """'bf16-true' -> ('bf16-true', None); 'bnb.nf4' -> (precision, 'bnb.nf4');
    'bnb.nf4@32-true' -> ('32-true', ...)."""
    if "@" in mode:
        quant, _, prec = mode.partition("@")
        return prec, (None if quant in PRECISION_MODES else quant)
    if mode in PRECISION_MODES:
        return mode, None
    return precision, mode


def default_modes(checkpoint_dir: Optional[Path], random_init: bool) -> list[str]:
    registered = all_modes()
    modes = []
    for m in DEFAULT_MODES:
        needs = registered[m].needs_file if m in registered else None
        if m in PRECISION_MODES:
            modes.append(m)
        elif m not in registered:
            print(f"Skipping {m}: not available in this install", file=sys.stderr)
        elif needs and (random_init or checkpoint_dir is None or not (checkpoint_dir / needs).is_file()):
            if not random_init:
                print(f"Skipping {m}: no {needs} (make one with `litquant quantize gptq`)", file=sys.stderr)
        else:
            modes.append(m)
    return modes


def check_modes(mode_list: list[str], precision: Optional[str], device: torch.device) -> None:
    """Unknown names and bad precisions fail here, in one line, before any model loads."""
    from litquant.precision import parse_precision

    for m in mode_list:
        prec, quant = split_mode(m, precision)
        if prec is not None:
            parse_precision(prec, device)
        try:
            get_mode(quant)
        except UserError as e:
            raise UserError(
                f"unknown mode {m!r}; choose one of: {', '.join(PRECISION_MODES)}, "
                f"{str(e).partition('choose one of: ')[2]}"
            ) from None


def weights_needed(config, mode: str, precision: Optional[str], device: torch.device) -> Optional[int]:
    """Estimated weight bytes of `mode` (None: cannot tell), to skip modes that cannot fit."""
    from litquant.estimate import weight_bytes
    from litquant.precision import resolve

    prec, quant = split_mode(mode, precision)
    try:
        prec = resolve(prec, quant, device).precision
        return weight_bytes(config, quant or prec, prec)["bytes"]
    except UserError:
        return None
