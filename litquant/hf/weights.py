"""Weight names and layouts, HF <-> litquant: the per-family name maps, the q/k/v attention layout, and the
streaming mappers (`iter_hf_to_lit`, `iter_lit_to_hf`) that rename, reshape and check tensors as they arrive.
litquant's fused `attn.qkv` rows are [all q | all k | all v]; docs/ARCHITECTURE.md gives each family's layout."""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch

from litquant.config import Config
from litquant.errors import UserError
from litquant.hf.config import hf_model_type

# Buffers older HF checkpoints saved next to the weights; derived state we rebuild, so skipped.
_SKIP = re.compile(
    r"(\.inv_freq|\.attention\.bias|\.attention\.masked_bias|\.attn\.bias|\.attn\.masked_bias)$"
)
_LAYER = re.compile(r"\.(\d+)\.")
_QKV = re.compile(r"\.attn\.qkv\.(weight|bias)$")
_QKV_PIECE = re.compile(r"\.attn\.([qkv])\.(weight|bias)$")


# ------------------------------------------------------------------------------------------------
# Weight maps: HF module name -> litquant module name ("{}" is the layer index). ".weight"/".bias" are
# appended to both sides. "attn.q"/"attn.k"/"attn.v" are pieces concatenated into "attn.qkv".
# ------------------------------------------------------------------------------------------------

_LLAMA = {
    "model.embed_tokens": "transformer.wte",
    "model.layers.{}.input_layernorm": "transformer.h.{}.norm_1",
    "model.layers.{}.self_attn.q_proj": "transformer.h.{}.attn.q",
    "model.layers.{}.self_attn.k_proj": "transformer.h.{}.attn.k",
    "model.layers.{}.self_attn.v_proj": "transformer.h.{}.attn.v",
    "model.layers.{}.self_attn.o_proj": "transformer.h.{}.attn.proj",
    "model.layers.{}.post_attention_layernorm": "transformer.h.{}.norm_2",
    "model.layers.{}.mlp.gate_proj": "transformer.h.{}.mlp.fc_1",
    "model.layers.{}.mlp.up_proj": "transformer.h.{}.mlp.fc_2",
    "model.layers.{}.mlp.down_proj": "transformer.h.{}.mlp.proj",
    "model.norm": "transformer.ln_f",
    "lm_head": "lm_head",
}
_FALCON = {
    "transformer.word_embeddings": "transformer.wte",
    "transformer.h.{}.self_attention.query_key_value": "transformer.h.{}.attn.qkv",
    "transformer.h.{}.self_attention.dense": "transformer.h.{}.attn.proj",
    "transformer.h.{}.mlp.dense_h_to_4h": "transformer.h.{}.mlp.fc",
    "transformer.h.{}.mlp.dense_4h_to_h": "transformer.h.{}.mlp.proj",
    "transformer.ln_f": "transformer.ln_f",
    "lm_head": "lm_head",
}  # + the block norms, whose HF names depend on the variant: see `_falcon_norms`
_GPT_NEOX = {
    "gpt_neox.embed_in": "transformer.wte",
    "gpt_neox.layers.{}.input_layernorm": "transformer.h.{}.norm_1",
    "gpt_neox.layers.{}.post_attention_layernorm": "transformer.h.{}.norm_2",
    "gpt_neox.layers.{}.attention.query_key_value": "transformer.h.{}.attn.qkv",
    "gpt_neox.layers.{}.attention.dense": "transformer.h.{}.attn.proj",
    "gpt_neox.layers.{}.mlp.dense_h_to_4h": "transformer.h.{}.mlp.fc",
    "gpt_neox.layers.{}.mlp.dense_4h_to_h": "transformer.h.{}.mlp.proj",
    "gpt_neox.final_layer_norm": "transformer.ln_f",
    "embed_out": "lm_head",
}
_PHI = {
    "model.embed_tokens": "transformer.wte",
    "model.layers.{}.input_layernorm": "transformer.h.{}.norm_1",
    "model.layers.{}.self_attn.q_proj": "transformer.h.{}.attn.q",
    "model.layers.{}.self_attn.k_proj": "transformer.h.{}.attn.k",
    "model.layers.{}.self_attn.v_proj": "transformer.h.{}.attn.v",
    "model.layers.{}.self_attn.dense": "transformer.h.{}.attn.proj",
    "model.layers.{}.mlp.fc1": "transformer.h.{}.mlp.fc",
    "model.layers.{}.mlp.fc2": "transformer.h.{}.mlp.proj",
    "model.final_layernorm": "transformer.ln_f",
    "lm_head": "lm_head",
}


