"""LoRA: low-rank adapters over any base Linear (full precision, bnb 4/8-bit, GPTQ), and merging them back.

`add_lora(model, LoRAConfig(...))` wraps the targeted Linears in `LoRALinear` (the base stays untouched and frozen),
`save_lora` / `load_lora` write and read `lit_model.lora.safetensors`, and `merge_lora` folds the adapters into
plain `nn.Linear`s. The formula, qkv rows, merging and the adapter file: docs/ARCHITECTURE.md, "LoRA".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from litquant.config import WEIGHTS_FILE
from litquant.errors import UserError
from litquant.io import open_safetensors, safetensors_metadata, save_safetensors
from litquant.quantization.modes import get_mode

LORA_FILE = "lit_model.lora.safetensors"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise UserError(f"LoRA rank must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not any((self.query, self.key, self.value, self.projection, self.mlp, self.head)):
            raise UserError(
                "LoRA is enabled on no layer: set at least one of query/key/value/projection/mlp/head"
            )

    @classmethod
    def from_dict(cls, d: dict, source: str = "LoRA config") -> "LoRAConfig":
        """From a JSON object (an adapter file's metadata): unknown keys are ignored, wrongly typed values are a
        UserError naming `source`."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected a JSON object, got {type(d).__name__}")
        kinds = {
            "int": ((int,), "an integer"),
            "float": ((int, float), "a number"),
            "bool": ((bool,), "true or false"),
        }
        kwargs = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            # f.type: the annotation's text (postponed annotations)
            v, (types, what) = (
                d[f.name],
                kinds[f.type],
            )
            if not isinstance(v, types) or (isinstance(v, bool) and f.type != "bool"):
                raise UserError(f"{source}: {f.name} must be {what}, got {v!r}")
            kwargs[f.name] = v
        try:
            return cls(**kwargs)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None


class LoRALinear(nn.Module):
    """`base(x)` plus a trainable low-rank update. `out_index`: the output rows the update goes to (None: all)."""

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        out_index: Optional[torch.Tensor] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base)
        dtype = dtype or _compute_dtype(base)
        n_out = self.out_features if out_index is None else out_index.numel()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_out, r, device=device, dtype=dtype))
        # the same init nn.Linear gives its weight: the update starts at exactly zero because B does
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer(
            "out_index", None if out_index is None else out_index.to(device), persistent=False
        )

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) fp32 update this adapter adds to the base weight."""
        d = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (n_out, in)
        if self.out_index is None:
            return d
        full = torch.zeros(self.out_features, self.in_features, device=d.device, dtype=d.dtype)
        return full.index_copy(0, self.out_index, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.dropout(x).to(self.lora_A.dtype)
        d = (a @ self.lora_A.transpose(0, 1)) @ self.lora_B.transpose(0, 1) * self.scaling
        d = d.to(y.dtype)
        if self.out_index is None:
            return y + d
        return y.index_add(-1, self.out_index, d)

    def extra_repr(self) -> str:
        parts = "all" if self.out_index is None else f"{self.out_index.numel()} of {self.out_features}"
        return f"r={self.r}, alpha={self.alpha}, output rows={parts}"


def _device_of(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the base computes in: a quantized Linear says so, a plain one has it in its weight."""
    dtype = getattr(module, "compute_dtype", None)
    if dtype is not None:
        return dtype
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return torch.float32


# ---- putting adapters on a GPT -------------------------------------------------------------------------------


