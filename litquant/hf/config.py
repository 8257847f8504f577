"""Hugging Face config.json <-> litquant Config: which HF family a config belongs to, the config.json an export
writes (`hf_config`) and the Config an import uses (`hf_import_config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from litquant.config import Config
from litquant.errors import UserError

HF_FAMILIES = ("llama", "mistral", "falcon", "gpt_neox", "phi")


def hf_model_type(config: Config) -> str:
    """The HF model_type a config exports as: its `hf_model_type`, or inferred from its structure."""
    mt = config.hf_model_type
    if mt:
        if mt not in HF_FAMILIES:
            raise UserError(
                f"unsupported Hugging Face model_type {mt!r} (supported: {', '.join(HF_FAMILIES)})"
            )
        return mt
    if (
        config.mlp_class_name == "LLaMAMLP"
        and config.norm_class_name == "RMSNorm"
        and not config.parallel_residual
    ):
        return "mistral" if config.sliding_window_size is not None else "llama"
    if config.mlp_class_name == "GptNeoxMLP" and config.norm_class_name == "LayerNorm":
        if config.lm_head_bias:
            return "phi"
        if not config.bias:
            return "falcon"
        if not config.shared_attention_norm or not config.parallel_residual:
            return "gpt_neox"
    raise UserError(f"config {config.name!r} matches no Hugging Face family ({', '.join(HF_FAMILIES)})")


def hf_config(config: Config, tie_word_embeddings: bool = False, dtype: Optional[torch.dtype] = None) -> dict:
    """A `config.json` dict that transformers' AutoConfig accepts for this config's model_type.

    RoPE fields are written in the flat (transformers 4) form, which transformers 5 still reads."""
    mt = hf_model_type(config)
    C, nh, ng, hs = config.n_embd, config.n_head, config.n_query_groups, config.head_size

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"config {config.name!r} cannot be exported as Hugging Face {mt}: {what}")

    common = dict(
        model_type=mt,
        vocab_size=config.padded_vocab_size,
        hidden_size=C,
        num_hidden_layers=config.n_layer,
        num_attention_heads=nh,
        max_position_embeddings=config.block_size,
        rope_theta=float(config.rope_base),
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
            architectures=["MistralForCausalLM" if mt == "mistral" else "LlamaForCausalLM"],
            **common,
            intermediate_size=config.intermediate_size,
            num_key_value_heads=ng,
            head_dim=hs,
            hidden_act="silu",
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
        need(
            config.rotary_percentage == 1.0 and config.gelu_approximate == "none",
            "needs full rotary and exact gelu",
        )
        if not config.parallel_residual:
            need(ng in (1, nh), "sequential falcon blocks need multi-query or multi-head attention")
            new_arch, num_ln = False, None
        elif config.shared_attention_norm:
            new_arch = bool(config.extra_hf.get("new_decoder_architecture")) or ng not in (1, nh)
            num_ln = 1 if new_arch else None
        else:
            new_arch, num_ln = True, 2
        d = dict(
            architectures=["FalconForCausalLM"],
            **common,
            num_kv_heads=ng,
            new_decoder_architecture=new_arch,
            multi_query=ng == 1 if not new_arch else True,
            parallel_attn=config.parallel_residual,
            num_ln_in_parallel_attn=num_ln,
            bias=config.bias,
            alibi=False,
            activation="gelu",
            ffn_hidden_size=config.intermediate_size,
            layer_norm_epsilon=config.norm_eps,
        )
    elif mt == "gpt_neox":
        need(ng == nh and config.bias and not config.lm_head_bias, "needs multi-head attention and biases")
        need(not (config.parallel_residual and config.shared_attention_norm), "has no shared attention norm")
        d = dict(
            architectures=["GPTNeoXForCausalLM"],
            **common,
            intermediate_size=config.intermediate_size,
            hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_new",
            rotary_pct=config.rotary_percentage,
            rotary_emb_base=config.rope_base,
            layer_norm_eps=config.norm_eps,
            use_parallel_residual=config.parallel_residual,
            attention_bias=True,
        )
        del d["rope_theta"]  # written as rotary_emb_base
    else:  # phi
        need(
            config.bias and config.lm_head_bias and config.parallel_residual and config.shared_attention_norm,
            "needs biases, an lm_head bias and a parallel block with one norm",
        )
        d = dict(
            architectures=["PhiForCausalLM"],
            **common,
            intermediate_size=config.intermediate_size,
            num_key_value_heads=ng,
            hidden_act="gelu" if config.gelu_approximate == "none" else "gelu_new",
            partial_rotary_factor=config.rotary_percentage,
            layer_norm_eps=config.norm_eps,
            qk_layernorm=False,
        )
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    # fields kept from the original config.json (token ids, ...) unless the structure above decides them
    return {**config.extra_hf, **d}


def hf_import_config(hf: dict, checkpoint_dir: Path, model_name: Optional[str]) -> Config:
    """The litquant Config of an HF checkpoint: a named one if asked, else read from its config.json."""
    if model_name is not None:
        return Config.from_name(model_name)
    config = Config.from_hf_config(hf)
    if not hf.get("_name_or_path"):
        config.name = checkpoint_dir.name
    return config


def parse_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    """`--dtype` (float32, bfloat16, float16) as a torch dtype; None keeps the stored dtypes."""
    if dtype is None:
        return None
    d = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise UserError(f"unknown dtype {dtype!r} (use float32, bfloat16 or float16)")
    return d
