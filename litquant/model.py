"""The GPT model: one file for Llama 2/3, Mistral, Falcon, Pythia/GPT-NeoX and Phi.

`GPT(config)` builds it (`litquant.checkpoint.build_model` / `load_model` add the precision plugin and the weights).
Family differences are `Config` switches; Linears are plain `nn.Linear`s, which quantization plugins swap.
Parameter names and the fused qkv layout: docs/ARCHITECTURE.md, "Model".
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litquant.config import Config


class GPT(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=make_norm(config),
            )
        )
        self._max_seq_length = config.block_size
        # RoPE tables and the mask are derived state: built lazily on the input's device (the model may
        # have been created on the meta device and filled later).
        self.rope_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.mask_cache: Optional[torch.Tensor] = None

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if value > self.config.block_size:
            raise ValueError(
                f"max_seq_length {value} exceeds the model's block_size {self.config.block_size}"
            )
        self._max_seq_length = value
        self.rope_cache = None
        self.mask_cache = None

    def _rope(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_cache is None or self.rope_cache[0].device != device:
            self.rope_cache = build_rope_cache(
                self._max_seq_length,
                self.config.rope_n_elem,
                self.config.rope_base,
                device,
                self.config.rope_adjustments,
            )
        return self.rope_cache

    def _mask(self, device: torch.device) -> torch.Tensor:
        if self.mask_cache is None or self.mask_cache.device != device:
            self.mask_cache = build_mask_cache(self._max_seq_length, self.config.sliding_window_size, device)
        return self.mask_cache

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        input_pos_maxp1: Optional[int] = None,
        rows: Optional[slice] = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids. Without `input_pos`: a plain causal forward over positions 0..T-1.

        With `input_pos`, the tokens' positions, read and written through the KV cache: (T,) when every row is at
        the same positions, or (B, T), one row of positions per sequence (batched decoding). `rows` picks the KV
        cache rows these B sequences own (default: the first B). `input_pos_maxp1` (max position + 1, a Python
        int) lets attention skip the unused cache tail."""
        B, T = idx.shape
        if T > self._max_seq_length:
            raise ValueError(f"sequence of length {T} exceeds max_seq_length {self._max_seq_length}")
        cos, sin = self._rope(idx.device)
        if input_pos is not None:
            cos, sin = cos[input_pos], sin[input_pos]  # (T, n) or (B, T, n)
            mask = self._mask(idx.device)[input_pos]  # (T, max_seq) or (B, T, max_seq)
            if input_pos_maxp1 is not None:
                mask = mask[..., :input_pos_maxp1]
            if input_pos.dim() == 2:  # per-sequence positions: broadcast over heads
                cos, sin, mask = cos.unsqueeze(1), sin.unsqueeze(1), mask.unsqueeze(1)
            cache = _CacheAccess(input_pos, input_pos_maxp1, rows if rows is not None else slice(0, B))
        else:
            cos, sin = cos[:T], sin[:T]
            w = self.config.sliding_window_size
            # built per call at length T: the cached mask is sized for max_seq_length, which may be huge
            mask = build_mask_cache(T, w, idx.device) if (w is not None and T > w) else None
            cache = None
        x = self.transformer.wte(idx)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cos, sin, mask, cache)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)  # (B, T, padded_vocab_size)

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        if max_seq_length is not None and max_seq_length != self._max_seq_length:
            self.max_seq_length = max_seq_length
        device = device or self.transformer.wte.weight.device
        dtype = dtype or self.transformer.wte.weight.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(
                batch_size,
                self.config.n_query_groups,
                self._max_seq_length,
                self.config.head_size,
                device,
                dtype,
            )

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def move_kv_rows(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of KV cache row `src` into row `dst` (batch compaction)."""
        for block in self.transformer.h:
            block.attn.kv_cache.move(src, dst, length)

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style init used by `pretrain` (and by --random_init benchmarks)."""
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif "norm" in name or "ln_f" in name:
                nn.init.ones_(p)
            elif name.endswith("proj.weight"):  # residual projections scaled down with depth
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)