# Other HF names for the same module, accepted on import only: transformers 5 renames GPT-NeoX's
# `embed_out` to `lm_head` in memory (hub files, and our exports, keep `embed_out`).
_HF_ALIASES = {"gpt_neox": {"lm_head": "embed_out"}}


def _falcon_norms(config: Config) -> dict[str, str]:
    h = "transformer.h.{}."
    if not config.parallel_residual:  # sequential blocks (parallel_attn=False)
        return {h + "input_layernorm": h + "norm_1", h + "post_attention_layernorm": h + "norm_2"}
    if config.shared_attention_norm:  # Falcon-7B, or the new decoder with num_ln_in_parallel_attn=1
        return {h + "input_layernorm": h + "norm_1"}
    return {h + "ln_attn": h + "norm_1", h + "ln_mlp": h + "norm_2"}  # Falcon-40B


def weight_map(config: Config) -> dict[str, str]:
    """HF parameter name -> litquant parameter name for this config, one to one ('{}' = layer index)."""
    mt = hf_model_type(config)
    modules = {"llama": _LLAMA, "mistral": _LLAMA, "gpt_neox": _GPT_NEOX, "phi": _PHI}.get(mt)
    if mt == "falcon":
        modules = {**_FALCON, **_falcon_norms(config)}
    return {f"{hf}.{p}": f"{lit}.{p}" for hf, lit in modules.items() for p in ("weight", "bias")}


def import_map(config: Config) -> dict[str, str]:
    """`weight_map` plus the alias names an HF checkpoint may use instead."""
    m = weight_map(config)
    for alias, hf in _HF_ALIASES.get(hf_model_type(config), {}).items():
        m.update({f"{alias}.{p}": m[f"{hf}.{p}"] for p in ("weight", "bias")})
    return m


def fused_hf_qkv(config: Config) -> bool:
    """Whether HF stores attention as one interleaved query_key_value (else separate q/k/v)."""
    return hf_model_type(config) in ("falcon", "gpt_neox")


# ------------------------------------------------------------------------------------------------
# The fused attention layout
# ------------------------------------------------------------------------------------------------


def qkv_sizes(config: Config) -> tuple[int, int, int]:
    hs = config.head_size
    return config.n_head * hs, config.n_query_groups * hs, config.n_query_groups * hs


def deinterleave_qkv(t: torch.Tensor, config: Config) -> torch.Tensor:
    """HF fused rows [q_per_kv q, k, v] per group -> litquant rows [all q | all k | all v]."""
    ng, hs = config.n_query_groups, config.head_size
    q_per_kv = config.n_head // ng
    t = t.reshape(ng, q_per_kv + 2, hs, *t.shape[1:])
    q, k, v = t[:, :q_per_kv], t[:, q_per_kv], t[:, q_per_kv + 1]
    return torch.cat([x.reshape(-1, *t.shape[3:]) for x in (q, k, v)])


