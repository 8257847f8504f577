"""Memory planning from a config alone: weights (the storage each quantization mode really keeps), KV cache,
activations and finetuning state, counted from the model's real layer shapes built on the meta device (a 70B
config costs nothing). The formulas are in docs/ARCHITECTURE.md, "Memory estimates"; the job is
`litquant estimate` (litquant/jobs/estimate.py)."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch.nn as nn

from litquant.config import Config, n_params
from litquant.errors import UserError
from litquant.precision import PRECISIONS
from litquant.quantization.modes import QuantMode, get_mode

GB = 1e9  # decimal, as the seeds' tables and `Memory used:` lines are
GIB = 2**30
GPU_HEADROOM = 1 * GIB

# name -> total memory as the driver reports it (MiB); marketing names in GB
GPUS: list[tuple[str, int]] = [
    ("T4 16GB", 15360),
    ("A10G 24GB", 23028),
    ("L4 24GB", 23034),
    ("RTX 4090 24GB", 24564),
    ("A100 40GB", 40960),
    ("A100 80GB", 81920),
    ("H100 80GB", 81559),
    ("H200 141GB", 143771),
]

DEFAULT_MODES = (
    *PRECISIONS,
    "bnb.int8",
    "bnb.nf4",
    "bnb.nf4-dq",
    "bnb.fp4",
    "bnb.fp4-dq",
    "gptq.int4",
)
_DTYPE_BYTES = {name: dtype.itemsize for name, dtype in PRECISIONS.items()}
# nominal bits per parameter, "before overheads" (the seeds' simple params x bytes table)


@dataclass
class LinearShape:
    name: str
    in_features: int
    out_features: int
    bias: bool


def model_shapes(config: Config) -> tuple[list[LinearShape], int]:
    """(every Linear of the model, number of parameters outside Linears), from a GPT built on meta."""
    from litquant.checkpoint import build_model

    model = build_model(config, "meta")
    linears = [
        LinearShape(n, m.in_features, m.out_features, m.bias is not None)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    linear_params = sum(s.in_features * s.out_features + (s.out_features if s.bias else 0) for s in linears)
    total = sum(p.numel() for p in model.parameters())
    return linears, total - linear_params


def quant_mode(mode: str) -> Optional[QuantMode]:
    """None for a full-precision mode (32-true, ...), else the quantization mode (unknown names: a UserError)."""
    if mode in _DTYPE_BYTES:
        return None
    try:
        return get_mode(mode)
    except UserError as e:  # say it in the terms of this job, keep the suggestion
        raise UserError(
            f"cannot estimate mode {mode!r}; {str(e).partition('; ')[2]}"
        ) from None  # same choices


def _is_quantized(name: str, quantize_lm_head: bool) -> bool:
    return quantize_lm_head or name != "lm_head"


def weight_bytes(
    config: Config,
    mode: str,
    precision: str = "bf16-true",
    quantize_lm_head: bool = False,
    gptq_group_size: int = 128,
    _shapes: Optional[tuple[list[LinearShape], int]] = None,
) -> dict:
    """{"bytes", "quantized_params", "quantized_bytes", "other_bytes"} for `mode` with `precision` as compute dtype
    (GPTQ: the bits come from the mode name, gptq.int4)."""
    quant = quant_mode(mode)
    if precision not in _DTYPE_BYTES:
        raise UserError(f"unknown --precision {precision!r}; choose one of: {', '.join(_DTYPE_BYTES)}")
    linears, other_params = _shapes or model_shapes(config)
    if quant is None:
        b = _DTYPE_BYTES[mode]
        total = (
            other_params
            + sum(s.in_features * s.out_features + (s.out_features if s.bias else 0) for s in linears)
        ) * b
        return {"bytes": total, "quantized_params": 0, "quantized_bytes": 0, "other_bytes": total}
    b = _DTYPE_BYTES[precision]
    q_params = q_bytes = other = 0
    for s in linears:
        other += (s.out_features if s.bias else 0) * b
        # GPTQ: a width that cannot be packed is a UserError there
        if _is_quantized(s.name, quantize_lm_head):
            q_params += s.in_features * s.out_features
            q_bytes += quant.linear_bytes(s.in_features, s.out_features, gptq_group_size)
        else:
            other += s.in_features * s.out_features * b
    other += other_params * b
    return {
        "bytes": q_bytes + other,
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "other_bytes": other,
    }


def kv_cache_bytes(config: Config, context_length: int, batch_size: int = 1, dtype_bytes: int = 2) -> int:
    return (
        2
        * config.n_layer
        * config.n_query_groups
        * config.head_size
        * context_length
        * batch_size
        * dtype_bytes
    )


def inference_activation_bytes(
    config: Config, context_length: int, batch_size: int = 1, dtype_bytes: int = 2
) -> int:
    tokens = batch_size * context_length
    return (
        tokens * (3 * config.n_embd + 2 * config.intermediate_size + config.padded_vocab_size) * dtype_bytes
    )


def lora_params(linears: list[LinearShape], r: int, targets: str = "all") -> int:
    """LoRA's A (r x in) and B (out x r) for every adapted Linear: `targets` "all" (every Linear in the blocks)
    or a comma list of name parts ("qkv,proj,fc_1,fc_2,lm_head")."""
    wanted = None if targets == "all" else {t.strip() for t in targets.split(",") if t.strip()}
    total = 0
    for s in linears:
        parts = s.name.split(".")
        if wanted is None:
            hit = s.name != "lm_head"
        else:
            hit = bool(wanted & set(parts))
        if hit:
            total += r * (s.in_features + s.out_features)
    return total


def finetune_bytes(
    config: Config,
    linears: list[LinearShape],
    context_length: int,
    batch_size: int,
    r: int,
    targets: str,
    param_bytes: int,
    act_bytes: int,
) -> dict:
    p = lora_params(linears, r, targets)
    tokens = batch_size * context_length
    acts = config.n_layer * tokens * (10 * config.n_embd + 4 * config.intermediate_size) * act_bytes
    logits = tokens * config.padded_vocab_size * (act_bytes + 8)
    return {"lora_params": p, "lora_state_bytes": 4 * p * param_bytes, "activation_bytes": acts + logits}


def fits(total_bytes: float) -> list[str]:
    return [name for name, mib in GPUS if total_bytes + GPU_HEADROOM <= mib * 2**20]


@dataclass
class Row:
    mode: str
    nominal_bytes: int  # params x nominal bits / 8 (the seeds' "before overheads")
    weight_bytes: int
    bits_per_quantized_param: Optional[float]
    kv_cache_bytes: int
    activation_bytes: int
    total_bytes: int
    fits: list[str]
    lora_params: int = 0
    lora_state_bytes: int = 0


def estimate(
    config: Config,
    modes: tuple[str, ...] | list[str] = DEFAULT_MODES,
    precision: str = "bf16-true",
    context_length: Optional[int] = None,
    batch_size: int = 1,
    quantize_lm_head: bool = False,
    gptq_group_size: int = 128,
    finetune: Optional[str] = None,
    lora_r: int = 8,
    lora_targets: str = "all",
) -> dict:
    """The memory table as a dict: {"model", "params", "context_length", "batch_size", "rows": [Row as dict]}."""
    if precision not in _DTYPE_BYTES:
        raise UserError(f"unknown --precision {precision!r}; choose one of: {', '.join(_DTYPE_BYTES)}")
    context_length = context_length or config.block_size
    if context_length < 1 or batch_size < 1:
        raise UserError("--context_length and --batch_size must be at least 1")
    if finetune not in (None, "lora", "qlora"):
        raise UserError(f"unknown --finetune {finetune!r}; choose lora or qlora")
    check_group_size(gptq_group_size)
    shapes = model_shapes(config)
    linears, _ = shapes
    total_params = n_params(config)
    b = _DTYPE_BYTES[precision]
    if finetune == "qlora":
        modes = [m for m in modes if getattr(quant_mode(m), "qlora", False)] or ["bnb.nf4"]
    elif finetune == "lora":
        modes = [m for m in modes if m in _DTYPE_BYTES] or [precision]
    rows = []
    for mode in modes:
        quant = quant_mode(mode)
        try:
            w = weight_bytes(config, mode, precision, quantize_lm_head, gptq_group_size, _shapes=shapes)
        except UserError as e:  # e.g. a GPTQ width that cannot be packed: leave that row out, say why
            if len(modes) == 1:
                raise
            print(f"Skipping {mode}: {e}", file=sys.stderr)
            continue
        act_b = _DTYPE_BYTES[mode] if quant is None else b
        nominal_bits = 8 * _DTYPE_BYTES[mode] if quant is None else quant.nominal_bits
        row = Row(
            mode=mode,
            nominal_bytes=int(total_params * nominal_bits / 8),
            weight_bytes=w["bytes"],
            bits_per_quantized_param=(
                (8 * w["quantized_bytes"] / w["quantized_params"]) if w["quantized_params"] else None
            ),
            kv_cache_bytes=0 if finetune else kv_cache_bytes(config, context_length, batch_size, act_b),
            activation_bytes=0
            if finetune
            else inference_activation_bytes(config, context_length, batch_size, act_b),
            total_bytes=0,
            fits=[],
        )
        if finetune:
            ft = finetune_bytes(
                config, linears, context_length, batch_size, lora_r, lora_targets, act_b, act_b
            )
            row.lora_params, row.lora_state_bytes, row.activation_bytes = (
                ft["lora_params"],
                ft["lora_state_bytes"],
                ft["activation_bytes"],
            )
        row.total_bytes = row.weight_bytes + row.kv_cache_bytes + row.activation_bytes + row.lora_state_bytes
        row.fits = fits(row.total_bytes)
        rows.append(row)
    return {
        "model": config.name,
        "params": total_params,
        "quantizable_params": sum(
            s.in_features * s.out_features for s in linears if _is_quantized(s.name, quantize_lm_head)
        ),
        "precision": precision,
        "context_length": context_length,
        "batch_size": batch_size,
        "finetune": finetune,
        "lora_r": lora_r if finetune else None,
        "rows": [asdict(r) for r in rows],
    }


# ---- output ---------------------------------------------------------------------------------------------


def _size(n: float, unit: str) -> str:
    return f"{n / GB:.2f} GB" if unit == "GB" else f"{n / 1e6:.2f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def format_table(result: dict) -> str:
    ft = result["finetune"]
    unit = "GB" if max((r["total_bytes"] for r in result["rows"]), default=0) >= 1e8 else "MB"
    _gb = lambda n: _size(n, unit)  # noqa: E731
    head = (
        f"{result['model']}: {_count(result['params'])} parameters "
        f"({_count(result['quantizable_params'])} in the Linears that quantization replaces); "
        f"compute dtype {result['precision']}; "
        + (f"{ft} finetuning, r={result['lora_r']}, " if ft else "")
        + f"context {result['context_length']} x batch {result['batch_size']}"
    )
    cols = ["mode", "before overheads", "bits/param", "weights"]
    cols += (["LoRA state", "activations"] if ft else ["KV cache", "activations"]) + ["total", "fits on"]
    lines = []
    for r in result["rows"]:
        bpp = f"{r['bits_per_quantized_param']:.3f}" if r["bits_per_quantized_param"] else "-"
        extra = (
            [_gb(r["lora_state_bytes"]), _gb(r["activation_bytes"])]
            if ft
            else [_gb(r["kv_cache_bytes"]), _gb(r["activation_bytes"])]
        )
        lines.append(
            [
                r["mode"],
                _gb(r["nominal_bytes"]),
                bpp,
                _gb(r["weight_bytes"]),
                *extra,
                _gb(r["total_bytes"]),
                _fits_text(r["fits"]),
            ]
        )
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [head, "", fmt.format(*cols).rstrip(), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*l).rstrip() for l in lines]
    out.append("")
    out.append(
        "bits/param: over the quantized Linears, with scales/zeros/absmax. 'before overheads': params x nominal "
        "bits, the rule of thumb."
    )
    out.append(
        "fits on: the smallest of "
        + ", ".join(n for n, _ in GPUS)
        + " that holds the total with 1 GiB to spare."
    )
    return "\n".join(out)


def _fits_text(names: list[str]) -> str:
    if not names:
        return f"none (more than {GPUS[-1][0]})"
    return names[0] if names[0] == GPUS[-1][0] else f"{names[0]} and larger"


def check_group_size(group_size: int) -> None:
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or (group_size != -1 and group_size < 1)
    ):
        raise UserError(
            f"--gptq_group_size must be a positive integer or -1 (one group per row), got {group_size!r}"
        )