class Block(nn.Module):
    def __init__(self, config: Config, block_idx: int) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = (
            None if (config.parallel_residual and config.shared_attention_norm) else make_norm(config)
        )
        self.mlp = LLaMAMLP(config) if config.mlp_class_name == "LLaMAMLP" else GptNeoxMLP(config)
        self.config = config

    def forward(self, x, cos, sin, mask, cache):
        x_normed = self.norm_1(x)
        h = self.attn(x_normed, cos, sin, mask, cache)
        if self.config.parallel_residual:
            m = self.mlp(x_normed if self.norm_2 is None else self.norm_2(x))
            return x + h + m
        x = x + h
        return x + self.mlp(self.norm_2(x))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        hs, nh, ng = config.head_size, config.n_head, config.n_query_groups
        self.qkv = nn.Linear(config.n_embd, (nh + 2 * ng) * hs, bias=config.bias)
        self.proj = nn.Linear(nh * hs, config.n_embd, bias=config.bias)
        self.kv_cache: Optional[KVCache] = None
        self.config = config

    def forward(self, x, cos, sin, mask, cache: Optional[_CacheAccess]):
        B, T, _ = x.shape
        hs, nh, ng, n_rope = (
            self.config.head_size,
            self.config.n_head,
            self.config.n_query_groups,
            self.config.rope_n_elem,
        )
        q, k, v = self.qkv(x).split((nh * hs, ng * hs, ng * hs), dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, ng, hs).transpose(1, 2)  # (B, ng, T, hs)
        v = v.view(B, T, ng, hs).transpose(1, 2)
        if n_rope == hs:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        elif n_rope > 0:  # partial rotary (Pythia, Phi): the rest of each head passes through
            q = torch.cat((apply_rope(q[..., :n_rope], cos, sin), q[..., n_rope:]), dim=-1)
            k = torch.cat((apply_rope(k[..., :n_rope], cos, sin), k[..., n_rope:]), dim=-1)
        if cache is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.set_kv_cache() first")
            k, v = self.kv_cache(cache, k, v)  # (B, ng, max_seq or input_pos_maxp1, hs)
        # grouped / multi-query attention: each key/value head serves nh // ng query heads (no copies)
        scale, gqa = 1.0 / math.sqrt(hs), ng != nh
        if mask is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=T > 1 or cache is None, scale=scale, enable_gqa=gqa
            )
        elif T == 1 and q.device.type == "cpu":
            y = decode_attention(q, k, v, mask, scale)  # SDPA's CPU kernels cost 2-9x more for one query
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)
        return self.proj(y)


def decode_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """Attention of one query position per sequence over the cached keys, in fp32: q (B, nh, 1, hs), k/v
    (B, ng, L, hs), mask (..., 1, L) True where a key is visible. Each key head serves nh // ng query heads."""
    B, nh, _, hs = q.shape
    ng = k.shape[1]
    qg = q.reshape(B, ng, nh // ng, hs).float()  # (B, ng, nh/ng, hs)
    s = (qg @ k.float().transpose(-1, -2)) * scale  # (B, ng, nh/ng, L)
    s = s.masked_fill(~mask, torch.finfo(torch.float32).min)
    y = s.softmax(dim=-1) @ v.float()  # (B, ng, nh/ng, hs)
    return y.reshape(B, nh, 1, hs).to(q.dtype)


class GptNeoxMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class LLaMAMLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)  # gate
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)  # up
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # normalise in fp32, like HF
        return self.weight * x.to(dtype)


def make_norm(config: Config) -> nn.Module:
    if config.norm_class_name == "RMSNorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


class _CacheAccess(NamedTuple):
    """Where a forward reads and writes the KV cache: positions, their max + 1, and the cache rows."""

    input_pos: torch.Tensor
    maxp1: Optional[int]
    rows: slice


class KVCache(nn.Module):
    """Preallocated keys/values (B, groups, max_seq, head_size): static shapes, friendly to torch.compile. Row b
    holds sequence b's keys at their positions; rows are independent, so sequences of a batch may be at
    different positions."""

    def __init__(self, B: int, ng: int, max_seq: int, hs: int, device, dtype) -> None:
        super().__init__()
        shape = (B, ng, max_seq, hs)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def forward(
        self, at: _CacheAccess, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = self.k.to(k.dtype)
        self.v = self.v.to(v.dtype)
        ck, cv = self.k[at.rows], self.v[at.rows]  # views
        if at.input_pos.dim() == 1:
            ck.index_copy_(2, at.input_pos, k)
            cv.index_copy_(2, at.input_pos, v)
        else:  # (B, T) positions: row b's tokens go to its own positions
            b = torch.arange(k.size(0), device=k.device).unsqueeze(1)
            ck[b, :, at.input_pos] = k.transpose(1, 2)
            cv[b, :, at.input_pos] = v.transpose(1, 2)
        if at.maxp1 is not None:
            ck, cv = ck[:, :, : at.maxp1], cv[:, :, : at.maxp1]
        return ck, cv

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


def build_rope_cache(
    seq_len: int, n_elem: int, base: int, device: torch.device, adjustments: Optional[dict] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seq_len, n_elem) in fp32, "rotate half" convention (as HF Llama/NeoX/Falcon/Phi)."""
    if n_elem == 0:
        empty = torch.zeros(seq_len, 0, device=device)
        return empty, empty
    inv_freq = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device, dtype=torch.float32) / n_elem))
    if adjustments is not None:  # Llama 3.1: stretch low frequencies, keep high ones, blend between
        factor = adjustments["factor"]
        low, high = adjustments["low_freq_factor"], adjustments["high_freq_factor"]
        orig = adjustments["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((orig / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= orig / low) & (wavelen >= orig / high)
        inv_freq = torch.where(is_mid, mid, scaled)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq).repeat(1, 2)  # (T, n_elem)
    return torch.cos(freqs), torch.sin(freqs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x.float() * cos + rotated.float() * sin
    return out.to(x.dtype)


def build_mask_cache(max_seq: int, sliding_window: Optional[int], device: torch.device) -> torch.Tensor:
    """(max_seq, max_seq) bool: True where query i may attend key j."""
    i = torch.arange(max_seq, device=device).unsqueeze(1)
    j = torch.arange(max_seq, device=device).unsqueeze(0)
    mask = j <= i
    if sliding_window is not None:
        mask &= (i - j) < sliding_window
    return mask