def interleave_qkv(t: torch.Tensor, config: Config) -> torch.Tensor:
    """litquant rows [all q | all k | all v] -> HF fused rows [q_per_kv q, k, v] per group."""
    ng, hs = config.n_query_groups, config.head_size
    rest = t.shape[1:]
    q, k, v = t.split(qkv_sizes(config))
    q = q.reshape(ng, config.n_head // ng, hs, *rest)
    k, v = k.reshape(ng, 1, hs, *rest), v.reshape(ng, 1, hs, *rest)
    return torch.cat((q, k, v), dim=1).reshape(-1, *rest)


def name_template(name: str) -> tuple[str, Optional[int]]:
    """'model.layers.12.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 12)."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end() :], int(m.group(1))


def layer_order(name: str) -> tuple[int, str]:
    """Sort key: the layer-less tensors first, then layer by layer (by name within a layer)."""
    layer = name_template(name)[1]
    return (layer if layer is not None else -1, name)


def lit_name_of(hf_name: str, to_lit: Mapping[str, str]) -> Optional[tuple[str, Optional[str]]]:
    """HF tensor name -> (litquant name, None), or for a separate q/k/v projection (its fused `attn.qkv` name,
    "q"/"k"/"v"); None if `to_lit` (an `import_map`) has no such name."""
    template, layer = name_template(hf_name)
    lit_template = to_lit.get(template)
    if lit_template is None:
        return None
    name = lit_template.format(layer)
    piece = _QKV_PIECE.search(name)
    if piece:
        return name[: piece.start()] + f".attn.qkv.{piece.group(2)}", piece.group(1)
    return name, None


def hf_pieces(
    name: str, config: Config, to_hf: Mapping[str, str]
) -> Optional[list[tuple[str, Optional[Callable[[torch.Tensor], torch.Tensor]]]]]:
    """The HF tensors a litquant tensor becomes: [(HF name, its rows from ours, None: unchanged)]; None if it has no
    HF name. `attn.qkv` is split into q/k/v pieces (views) or interleaved, per family; `to_hf` is litquant -> HF."""
    template, layer = name_template(name)
    if _QKV.search(name):
        if not fused_hf_qkv(config):
            sizes = qkv_sizes(config)
            return [
                (
                    to_hf[template.replace(".attn.qkv.", f".attn.{p}.")].format(layer),
                    lambda t, i=i: t.split(sizes)[i],
                )
                for i, p in enumerate("qkv")
            ]
        return [(to_hf[template].format(layer), lambda t: interleave_qkv(t, config))]
    hf_template = to_hf.get(template)
    return None if hf_template is None else [(hf_template.format(layer), None)]


# ------------------------------------------------------------------------------------------------
# Streaming mappers and checks
# ------------------------------------------------------------------------------------------------


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    """Every tensor a litquant checkpoint for `config` holds, with its shape (model built on meta)."""
    from litquant.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _default_tie(config: Config) -> bool:
    # falcon's HF default is tied embeddings; the others' is untied
    return bool(config.extra_hf.get("tie_word_embeddings", hf_model_type(config) == "falcon"))


def iter_hf_to_lit(
    items: Iterable[tuple[str, torch.Tensor]],
    config: Config,
    dtype: Optional[torch.dtype] = None,
    tie_word_embeddings: Optional[bool] = None,
    shapes: Optional[Mapping[str, torch.Size]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename/reshape HF tensors as they arrive; q/k/v pieces wait only until their layer has all three.
    Every produced tensor is checked against the config (or `shapes`, the tensors expected: a GPTQ import
    leaves out the quantized weights); anything missing is an error at the end."""
    mt = hf_model_type(config)
    to_lit = import_map(config)
    shapes = expected_shapes(config) if shapes is None else shapes
    fused = fused_hf_qkv(config)
    q_rows, kv_rows, _ = qkv_sizes(config)
    pending: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # lit qkv name -> {"q": (hf name, t), ...}
    done: set[str] = set()
    wte: Optional[torch.Tensor] = None
    tie = _default_tie(config) if tie_word_embeddings is None else tie_word_embeddings

    def emit(lit_name: str, t: torch.Tensor, source: str) -> tuple[str, torch.Tensor]:
        want = shapes.get(lit_name)
        if want is None:
            raise UserError(
                f"unexpected weight {source!r} for this {mt} config (the config has no {lit_name})"
            )
        if t.shape != want:
            raise UserError(
                f"weight {source!r} has shape {tuple(t.shape)} but the config needs {tuple(want)}"
            )
        if lit_name in done:
            raise UserError(f"weight {source!r} appears twice in the checkpoint")
        done.add(lit_name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return lit_name, t

    for hf_name, t in items:
        if _SKIP.search(hf_name):
            continue
        mapped = lit_name_of(hf_name, to_lit)
        if mapped is None:
            raise UserError(
                f"unexpected weight {hf_name!r} for a {mt} model (does config.json match the weights?)"
            )
        lit_name, part = mapped
        if part:  # separate q/k/v: wait for all three, then concatenate
            rows = q_rows if part == "q" else kv_rows
            if t.shape[0] != rows:
                raise UserError(f"weight {hf_name!r} has {t.shape[0]} rows but the config needs {rows}")
            parts = pending.setdefault(lit_name, {})
            if part in parts:
                raise UserError(f"weight {hf_name!r} appears twice in the checkpoint")
            parts[part] = (hf_name, t)
            if len(parts) == 3:
                del pending[lit_name]
                fused_t = torch.cat([parts[p][1] for p in "qkv"])
                yield emit(lit_name, fused_t, parts["q"][0].replace(".q_proj.", ".{q,k,v}_proj."))
            continue
        if fused and _QKV.search(lit_name):
            want = shapes.get(lit_name)
            if want is not None and t.shape != want:
                raise UserError(
                    f"weight {hf_name!r} has shape {tuple(t.shape)} but the config needs {tuple(want)}"
                )
            t = deinterleave_qkv(t, config)
        lit_name, t = emit(lit_name, t, hf_name)
        if lit_name == "transformer.wte.weight" and tie:
            wte = t  # kept (a reference, no copy) for the tied lm_head
        yield lit_name, t

    if pending:
        name, parts = next(iter(pending.items()))
        template, layer = name_template(name)
        hf_names = {v: k for k, v in weight_map(config).items()}
        absent = [
            hf_names[template.replace(".attn.qkv.", f".attn.{p}.")].format(layer)
            for p in "qkv"
            if p not in parts
        ]
        raise UserError(f"incomplete attention weights: the checkpoint lacks {', '.join(absent)}")
    if tie and wte is not None and "lm_head.weight" in shapes and "lm_head.weight" not in done:
        yield emit("lm_head.weight", wte.clone(), "lm_head.weight (tied to the embedding)")
    missing = sorted(set(shapes) - done)
    if missing:
        hf_names = {v: k for k, v in weight_map(config).items()}
        shown = []
        for m in missing[:5]:
            template, layer = name_template(m)
            hf = hf_names.get(template) or hf_names.get(template.replace(".attn.qkv.", ".attn.q."))
            shown.append(hf.format(layer) if hf else m)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"the checkpoint is missing weights: {', '.join(shown)}{more}")


def hf_to_lit(
    hf_state: Mapping[str, torch.Tensor],
    config: Config,
    dtype: Optional[torch.dtype] = None,
    tie_word_embeddings: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """An HF state dict -> a litquant state dict for `config` (renamed, q/k/v fused, checked)."""
    return dict(iter_hf_to_lit(hf_state.items(), config, dtype, tie_word_embeddings))


def iter_lit_to_hf(
    items: Iterable[tuple[str, torch.Tensor]], config: Config, tie_word_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """litquant (name, tensor) -> HF (name, tensor), one at a time; a tied lm_head is left out."""
    to_hf = {lit: hf for hf, lit in weight_map(config).items()}
    for name, t in items:
        if name == "lm_head.weight" and tie_word_embeddings:
            continue  # HF stores tied embeddings once
        pieces = hf_pieces(name, config, to_hf)
        if pieces is None:
            raise UserError(f"tensor {name!r} has no Hugging Face {hf_model_type(config)} equivalent")
        for hf_name, rows in pieces:
            piece = t if rows is None else rows(t)
            yield hf_name, piece.clone() if len(pieces) > 1 else piece  # split q/k/v: own storage, not views


def check_lit_state(
    names_shapes: Mapping[str, tuple], config: Config, source: str, skip: Iterable[str] = ()
) -> None:
    """Every tensor the config needs, of the right shape, and nothing else (the tensors of the modules in
    `skip`, GPTQ-quantized layers, are checked elsewhere)."""
    skip = set(skip)
    shapes = {k: v for k, v in expected_shapes(config).items() if k.rpartition(".")[0] not in skip}
    for name, shape in names_shapes.items():
        if name not in shapes:
            raise UserError(f"{source}: unexpected tensor {name!r} for this config")
        if tuple(shape) != tuple(shapes[name]):
            raise UserError(
                f"{source}: {name} has shape {tuple(shape)} but the config needs {tuple(shapes[name])}"
            )
    missing = sorted(set(shapes) - set(names_shapes))
    if missing:
        raise UserError(f"{source} is missing tensors: {', '.join(missing[:5])}")


def lit_to_hf(
    lit_state: Mapping[str, torch.Tensor], config: Config, tie_word_embeddings: Optional[bool] = None
) -> dict[str, torch.Tensor]:
    """A litquant state dict -> an HF state dict for `hf_model_type(config)`. With tied embeddings
    (None: when lm_head equals the embedding) `lm_head.weight` is left out, as HF saves it."""
    check_lit_state({k: v.shape for k, v in lit_state.items()}, config, "state dict")
    if tie_word_embeddings is None:
        tie_word_embeddings = can_tie(
            lit_state.get("transformer.wte.weight"), lit_state.get("lm_head.weight"), config
        )
    return dict(iter_lit_to_hf(lit_state.items(), config, tie_word_embeddings))


def can_tie(wte: Optional[torch.Tensor], lm_head: Optional[torch.Tensor], config: Config) -> bool:
    """Whether lm_head can be saved tied to the embedding: same shape, equal values, no bias."""
    return (
        wte is not None
        and lm_head is not None
        and not config.lm_head_bias
        and wte.shape == lm_head.shape
        and torch.equal(wte, lm_head)
    )
