"""Hugging Face <-> litquant weight conversion: the one place where weight names and layouts are mapped.

`hf_to_lit` / `lit_to_hf` rename tensors per family and reshape the attention weights; the two jobs
`convert_hf_checkpoint` (an HF download -> a litquant checkpoint, in place) and `convert_lit_checkpoint`
(a litquant checkpoint -> an HF directory `transformers` loads) stream tensors through them.

Attention layouts. litquant's fused `attn.qkv` rows are [all q heads | all k groups | all v groups].
Llama, Mistral and Phi store separate q/k/v projections: they are concatenated. Falcon and GPT-NeoX
store one fused `query_key_value` whose rows are interleaved per kv group as
[q_per_kv query heads, 1 key head, 1 value head] x n_groups. That single rule covers every case:
GPT-NeoX and Falcon multi-head (a group per head: [q, k, v] per head), Falcon-7B multi-query (one
group: [all q, k, v]) and Falcon-40B (grouped).
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

import torch
from tqdm import tqdm

from litquant.checkpoint import WEIGHTS_FILE, copy_side_files
from litquant.io import DTYPES, atomic_write_text, open_safetensors, write_safetensors
from litquant.config import CONFIG_FILE, Config
from litquant.errors import UserError, read_json

HF_FAMILIES = ("llama", "mistral", "falcon", "gpt_neox", "phi")
# Files an HF directory carries besides the weights; copied unchanged on export.
HF_SIDE_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "generation_config.json",
)
HF_MAX_SHARD_SIZE = 5_000_000_000  # bytes; what transformers itself uses for hub uploads

# Buffers older HF checkpoints saved next to the weights; derived state we rebuild, so skipped.
_SKIP = re.compile(r"(\.inv_freq|\.attention\.bias|\.attention\.masked_bias|\.attn\.bias|\.attn\.masked_bias)$")
_LAYER = re.compile(r"\.(\d+)\.")


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


def _import_map(config: Config) -> dict[str, str]:
    """`weight_map` plus the alias names an HF checkpoint may use instead."""
    m = weight_map(config)
    for alias, hf in _HF_ALIASES.get(hf_model_type(config), {}).items():
        m.update({f"{alias}.{p}": m[f"{hf}.{p}"] for p in ("weight", "bias")})
    return m


def _fused_hf_qkv(config: Config) -> bool:
    """Whether HF stores attention as one interleaved query_key_value (else separate q/k/v)."""
    return hf_model_type(config) in ("falcon", "gpt_neox")


def hf_model_type(config: Config) -> str:
    """The HF model_type a config exports as: its `hf_model_type`, or inferred from its structure."""
    mt = config.hf_model_type
    if mt:
        if mt not in HF_FAMILIES:
            raise UserError(f"unsupported Hugging Face model_type {mt!r} (supported: {', '.join(HF_FAMILIES)})")
        return mt
    if config.mlp_class_name == "LLaMAMLP" and config.norm_class_name == "RMSNorm" and not config.parallel_residual:
        return "mistral" if config.sliding_window_size is not None else "llama"
    if config.mlp_class_name == "GptNeoxMLP" and config.norm_class_name == "LayerNorm":
        if config.lm_head_bias:
            return "phi"
        if not config.bias:
            return "falcon"
        if not config.shared_attention_norm or not config.parallel_residual:
            return "gpt_neox"
    raise UserError(f"config {config.name!r} matches no Hugging Face family ({', '.join(HF_FAMILIES)})")


# ------------------------------------------------------------------------------------------------
# The fused attention layout
# ------------------------------------------------------------------------------------------------


def _qkv_sizes(config: Config) -> tuple[int, int, int]:
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
    q, k, v = t.split(_qkv_sizes(config))
    q = q.reshape(ng, config.n_head // ng, hs, *rest)
    k, v = k.reshape(ng, 1, hs, *rest), v.reshape(ng, 1, hs, *rest)
    return torch.cat((q, k, v), dim=1).reshape(-1, *rest)


# ------------------------------------------------------------------------------------------------
# HF -> litquant
# ------------------------------------------------------------------------------------------------


def _template(name: str) -> tuple[str, Optional[int]]:
    """'model.layers.12.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 12)."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], int(m.group(1))


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    """Every tensor a litquant checkpoint for `config` holds, with its shape (model built on meta)."""
    from litquant.model import GPT

    with torch.device("meta"):
        model = GPT(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _default_tie(config: Config) -> bool:
    # falcon's HF default is tied embeddings; the others' is untied
    return bool(config.extra_hf.get("tie_word_embeddings", hf_model_type(config) == "falcon"))


def _iter_hf_to_lit(
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
    to_lit = _import_map(config)
    shapes = expected_shapes(config) if shapes is None else shapes
    fused = _fused_hf_qkv(config)
    q_rows, kv_rows, _ = _qkv_sizes(config)
    pending: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # lit qkv name -> {"q": (hf name, t), ...}
    done: set[str] = set()
    wte: Optional[torch.Tensor] = None
    tie = _default_tie(config) if tie_word_embeddings is None else tie_word_embeddings

    def emit(lit_name: str, t: torch.Tensor, source: str) -> tuple[str, torch.Tensor]:
        want = shapes.get(lit_name)
        if want is None:
            raise UserError(f"unexpected weight {source!r} for this {mt} config (the config has no {lit_name})")
        if t.shape != want:
            raise UserError(f"weight {source!r} has shape {tuple(t.shape)} but the config needs {tuple(want)}")
        if lit_name in done:
            raise UserError(f"weight {source!r} appears twice in the checkpoint")
        done.add(lit_name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return lit_name, t

    for hf_name, t in items:
        if _SKIP.search(hf_name):
            continue
        template, layer = _template(hf_name)
        lit_template = to_lit.get(template)
        if lit_template is None:
            raise UserError(f"unexpected weight {hf_name!r} for a {mt} model (does config.json match the weights?)")
        lit_name = lit_template.format(layer)
        piece = re.search(r"\.attn\.([qkv])\.(weight|bias)$", lit_name)
        if piece:  # separate q/k/v: wait for all three, then concatenate
            part, kind = piece.groups()
            rows = q_rows if part == "q" else kv_rows
            if t.shape[0] != rows:
                raise UserError(f"weight {hf_name!r} has {t.shape[0]} rows but the config needs {rows}")
            qkv_name = lit_name[: piece.start()] + f".attn.qkv.{kind}"
            parts = pending.setdefault(qkv_name, {})
            if part in parts:
                raise UserError(f"weight {hf_name!r} appears twice in the checkpoint")
            parts[part] = (hf_name, t)
            if len(parts) == 3:
                del pending[qkv_name]
                fused_t = torch.cat([parts[p][1] for p in "qkv"])
                yield emit(qkv_name, fused_t, parts["q"][0].replace(".q_proj.", ".{q,k,v}_proj."))
            continue
        if fused and re.search(r"\.attn\.qkv\.(weight|bias)$", lit_name):
            want = shapes.get(lit_name)
            if want is not None and t.shape != want:
                raise UserError(f"weight {hf_name!r} has shape {tuple(t.shape)} but the config needs {tuple(want)}")
            t = deinterleave_qkv(t, config)
        lit_name, t = emit(lit_name, t, hf_name)
        if lit_name == "transformer.wte.weight" and tie:
            wte = t  # kept (a reference, no copy) for the tied lm_head
        yield lit_name, t

    if pending:
        name, parts = next(iter(pending.items()))
        template, layer = _template(name)
        hf_names = {v: k for k, v in weight_map(config).items()}
        absent = [hf_names[template.replace(".attn.qkv.", f".attn.{p}.")].format(layer)
                  for p in "qkv" if p not in parts]
        raise UserError(f"incomplete attention weights: the checkpoint lacks {', '.join(absent)}")
    if tie and wte is not None and "lm_head.weight" in shapes and "lm_head.weight" not in done:
        yield emit("lm_head.weight", wte.clone(), "lm_head.weight (tied to the embedding)")
    missing = sorted(set(shapes) - done)
    if missing:
        hf_names = {v: k for k, v in weight_map(config).items()}
        shown = []
        for m in missing[:5]:
            template, layer = _template(m)
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
    return dict(_iter_hf_to_lit(hf_state.items(), config, dtype, tie_word_embeddings))


# ------------------------------------------------------------------------------------------------
# litquant -> HF
# ------------------------------------------------------------------------------------------------


def _iter_lit_to_hf(
    items: Iterable[tuple[str, torch.Tensor]], config: Config, tie_word_embeddings: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    to_hf = {lit: hf for hf, lit in weight_map(config).items()}
    fused = _fused_hf_qkv(config)
    for name, t in items:
        if name == "lm_head.weight" and tie_word_embeddings:
            continue  # HF stores tied embeddings once
        template, layer = _template(name)
        if re.search(r"\.attn\.qkv\.(weight|bias)$", name) and not fused:
            for part, piece in zip("qkv", t.split(_qkv_sizes(config))):
                yield to_hf[template.replace(".attn.qkv.", f".attn.{part}.")].format(layer), piece.clone()
            continue
        hf_template = to_hf.get(template)
        if hf_template is None:
            raise UserError(f"tensor {name!r} has no Hugging Face {hf_model_type(config)} equivalent")
        if fused and re.search(r"\.attn\.qkv\.(weight|bias)$", name):
            t = interleave_qkv(t, config)
        yield hf_template.format(layer), t


def _check_lit_state(
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
            raise UserError(f"{source}: {name} has shape {tuple(shape)} but the config needs {tuple(shapes[name])}")
    missing = sorted(set(shapes) - set(names_shapes))
    if missing:
        raise UserError(f"{source} is missing tensors: {', '.join(missing[:5])}")


def lit_to_hf(
    lit_state: Mapping[str, torch.Tensor], config: Config, tie_word_embeddings: Optional[bool] = None
) -> dict[str, torch.Tensor]:
    """A litquant state dict -> an HF state dict for `hf_model_type(config)`. With tied embeddings
    (None: when lm_head equals the embedding) `lm_head.weight` is left out, as HF saves it."""
    _check_lit_state({k: v.shape for k, v in lit_state.items()}, config, "state dict")
    if tie_word_embeddings is None:
        tie_word_embeddings = _can_tie(lit_state.get("transformer.wte.weight"), lit_state.get("lm_head.weight"), config)
    return dict(_iter_lit_to_hf(lit_state.items(), config, tie_word_embeddings))


def _can_tie(wte: Optional[torch.Tensor], lm_head: Optional[torch.Tensor], config: Config) -> bool:
    return (wte is not None and lm_head is not None and not config.lm_head_bias
            and wte.shape == lm_head.shape and torch.equal(wte, lm_head))


def hf_config(config: Config, tie_word_embeddings: bool = False, dtype: Optional[torch.dtype] = None) -> dict:
    """A `config.json` dict that transformers' AutoConfig accepts for this config's model_type.

    RoPE fields are written in the flat (transformers 4) form, which transformers 5 still reads."""
    mt = hf_model_type(config)
    C, nh, ng, hs = config.n_embd, config.n_head, config.n_query_groups, config.head_size

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"config {config.name!r} cannot be exported as Hugging Face {mt}: {what}")

    common = dict(
        model_type=mt, vocab_size=config.padded_vocab_size, hidden_size=C, num_hidden_layers=config.n_layer,
        num_attention_heads=nh, max_position_embeddings=config.block_size, rope_theta=float(config.rope_base),
        tie_word_embeddings=tie_word_embeddings,
    )
    llama_like = mt in ("llama", "mistral")
    norm, mlp = ("RMSNorm", "LLaMAMLP") if llama_like else ("LayerNorm", "GptNeoxMLP")
    need(config.norm_class_name == norm and config.mlp_class_name == mlp, f"it needs {norm} and {mlp}")
    if llama_like:
        need(not config.parallel_residual, "blocks must be sequential")
    else:
        need(hs * nh == C, "head_size must be n_embd / n_head")
    if mt != "llama":
        need(config.rope_adjustments is None, "rope_adjustments (Llama 3.1 scaling) are llama-only")
    if mt != "mistral":
        need(config.sliding_window_size is None, "a sliding window needs model_type mistral")

    if llama_like:
        need(config.rotary_percentage == 1.0, "needs full rotary")
        d = dict(
            architectures=["MistralForCausalLM" if mt == "mistral" else "LlamaForCausalLM"], **common,
            intermediate_size=config.intermediate_size, num_key_value_heads=ng, head_dim=hs, hidden_act="silu",
            rms_norm_eps=config.norm_eps,
        )
        if mt == "llama":
            d.update(attention_bias=config.bias, mlp_bias=config.bias)
            if config.rope_adjustments:
                d["rope_scaling"] = dict(rope_type="llama3", **config.rope_adjustments)
        else:
            need(not config.bias, "mistral has no biases")
            d["sliding_window"] = config.sliding_window_size
    elif mt == "falcon":
        need(config.rotary_percentage == 1.0 and config.gelu_approximate == "none", "needs full rotary and exact gelu")
        if not config.parallel_residual:
            need(ng in (1, nh), "sequential falcon blocks need multi-query or multi-head attention")
            new_arch, num_ln = False, None
        elif config.shared_attention_norm:
            new_arch = bool(config.extra_hf.get("new_decoder_architecture")) or ng not in (1, nh)
            num_ln = 1 if new_arch else None
        else:
            new_arch, num_ln = True, 2
        d = dict(
            architectures=["FalconForCausalLM"], **common, num_kv_heads=ng, new_decoder_architecture=new_arch,
            multi_query=ng == 1 if not new_arch else True, parallel_attn=config.parallel_residual,
            num_ln_in_parallel_attn=num_ln, bias=config.bias, alibi=False, activation="gelu",
            ffn_hidden_size=config.intermediate_size, layer_norm_epsilon=config.norm_eps,
        )
    elif mt == "gpt_neox":
        need(ng == nh and config.bias and not config.lm_head_bias, "needs multi-head attention and biases")
        need(not (config.parallel_residual and config.shared_attention_norm), "has no shared attention norm")
        d = dict(
            architectures=["GPTNeoXForCausalLM"], **common, intermediate_size=config.intermediate_size,
            hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_new",
            rotary_pct=config.rotary_percentage, rotary_emb_base=config.rope_base, layer_norm_eps=config.norm_eps,
            use_parallel_residual=config.parallel_residual, attention_bias=True,
        )
        del d["rope_theta"]  # written as rotary_emb_base
    else:  # phi
        need(config.bias and config.lm_head_bias and config.parallel_residual and config.shared_attention_norm,
             "needs biases, an lm_head bias and a parallel block with one norm")
        d = dict(
            architectures=["PhiForCausalLM"], **common, intermediate_size=config.intermediate_size,
            num_key_value_heads=ng, hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_new",
            partial_rotary_factor=config.rotary_percentage, layer_norm_eps=config.norm_eps, qk_layernorm=False,
        )
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    # fields kept from the original config.json (token ids, ...) unless the structure above decides them
    return {**config.extra_hf, **d}


# ------------------------------------------------------------------------------------------------
# Reading HF weight files
# ------------------------------------------------------------------------------------------------


def _hf_weight_files(checkpoint_dir: Path) -> list[Path]:
    """The weight shards of an HF directory: safetensors preferred, else pytorch_model*.bin."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise UserError(f"{index} is not a valid weight index (no weight_map)") from None
            missing = [n for n in names if not (checkpoint_dir / n).is_file()]
            if missing:
                raise UserError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [checkpoint_dir / n for n in names]
        # our own outputs and Mistral's native-format duplicate are not HF transformers weights
        files = sorted(p for p in checkpoint_dir.glob(pattern) if p.is_file()
                       and not p.name.startswith(("lit_model", "consolidated", "adapter_model")))
        if files:
            return files
    raise UserError(f"no Hugging Face weight files (*.safetensors or pytorch_model*.bin) in {checkpoint_dir}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refusing to load, it holds more than tensors ({str(e).splitlines()[0]})") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path} cannot be read (truncated or corrupt? {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a flat state dict of tensors")
    return state


def _iter_hf_files(
    files: list[Path], progress: bool = True, meta: bool = False, only: Optional[set[str]] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from every shard, one tensor at a time (safetensors read lazily, .bin memory-mapped).
    meta=True: meta tensors of the stored dtypes and shapes, nothing read (a conversion's plan); `only`: just
    these names."""
    if meta:
        for path in files:
            if path.suffix == ".safetensors":
                with open_safetensors(path) as st:
                    for name in st.keys():
                        if only is None or name in only:
                            sl = st.get_slice(name)
                            yield name, torch.empty(sl.get_shape(), dtype=DTYPES[sl.get_dtype()], device="meta")
            else:
                for name, t in _load_bin(path).items():
                    if only is None or name in only:
                        yield name, torch.empty(t.shape, dtype=t.dtype, device="meta")
        return
    total = None
    if all(f.suffix == ".safetensors" for f in files):
        total = 0
        for f in files:
            with open_safetensors(f) as st:
                total += len(st.keys())
    bar = tqdm(total=total, desc="Converting", unit="tensor", disable=not progress)
    try:
        for path in files:
            bar.set_postfix_str(path.name)
            if path.suffix == ".safetensors":
                with open_safetensors(path) as st:
                    for name in st.keys():
                        if only is None or name in only:
                            yield name, st.get_tensor(name)
                        bar.update()
            else:
                state = _load_bin(path)
                for name in list(state):
                    t = state.pop(name)
                    if only is None or name in only:
                        yield name, t
                    bar.update()
                del state
    finally:
        bar.close()


def _parse_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    d = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise UserError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return d


# ------------------------------------------------------------------------------------------------
# GPTQ: AutoGPTQ-format HF models <-> litquant GPTQ checkpoints
#
# Each quantized Linear is a group of tensors `<module>.{qweight, qzeros, scales, g_idx[, bias]}` (layout:
# litquant/quantization/gptq_format.py). Renaming a module is a plain rename. Splitting litquant's fused qkv
# into q/k/v (or interleaving it for Falcon/GPT-NeoX) permutes *output* channels: qweight and scales are
# column-wise over outputs, but qzeros packs several outputs per int32 word, so the layer is unpacked to
# "rows" (every per-output tensor with outputs on dim 0: the integer codes [out, in], zeros and scales
# [out, groups], bias), the rows are split / concatenated / interleaved exactly like the fp weight's rows,
# and each result is packed again. All of it is integer bookkeeping: the round trip is exact.
# ------------------------------------------------------------------------------------------------

_GPTQ_ATTRS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def _gptq_bits(quantize: str) -> int:
    from litquant.quantization.gptq_format import SUPPORTED_BITS

    m = re.fullmatch(r"gptq\.int(\d+)", str(quantize))
    if m is None or int(m.group(1)) not in SUPPORTED_BITS:
        raise UserError(f"--quantize {quantize!r} cannot be exported: choose one of "
                        f"{', '.join(f'gptq.int{b}' for b in SUPPORTED_BITS)}")
    return int(m.group(1))


def _gptq_rows(t: Mapping[str, torch.Tensor], bits: int, v2: bool = False) -> dict[str, torch.Tensor]:
    """One quantized Linear's tensors -> rows: {codes [out, in], zeros [out, groups] (true zero points),
    scales [out, groups], g_idx [in], bias [out] (if any)}. `v2`: qzeros store the zero itself, not zero - 1."""
    from litquant.quantization.gptq_format import unpack

    codes, zeros, scales, g_idx = unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    if v2:
        zeros = zeros - 1
    rows = {"codes": codes, "zeros": zeros.t(), "scales": scales.t(), "g_idx": g_idx}
    if t.get("bias") is not None:
        rows["bias"] = t["bias"]
    return rows


def _gptq_pack_rows(rows: Mapping[str, torch.Tensor], bits: int, source: str) -> dict[str, torch.Tensor]:
    from litquant.quantization.gptq_format import pack

    if rows["zeros"].numel() and int(rows["zeros"].min()) < 1:
        raise UserError(f"{source}: a zero point of 0 cannot be stored in the GPTQ v1 format (qzeros = zero - 1)")
    out = pack(rows["codes"], rows["zeros"].t(), rows["scales"].t(), rows["g_idx"], bits)
    if "bias" in rows:
        out["bias"] = rows["bias"].contiguous()
    return out


def _gptq_map_rows(rows: Mapping[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    """Apply a row transform (split piece, interleave, ...) to every per-output tensor; g_idx is per input."""
    return {k: (v if k == "g_idx" else fn(v)) for k, v in rows.items()}


def _iter_gptq_lit_to_hf(
    modules: Iterable[tuple[str, dict[str, torch.Tensor]]], config: Config, bits: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(litquant module name, its GPTQ tensors) -> HF GPTQ tensors (names per family, qkv split/interleaved)."""
    to_hf = {lit: hf for hf, lit in weight_map(config).items()}
    fused = _fused_hf_qkv(config)
    for name, t in modules:
        template, layer = _template(name + ".weight")
        if template.endswith(".attn.qkv.weight"):
            rows = _gptq_rows(t, bits)
            if fused:
                pieces = {template: _gptq_map_rows(rows, lambda r: interleave_qkv(r, config))}
            else:
                split = {k: (v.split(_qkv_sizes(config)) if k != "g_idx" else (v, v.clone(), v.clone()))
                         for k, v in rows.items()}
                pieces = {template.replace(".attn.qkv.", f".attn.{p}."): {k: v[i] for k, v in split.items()}
                          for i, p in enumerate("qkv")}
            for lit_template, piece in pieces.items():
                hf_module = to_hf[lit_template].format(layer).removesuffix(".weight")
                for attr, v in _gptq_pack_rows(piece, bits, name).items():
                    yield f"{hf_module}.{attr}", v
            continue
        hf_template = to_hf.get(template)
        if hf_template is None:
            raise UserError(f"quantized layer {name!r} has no Hugging Face {hf_model_type(config)} equivalent")
        hf_module = hf_template.format(layer).removesuffix(".weight")
        for attr, v in t.items():
            yield f"{hf_module}.{attr}", v


def _gptq_plan_hf(module: str, slices: Mapping, config: Config, bits: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Meta tensors of what `_iter_gptq_lit_to_hf` makes of one stored litquant GPTQ layer."""
    to_hf = {lit: hf for hf, lit in weight_map(config).items()}
    template, layer = _template(module + ".weight")
    in_features = slices[f"{module}.g_idx"].get_shape()[0]
    groups, out_features = slices[f"{module}.scales"].get_shape()
    bias = DTYPES[slices[f"{module}.bias"].get_dtype()] if f"{module}.bias" in slices else None
    if template.endswith(".attn.qkv.weight") and not _fused_hf_qkv(config):
        pieces = [(template.replace(".attn.qkv.", f".attn.{p}."), n) for p, n in zip("qkv", _qkv_sizes(config))]
    else:
        pieces = [(template, out_features)]
    for lit_template, out in pieces:
        hf_template = to_hf.get(lit_template)
        if hf_template is None:
            raise UserError(f"quantized layer {module!r} has no Hugging Face {hf_model_type(config)} equivalent")
        yield from _gptq_plan(hf_template.format(layer).removesuffix(".weight"), in_features, out, groups, bits, bias)


def _gptq_modules(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split tensor names into quantized module names (those with a qweight) and plain tensor names."""
    names = list(names)
    modules = {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}
    plain = [n for n in names if n.rpartition(".")[0] not in modules]
    return sorted(modules, key=_layer_order), plain


def _hf_import_config(hf: dict, checkpoint_dir: Path, model_name: Optional[str]) -> Config:
    """The litquant Config of an HF checkpoint: a named one if asked, else read from its config.json."""
    if model_name is not None:
        return Config.from_name(model_name)
    config = Config.from_hf_config(hf)
    if not hf.get("_name_or_path"):
        config.name = checkpoint_dir.name
    return config


def _gptq_plan(module: str, in_features: int, out_features: int, groups: int, bits: int,
               bias: Optional[torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
    """Meta tensors of one quantized layer's AutoGPTQ tensors (a file's plan: the layout's shapes)."""
    shapes = {"qweight": ((in_features * bits + 31) // 32, out_features), "qzeros": (groups, out_features * bits // 32),
              "scales": (groups, out_features), "g_idx": (in_features,)}
    dtypes = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
    for attr, shape in shapes.items():
        yield f"{module}.{attr}", torch.empty(shape, dtype=dtypes[attr], device="meta")
    if bias is not None:
        yield f"{module}.bias", torch.empty(out_features, dtype=bias, device="meta")


def _import_gptq(checkpoint_dir: Path, hf: dict, dtype: Optional[str], model_name: Optional[str]) -> None:
    """An AutoGPTQ-format HF model (config.json quantization_config.quant_method == "gptq") ->
    `lit_model_gptq.<bits>bit.safetensors` + `quantize_config.json` + `model_config.yaml`, in place. Streamed:
    a layer is converted and written as soon as its tensors (and, for q/k/v, its siblings') have been read."""
    from litquant.quantization.gptq_format import check_shapes, default_g_idx, num_groups
    from litquant.quantization.gptq_plugin import QUANTIZE_CONFIG_FILE, check_quantize_config, gptq_file, quantize_config

    source = str(checkpoint_dir / "config.json")
    # gptqmodel keeps the settings that do not change the layout (damp_percent, ...) under "meta"
    meta = hf["quantization_config"].get("meta")
    q = {**(meta if isinstance(meta, dict) else {}), **hf["quantization_config"]}
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise UserError(f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2')")
    v2 = fmt == "gptq_v2"
    check_quantize_config({**q, "checkpoint_format": "gptq"}, source)
    bits, group_size = int(q["bits"]), int(q["group_size"])
    qc = quantize_config(bits, group_size, bool(q.get("desc_act", False)), bool(q.get("sym", False)),
                         float(q.get("damp_percent", 0.01)), bool(q.get("true_sequential", True)),
                         bool(q.get("static_groups", False)))
    torch_dtype = _parse_dtype(dtype)
    config = _hf_import_config(hf, checkpoint_dir, model_name)
    to_lit = _import_map(config)
    shapes = expected_shapes(config)

    files = _hf_weight_files(checkpoint_dir)
    headers = dict(_iter_hf_files(files, meta=True))  # names, dtypes and shapes: nothing read yet
    hf_modules, plain = _gptq_modules(headers)
    if not hf_modules:
        raise UserError(f"{source} says GPTQ but the weight files hold no quantized layers (*.qweight)")
    expected_attrs = {m: {a for a in _GPTQ_ATTRS if f"{m}.{a}" in headers} for m in hf_modules}

    def lit_module_of(hf_module: str) -> tuple[str, Optional[str]]:
        """(the litquant layer an HF quantized layer belongs to, its q/k/v piece if it is one)"""
        template, layer = _template(hf_module + ".weight")
        lit_template = to_lit.get(template)
        if lit_template is None:
            raise UserError(f"unexpected quantized layer {hf_module!r} for a {hf_model_type(config)} model")
        lit_module = lit_template.format(layer).removesuffix(".weight")
        piece = re.search(r"\.attn\.([qkv])$", lit_module)
        return (lit_module[: piece.start()] + ".attn.qkv", piece.group(1)) if piece else (lit_module, None)

    quantized = {lit_module_of(m)[0] for m in hf_modules}
    for m in quantized:
        if m + ".weight" not in shapes:
            raise UserError(f"{source}: quantized layer {m!r} is not in this {hf_model_type(config)} config")
    rest = {k: v for k, v in shapes.items() if k.rpartition(".")[0] not in quantized}
    tie = hf.get("tie_word_embeddings") if "tie_word_embeddings" in hf else None

    def check_layer(hf_module: str, t: dict[str, torch.Tensor], fused_name: str, piece: Optional[str]):
        want = shapes[fused_name + ".weight"]
        if piece:  # (out, in) of this piece of the fused layer
            want = (_qkv_sizes(config)["qkv".index(piece)], want[1])
        for a in ("qzeros", "scales"):
            if a not in t:
                raise UserError(f"quantized layer {hf_module!r} has no {a}")
        in_features = t["qweight"].shape[0] * 32 // bits
        if "g_idx" not in t:  # GPTQ-for-LLaMa era files: no act-order, groups in channel order
            t["g_idx"] = default_g_idx(in_features, group_size)
        t["g_idx"] = t["g_idx"].to(torch.int32)
        t["scales"] = t["scales"].to(torch.float16)
        check_shapes(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
        has_bias = fused_name + ".bias" in shapes
        if "bias" in t and not has_bias:
            if bool(t["bias"].any()):
                raise UserError(f"quantized layer {hf_module!r} has a bias but the config has none")
            del t["bias"]  # AutoGPTQ saved an all-zero bias for bias-free layers
        elif "bias" not in t and has_bias:
            raise UserError(f"quantized layer {hf_module!r} has no bias but the config needs one")
        if "bias" in t and torch_dtype is not None:
            t["bias"] = t["bias"].to(torch_dtype)
        if (t["scales"].shape[1], in_features) != tuple(want):
            raise UserError(f"quantized layer {hf_module!r} is {t['scales'].shape[1]}x{in_features} (out x in) "
                            f"but the config needs {tuple(want)[0]}x{tuple(want)[1]}")
        return t

    def quantized_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        """Each quantized layer once all its tensors have been read: checked, q/k/v fused, renamed."""
        wanted = {f"{m}.{a}" for m, attrs in expected_attrs.items() for a in attrs}
        stash: dict[str, dict[str, torch.Tensor]] = {}
        pending: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for name, tensor in _iter_hf_files(files, only=wanted):
            hf_module, _, attr = name.rpartition(".")
            got = stash.setdefault(hf_module, {})
            got[attr] = tensor
            if len(got) < len(expected_attrs[hf_module]):
                continue
            t = stash.pop(hf_module)
            lit_module, piece = lit_module_of(hf_module)
            t = check_layer(hf_module, t, lit_module, piece)
            if piece:  # separate q/k/v: concatenate their rows once all three are here
                pending.setdefault(lit_module, {})[piece] = t
                if len(pending[lit_module]) < 3:
                    continue
                got3 = pending.pop(lit_module)
                parts = [_gptq_rows(got3[p], bits, v2) for p in "qkv"]
                if not all(torch.equal(p["g_idx"], parts[0]["g_idx"]) for p in parts):
                    raise UserError(f"{hf_module.rsplit('.', 1)[0]}: q/k/v were quantized with different g_idx "
                                    "(act-order permutations), so they cannot be fused into one qkv layer")
                rows = {k: (parts[0][k] if k == "g_idx" else torch.cat([p[k] for p in parts])) for k in parts[0]}
                t = _gptq_pack_rows(rows, bits, hf_module)
            elif lit_module.endswith(".attn.qkv") and _fused_hf_qkv(config):
                t = _gptq_pack_rows(_gptq_map_rows(_gptq_rows(t, bits, v2), lambda r: deinterleave_qkv(r, config)),
                                    bits, hf_module)
            elif v2:
                t = _gptq_pack_rows(_gptq_rows(t, bits, v2), bits, hf_module)
            for a, v in t.items():
                yield f"{lit_module}.{a}", v
        if pending:
            qkv, parts = next(iter(pending.items()))
            raise UserError(f"incomplete quantized attention: {qkv} lacks {', '.join(p for p in 'qkv' if p not in parts)}")

    def plan() -> Iterator[tuple[str, torch.Tensor]]:
        for m in sorted(quantized, key=_layer_order):
            out_features, in_features = shapes[m + ".weight"]
            hf_bias = [headers[f"{h}.bias"].dtype for h in hf_modules if f"{h}.bias" in headers and lit_module_of(h)[0] == m]
            bias = (torch_dtype or hf_bias[0]) if m + ".bias" in shapes and hf_bias else None
            yield from _gptq_plan(m, in_features, out_features, num_groups(in_features, group_size), bits, bias)
        yield from _iter_hf_to_lit(((k, headers[k]) for k in plain), config, torch_dtype, tie, shapes=rest)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from quantized_tensors()
        yield from _iter_hf_to_lit(_iter_hf_files(files, only=set(plain)), config, torch_dtype, tie, shapes=rest)

    out = checkpoint_dir / gptq_file(bits)
    write_safetensors(out, tensors(), plan(), metadata={"format": "pt", "litquant": "1", "quantize_config": json.dumps(qc)})
    atomic_write_text(checkpoint_dir / QUANTIZE_CONFIG_FILE, json.dumps(qc, indent=2) + "\n")
    config.save(checkpoint_dir)
    print(f"Wrote {out} ({len(quantized)} GPTQ layers, {bits} bits, group_size {group_size}) and {CONFIG_FILE}; "
          f"run it with --quantize gptq.int{bits}", flush=True)


def _export_gptq(checkpoint_dir: Path, output_dir: Path, config: Config, bits: int, max_shard_size: int) -> None:
    """`convert_lit_checkpoint --quantize gptq.int<bits>`: the GPTQ file as an AutoGPTQ-format HF model."""
    from litquant.quantization.gptq_format import check_shapes
    from litquant.quantization.gptq_plugin import QUANTIZE_CONFIG_FILE, gptq_file, read_quantize_config

    weights = checkpoint_dir / gptq_file(bits)
    if not weights.is_file():
        raise UserError(f"{checkpoint_dir} has no {weights.name}: make it with `litquant quantize gptq --bits {bits}`")
    qc = read_quantize_config(weights)
    if qc["bits"] != bits:
        raise UserError(f"{weights} was quantized with {qc['bits']} bits, not {bits}")
    shapes = expected_shapes(config)
    with open_safetensors(weights) as f:
        names = list(f.keys())
        modules, plain = _gptq_modules(names)
        slices = {n: f.get_slice(n) for n in names}
        for m in modules:  # the quantized layers must match the config
            want = shapes.get(m + ".weight")
            qshape = slices[m + ".qweight"].get_shape()
            out_features = slices[m + ".scales"].get_shape()[1] if m + ".scales" in slices else None
            if want is None or (out_features, qshape[0] * 32 // bits) != tuple(want):
                raise UserError(f"{weights}: quantized layer {m!r} does not match the config")
        _check_lit_state({n: slices[n].get_shape() for n in plain}, config, str(weights), skip=set(modules))

        def module_tensors(m: str) -> dict[str, torch.Tensor]:
            t = {a: f.get_tensor(f"{m}.{a}") for a in _GPTQ_ATTRS if f"{m}.{a}" in slices}
            check_shapes(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
            return t

        tie = "lm_head" not in modules and _file_can_tie(f, slices, config)
        d = hf_config(config, tie, DTYPES[slices["transformer.wte.weight"].get_dtype()])
        d["quantization_config"] = qc
        if tie:
            plain.remove("lm_head.weight")

        def nbytes(unit: str) -> int:
            ts = [unit] if unit in slices else [f"{unit}.{a}" for a in _GPTQ_ATTRS if f"{unit}.{a}" in slices]
            return sum(_nbytes(slices[t]) for t in ts)

        units = sorted([*modules, *plain], key=_layer_order)
        unit_set = set(modules)

        def tensors(shard: list[str], meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
            if meta:  # the shard's plan: the layout's shapes (packing reads values, so it cannot run on meta)
                yield from _iter_lit_to_hf(((n, _meta(slices[n])) for n in shard if n not in unit_set), config, tie)
                for u in (u for u in shard if u in unit_set):
                    yield from _gptq_plan_hf(u, slices, config, bits)
                return
            yield from _iter_lit_to_hf(((n, f.get_tensor(n)) for n in shard if n not in unit_set), config, tie)
            for u in (u for u in shard if u in unit_set):  # one quantized layer at a time
                yield from _iter_gptq_lit_to_hf([(u, module_tensors(u))], config, bits)

        _write_hf_dir(checkpoint_dir, output_dir, _plan_shards([(u, nbytes(u)) for u in units], max_shard_size),
                      tensors, d)
    atomic_write_text(output_dir / QUANTIZE_CONFIG_FILE, json.dumps(qc, indent=2) + "\n")


def _meta(s) -> torch.Tensor:
    """A meta tensor of a stored tensor's dtype and shape (from its safetensors slice; nothing read)."""
    return torch.empty(s.get_shape(), dtype=DTYPES[s.get_dtype()], device="meta")


def _nbytes(s) -> int:
    """Bytes of a stored tensor, from its safetensors slice (shape and dtype; no data read)."""
    return math.prod(s.get_shape()) * DTYPES[s.get_dtype()].itemsize


def _file_can_tie(f, slices: Mapping, config: Config) -> bool:
    """`_can_tie` for the tensors of an open safetensors file: wte and lm_head are read (and compared) only
    when their stored shapes allow tying."""
    wte, lm_head = slices.get("transformer.wte.weight"), slices.get("lm_head.weight")
    if wte is None or lm_head is None or config.lm_head_bias or wte.get_shape() != lm_head.get_shape():
        return False
    return _can_tie(f.get_tensor("transformer.wte.weight"), f.get_tensor("lm_head.weight"), config)


# ------------------------------------------------------------------------------------------------
# The jobs
# ------------------------------------------------------------------------------------------------


def convert_hf_checkpoint(checkpoint_dir: Path, dtype: Optional[str] = None, model_name: Optional[str] = None) -> None:
    """Convert a Hugging Face model directory to a litquant checkpoint, in place.

    Reads `config.json` (or the named config) and the `*.safetensors` / `pytorch_model*.bin` shards;
    writes `model_config.yaml` and `lit_model.safetensors` beside them. Tokenizer files stay where they are.

    Args:
        checkpoint_dir: the HF download (config.json, weights, tokenizer files).
        dtype: store the weights in this dtype (float32, bfloat16, float16); default: as in the files.
        model_name: use this litquant named config instead of deriving one from config.json.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
    torch_dtype = _parse_dtype(dtype)
    hf_path = checkpoint_dir / "config.json"
    if not hf_path.is_file() and model_name is None:
        raise UserError(f"{checkpoint_dir} has no config.json (pass --model_name to use a known config)")
    hf = read_json(hf_path) if hf_path.is_file() else {}

    quant = hf.get("quantization_config") or {}
    if quant:
        method = quant.get("quant_method")
        if method == "gptq":
            return _import_gptq(checkpoint_dir, hf, dtype, model_name)
        raise UserError(f"{hf_path}: {method!r}-quantized Hugging Face checkpoints are not supported")

    config = _hf_import_config(hf, checkpoint_dir, model_name)
    tie = hf.get("tie_word_embeddings") if "tie_word_embeddings" in hf else None
    files = _hf_weight_files(checkpoint_dir)
    # one pass over the headers plans the output file (meta tensors through the same mapping), the second
    # streams: each tensor is read, mapped and written before the next is read
    plan = _iter_hf_to_lit(_iter_hf_files(files, meta=True), config, torch_dtype, tie)
    n = write_safetensors(checkpoint_dir / WEIGHTS_FILE, _iter_hf_to_lit(_iter_hf_files(files), config, torch_dtype, tie),
                          plan, metadata={"format": "pt", "litquant": "1"})
    config.save(checkpoint_dir)
    print(f"Wrote {checkpoint_dir / WEIGHTS_FILE} ({n / 1e6:.1f}M parameters) and {CONFIG_FILE}", flush=True)


def convert_lit_checkpoint(
    checkpoint_dir: Path, output_dir: Path, max_shard_size: int = HF_MAX_SHARD_SIZE, quantize: Optional[str] = None
) -> None:
    """Export a litquant checkpoint as a Hugging Face model directory.

    Writes `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards plus an
    index when larger than `max_shard_size` bytes) and copies the tokenizer files and generation_config.json.

    Args:
        checkpoint_dir: the litquant checkpoint (model_config.yaml + lit_model.safetensors).
        output_dir: where the HF directory is written (created if needed; must differ from checkpoint_dir).
        max_shard_size: largest weight file, in bytes.
        quantize: export the GPTQ checkpoint instead (gptq.int2/3/4/8: lit_model_gptq.<bits>bit.safetensors)
            as an AutoGPTQ-format model: quantized layers as qweight/qzeros/scales/g_idx with HF names,
            `quantization_config` in config.json and a quantize_config.json.
    """
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {str(checkpoint_dir)!r} does not exist")
    if not (checkpoint_dir / CONFIG_FILE).is_file():
        raise UserError(f"{checkpoint_dir} has no {CONFIG_FILE} (is it a litquant checkpoint directory?)")
    bits = None if quantize is None else _gptq_bits(quantize)
    weights = checkpoint_dir / WEIGHTS_FILE
    if bits is None and not weights.is_file():
        raise UserError(f"{checkpoint_dir} has no {WEIGHTS_FILE}")
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise UserError("output_dir must differ from checkpoint_dir (the export would overwrite its source)")
    if max_shard_size <= 0:
        raise UserError(f"max_shard_size must be positive, got {max_shard_size}")
    config = Config.from_file(checkpoint_dir / CONFIG_FILE)
    hf_model_type(config)  # fail early if the config has no HF family
    if bits is not None:
        return _export_gptq(checkpoint_dir, output_dir, config, bits, max_shard_size)

    with open_safetensors(weights) as f:
        names = list(f.keys())
        slices = {n: f.get_slice(n) for n in names}
        _check_lit_state({n: s.get_shape() for n, s in slices.items()}, config, str(weights))

        tie = _file_can_tie(f, slices, config)
        d = hf_config(config, tie, DTYPES[slices["transformer.wte.weight"].get_dtype()])  # checked before any writes

        # plan shards from the stored sizes; each shard's tensors are read, mapped and written together
        names.sort(key=_layer_order)
        if tie:
            names.remove("lm_head.weight")
        shards = _plan_shards([(n, _nbytes(slices[n])) for n in names], max_shard_size)

        def tensors(shard: list[str], meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
            read = (lambda n: _meta(slices[n])) if meta else f.get_tensor
            return _iter_lit_to_hf(((n, read(n)) for n in shard), config, tie)

        _write_hf_dir(checkpoint_dir, output_dir, shards, tensors, d)


def _layer_order(name: str) -> tuple[int, str]:
    layer = _template(name)[1]
    return (layer if layer is not None else -1, name)


def _plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Consecutive units (tensors, or whole quantized layers) into shards of at most max_shard_size bytes
    (a single unit larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_hf_dir(
    checkpoint_dir: Path, output_dir: Path, shards: list[list[str]], tensors, d: dict
) -> None:
    """Write the shards, the index or not, config.json and side files. `tensors(shard, meta)` yields a shard's HF
    tensors one at a time (meta=True: meta tensors, the shard file's plan), each written as soon as it is made."""
    output_dir.mkdir(parents=True, exist_ok=True)
    single = len(shards) == 1
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(tqdm(shards, desc="Exporting", unit="shard", disable=single)):
        fname = "model.safetensors" if single else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        plan = list(tensors(shard, True))
        write_safetensors(output_dir / fname, tensors(shard, False), plan, metadata={"format": "pt"})
        weight_map.update({k: fname for k, _ in plan})
        total += sum(t.numel() * t.element_size() for _, t in plan)

    # a stale single file would shadow a new index in transformers' loader, and the other way round
    if single:
        (output_dir / "model.safetensors.index.json").unlink(missing_ok=True)
        stale = [p for p in output_dir.glob("model-*-of-*.safetensors")]
    else:
        atomic_write_text(output_dir / "model.safetensors.index.json",
                          json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        stale = [output_dir / "model.safetensors"] + [p for p in output_dir.glob("model-*-of-*.safetensors")
                                                       if p.name not in set(weight_map.values())]
    for p in stale:
        p.unlink(missing_ok=True)
    atomic_write_text(output_dir / "config.json", json.dumps(d, indent=2) + "\n")
    copy_side_files(checkpoint_dir, output_dir, HF_SIDE_FILES)
    print(f"Wrote a Hugging Face {d['model_type']} model to {output_dir}", flush=True)