def lora_targets(model: nn.Module, config: LoRAConfig) -> dict[str, Optional[torch.Tensor]]:
    """Module name -> output rows to adapt (None: all) for the layers `config` enables."""
    mcfg = model.config
    hs, nh, ng = mcfg.head_size, mcfg.n_head, mcfg.n_query_groups
    sizes = {"query": nh * hs, "key": ng * hs, "value": ng * hs}
    qkv_parts = [p for p in ("query", "key", "value") if getattr(config, p)]
    qkv_index = None
    if qkv_parts and len(qkv_parts) < 3:
        starts = {"query": 0, "key": sizes["query"], "value": sizes["query"] + sizes["key"]}
        qkv_index = torch.cat([torch.arange(starts[p], starts[p] + sizes[p]) for p in qkv_parts])
    targets: dict[str, Optional[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) or not hasattr(module, "in_features"):
            continue
        parts = name.split(".")
        if parts[-2:] == ["attn", "qkv"] and qkv_parts:
            targets[name] = qkv_index
        elif parts[-2:] == ["attn", "proj"] and config.projection:
            targets[name] = None
        elif len(parts) >= 2 and parts[-2] == "mlp" and config.mlp:
            targets[name] = None
        elif name == "lm_head" and config.head:
            targets[name] = None
    return targets


def add_lora(model: nn.Module, config: LoRAConfig, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Wrap the enabled Linears of `model` (in place) in `LoRALinear`; returns the model.

    `dtype`: adapter dtype (default: each base layer's compute dtype)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA adapters")
    targets = lora_targets(model, config)
    if not targets:
        raise UserError("no layer of this model matches the enabled LoRA targets")
    for name, out_index in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        lora = LoRALinear(base, config.r, config.alpha, config.dropout, out_index, dtype)
        setattr(parent, child, lora.train(base.training))  # an eval-mode model stays without dropout
    model.lora_config = config
    return model


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name.rpartition(".")[2]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2].startswith("lora_")}


def lora_metadata(config: LoRAConfig, **base: Any) -> dict[str, str]:
    """safetensors metadata of an adapter file: the LoRA config and what base it was trained on."""
    meta = {"format": "pt", "litquant": "1", "litquant_lora": "1", "lora_config": json.dumps(asdict(config))}
    meta.update({k: "" if v is None else str(v) for k, v in base.items()})
    return meta


def save_lora(tensors: dict[str, torch.Tensor], path: str | Path, config: LoRAConfig, **base: Any) -> None:
    """Write adapter tensors (atomically) with the metadata `load_lora` needs."""
    save_safetensors(tensors, path, metadata=lora_metadata(config, **base))


def resolve_lora_path(path: str | Path) -> Path:
    """An adapter file, or a finetune out_dir / checkpoint step dir holding `lit_model.lora.safetensors`."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise UserError(f"LoRA adapter {str(path)!r} does not exist")
    return path


def read_lora_metadata(path: str | Path) -> tuple[LoRAConfig, dict[str, str]]:
    path = resolve_lora_path(path)
    meta = safetensors_metadata(path)
    if meta.get("litquant_lora") != "1" or "lora_config" not in meta:
        raise UserError(f"{path} is not a litquant LoRA adapter file (no lora_config in its metadata)")
    try:
        config = json.loads(meta["lora_config"])
    except (TypeError, json.JSONDecodeError):
        raise UserError(
            f"{path}: the lora_config in its metadata is not valid JSON (corrupt adapter file?)"
        ) from None
    return LoRAConfig.from_dict(config, source=f"{path}: lora_config"), meta


def base_options(quantize: Optional[str]) -> dict:
    """Plugin options a base needs to be trained through or merged into: a GPTQ base keeps its AutoGPTQ weights
    (dequantized again in the backward pass, and by `merge_lora`) instead of releasing them after repacking for
    the int4 kernel."""
    mode = get_mode(quantize)
    return dict(mode.lora_options) if mode is not None else {}


def load_lora(model: nn.Module, path: str | Path, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Add the adapters described by the file at `path` to `model` and load their weights."""
    path = resolve_lora_path(path)
    config, _ = read_lora_metadata(path)
    add_lora(model, config, dtype)
    expected = {n: p for n, p in model.named_parameters() if "lora_" in n.rpartition(".")[2]}
    with open_safetensors(path) as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise UserError(f"{path} does not fit this model ({what}): was it trained on another base model?")
        for name, p in expected.items():
            t = f.get_tensor(name)
            if t.shape != p.shape:
                raise UserError(
                    f"{path}: {name} has shape {tuple(t.shape)}, this model needs {tuple(p.shape)} "
                    "(adapter trained on another base model?)"
                )
            with torch.no_grad():
                p.copy_(t.to(p.dtype))
    return model


# ---- merging ------------------------------------------------------------------------------------------------


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight of any supported Linear: nn.Linear, or a quantized layer (they all `dequantize`)."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if hasattr(module, "dequantize"):  # bnb Linear4bit / Linear8bit, GPTQLinear
        try:
            return module.dequantize(torch.float32)
        except RuntimeError as e:  # a GPTQ layer whose qweight was released for inference
            raise UserError(f"cannot dequantize {type(module).__name__}: {e}") from None
    raise UserError(f"do not know how to dequantize a {type(module).__name__}")


def _bias_of(module: nn.Module) -> Optional[torch.Tensor]:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or hasattr(module, "dequantize")


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace (in place) every LoRALinear by an nn.Linear holding dequantized base + B @ A * alpha/r, and every
    remaining quantized Linear by its dequantized nn.Linear; returns the model (now plain full precision).

    One layer at a time: its weight is computed in fp32 and stored in `dtype`, and the layer it replaces is
    released before the next one, so the model never holds two copies of its Linears (nor an fp32 one)."""
    lora_names = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    todo = [
        n
        for n, m in model.named_modules()  # names only: a replaced layer is freed as soon as it is swapped out
        if n in lora_names
        or (_is_linear_like(m) and not isinstance(m, nn.Linear) and n.rpartition(".")[0] not in lora_names)
    ]
    for name in todo:
        module = model.get_submodule(name)
        base = module.base if isinstance(module, LoRALinear) else module
        w = dequantized_weight(base)
        if isinstance(module, LoRALinear):
            w = w + module.delta_weight().to(w.device)
        bias = _bias_of(base)
        linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.to(device=w.device, dtype=dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        del module, base, w, bias
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _file_float_dtypes(path: Path) -> dict[str, torch.dtype]:
    """key -> dtype of the floating tensors of a safetensors file, in file order (read from its header only)."""
    with open_safetensors(path) as f:
        names = {key: f.get_slice(key).get_dtype() for key in f.keys()}
    return {k: _FLOAT_DTYPES[n] for k, n in names.items() if n in _FLOAT_DTYPES}


def _file_float_dtype(path: Path) -> torch.dtype:
    """dtype of the first floating tensor of a safetensors file (what the checkpoint is stored in)."""
    dtypes = [d for d in _file_float_dtypes(path).values() if d != torch.float64]
    return dtypes[0] if dtypes else torch.float32


def _quantized_file_float_dtype(checkpoint_dir: Path, quantize: Optional[str]) -> torch.dtype:
    """dtype a base's quantized file keeps its full-precision tensors in (an imported bnb or GPTQ model has no
    lit_model.safetensors); fp16 when it has none."""
    mode = get_mode(quantize)
    name = mode and (getattr(mode, "prequantized", None) or mode.needs_file)
    path = Path(checkpoint_dir) / name if name else None
    if path is None or not path.is_file():
        return torch.float16
    kept = mode.stored_as_is
    dtypes = [d for k, d in _file_float_dtypes(path).items() if not k.endswith(kept) and d != torch.float64]
    return dtypes[0] if dtypes else torch.float16


def _merge_load_precision(
    checkpoint_dir: Path, quantize: Optional[str], save_dtype: torch.dtype, device: torch.device
) -> str:
    """The precision to load the base in for merging: the save dtype when every floating tensor of the base's
    weight files converts to it exactly, so loading in it rounds nothing the fp32 route would not round later
    anyway (the merge itself adds in fp32, layer by layer); else 32-true."""
    from litquant.precision import PRECISIONS

    name = next(p for p, d in PRECISIONS.items() if d == save_dtype)
    if save_dtype == torch.float32:
        return name
    if save_dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "32-true"  # only storage is needed, but the plugin refuses bf16 on such a GPU
    mode = get_mode(quantize)
    files = (
        [checkpoint_dir / WEIGHTS_FILE]
        if mode is None
        else sorted(checkpoint_dir.glob("lit_model*.safetensors"))
    )
    kept = mode.stored_as_is if mode is not None else ()  # quantization state the loader takes as stored
    exact = all(
        d == save_dtype
        for f in files
        if f.is_file()
        for k, d in _file_float_dtypes(f).items()
        if not (kept and k.endswith(kept))
    )
    return name if exact else "32-true"
