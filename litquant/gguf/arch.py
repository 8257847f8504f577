"""What litquant knows of a GGUF architecture: its metadata keys as an HF config.json dict (and back), its tensor names
as HF names, and llama.cpp's q/k row order. Only the Llama family is modelled both ways (llama.cpp writes Llama,
Mistral, SmolLM, TinyLlama... as architecture `llama`); anything else is a one-line error naming it."""

from __future__ import annotations

from typing import Any, Optional

import torch

from litquant.config import Config
from litquant.errors import UserError

ARCHITECTURES = ("llama",)

# GGUF tensor name -> HF name ("{}" is the layer index); ".weight"/".bias" are kept as they are
LLAMA_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj",
    "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj",
    "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj",
}


def check_architecture(arch: Optional[str], source: str) -> str:
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{source}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    return arch


def hf_config_from_gguf(meta: dict[str, Any], vocab_size: int, tied: bool, source: str) -> dict:
    """A Llama config.json dict from the `llama.*` metadata of a GGUF file."""
    a = "llama."

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(a + key, default)
        if v is None:
            raise UserError(f"{source}: the GGUF metadata lacks {a + key}")
        return v

    if meta.get(a + "rope.scaling.type", "none") not in ("none", None):
        raise UserError(f"{source}: RoPE scaling {meta[a + 'rope.scaling.type']!r} is not supported")
    n_head, C = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(meta.get(a + "attention.key_length") or C // n_head)
    if int(meta.get(a + "rope.dimension_count") or head_dim) != head_dim:
        raise UserError(f"{source}: partial rotary embeddings are not supported for llama")
    hf = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=vocab_size,
        hidden_size=C,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(meta.get(a + "attention.head_count_kv") or n_head),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(a + "rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length")),
        tie_word_embeddings=tied,
        hidden_act="silu",
    )
    for key in ("bos_token_id", "eos_token_id"):
        if (v := meta.get(f"tokenizer.ggml.{key}")) is not None:
            hf[key] = int(v)
    return hf


def gguf_metadata(config: Config) -> dict[str, Any]:
    """The `llama.*` keys for a litquant config (the inverse of `hf_config_from_gguf`)."""
    from litquant.hf.config import hf_model_type

    if hf_model_type(config) not in ("llama", "mistral"):
        raise UserError(f"config {config.name!r} cannot be exported as GGUF (only the Llama family can)")
    if config.rope_adjustments or config.bias:
        raise UserError(f"config {config.name!r} cannot be exported as GGUF (rope_adjustments or biases)")
    return {
        "context_length": config.block_size,
        "embedding_length": config.n_embd,
        "block_count": config.n_layer,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.n_head,
        "attention.head_count_kv": config.n_query_groups,
        "attention.key_length": config.head_size,
        "attention.value_length": config.head_size,
        "rope.dimension_count": config.head_size,
        "rope.freq_base": float(config.rope_base),
        "attention.layer_norm_rms_epsilon": float(config.norm_eps),
        "vocab_size": config.padded_vocab_size,
    }


def hf_name(gguf_name: str) -> Optional[str]:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if it is not a Llama tensor."""
    base, _, param = gguf_name.rpartition(".")
    parts = base.split(".")
    layer = None
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        layer, base = parts[1], "blk.{}." + parts[2]
    hf = LLAMA_TENSORS.get(base)
    if hf is None or param not in ("weight", "bias"):
        return None
    return f"{hf.format(layer)}.{param}"


def gguf_name(hf: str) -> Optional[str]:
    """The inverse of `hf_name`."""
    inverse = {v: k for k, v in LLAMA_TENSORS.items()}
    base, _, param = hf.rpartition(".")
    parts = base.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        g = inverse.get("model.layers.{}." + ".".join(parts[3:]))
        return None if g is None else f"{g.format(parts[2])}.{param}"
    g = inverse.get(base)
    return None if g is None else f"{g}.{param}"


def rope_rows(hf: str, config_heads: tuple[int, int]) -> Optional[int]:
    """The number of heads whose rows llama.cpp reorders for RoPE (q: n_head, k: n_kv), else None."""
    if hf.endswith("self_attn.q_proj.weight"):
        return config_heads[0]
    if hf.endswith("self_attn.k_proj.weight"):
        return config_heads[1]
    return None


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rows (per head: first halves, then second halves of the rotary pairs) -> llama.cpp's (pairs adjacent)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute`: llama.cpp's q/k rows back to HF's."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
