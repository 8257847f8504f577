"""Full (unsharded) parameter and optimizer state of a model that may be sharded by FSDP2 (DTensors), as plain CPU
tensors, and back. The optimizer state is split into tensors and a JSON skeleton, so it can be saved as safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from litquant.errors import UserError


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def gather_params(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the parameters; a collective under FSDP, so every rank must call it."""
    out = {}
    for name, p in module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        t = p.detach()
        if is_dtensor(t):
            t = t.full_tensor()
        out[name] = t.cpu().clone()
    return out


@torch.no_grad()
def load_params(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy full tensors into the (possibly sharded) parameters of the same names; `source` names them in errors."""
    params = dict(module.named_parameters())
    for name, t in tensors.items():
        if name not in params:
            raise UserError(
                f"{source}: unexpected tensor {name!r} (checkpoint of another model or LoRA config?)"
            )
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise UserError(f"{source}: {name} has shape {tuple(t.shape)}, the model needs {tuple(p.shape)}")
        if is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(
                t.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None
            )
            p.to_local().copy_(local.to_local())
        else:
            p.copy_(t.to(device=p.device, dtype=p.dtype))


def _full_state_dict_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer state keyed by parameter name (full even under FSDP) as (tensors, JSON skeleton): every tensor,
    however deeply nested (bnb keeps its 8-bit state in a dict), is replaced by {"__tensor__": its key}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(module, optimizer, options=_full_state_dict_options(cpu_offload=True))
    tensors: dict[str, torch.Tensor] = {}

    def strip(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.full_tensor() if is_dtensor(obj) else obj
            tensors[path] = t.detach().cpu().clone()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {str(k): strip(v, f"{path}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v, f"{path}/{i}") for i, v in enumerate(obj)]
        return obj

    # under FSDP only rank 0 receives the full state; the others return an empty dict (and do not write)
    skeleton = strip(
        {"state": osd.get("state", {}), "param_groups": osd.get("param_groups", [])}, "optimizer"
    )
    return tensors, skeleton


def load_optimizer_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict,
    skeleton: dict,
    source: str = "checkpoint",
) -> None:
    """The inverse of `optimizer_state`: fill the skeleton with `tensors` and load it (resharding under FSDP)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    def fill(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                if obj["__tensor__"] not in tensors:
                    raise UserError(
                        f"{source} lacks the optimizer tensor {obj['__tensor__']!r} (corrupt file?)"
                    )
                return tensors[obj["__tensor__"]]
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fill(v) for v in obj]
        return obj

    state = fill(skeleton)
    try:
        set_optimizer_state_dict(module, optimizer, state, options=_full_state_dict_options())
    except (KeyError, ValueError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{source}: its optimizer state does not fit this run's optimizer and model ({why})"
        ) from None
