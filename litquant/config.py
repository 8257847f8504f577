"""The model Config: one dataclass, one table of named configs.

Family differences (Llama, Mistral, Falcon, Pythia/GPT-NeoX, Phi) are switches here, not subclasses
in the model. `Config.from_name`, `Config.from_file`, `Config.from_checkpoint` and
`Config.from_hf_config` are the only ways a job gets one.
"""

from __future__ import annotations

import difflib
from copy import deepcopy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from litquant.errors import UserError, read_json

CONFIG_FILE = "model_config.yaml"
WEIGHTS_FILE = "lit_model.safetensors"  # the full-precision weights beside it


@dataclass
class Config:
    name: str = ""
    hf_name: str = ""  # the Hugging Face repo id it mirrors, if any
    block_size: int = 4096  # longest context the model was trained for
    vocab_size: int = 50254  # tokenizer size
    padded_vocab_size: Optional[int] = None  # embedding rows; padded for fast matmuls
    padding_multiple: int = 512
    n_layer: int = 16
    n_head: int = 32
    n_embd: int = 4096
    head_size: Optional[int] = None  # defaults to n_embd // n_head
    n_query_groups: Optional[int] = None  # = n_head: MHA, 1: MQA, between: GQA
    rotary_percentage: float = 0.25  # fraction of each head that gets RoPE (NeoX/Phi: partial)
    rope_base: int = 10000
    rope_adjustments: Optional[dict] = None  # Llama 3.1 frequency scaling
    parallel_residual: bool = True  # x + attn(norm(x)) + mlp(norm(x)) (NeoX, Falcon, Phi)
    shared_attention_norm: bool = False  # parallel residual with one norm for both branches
    bias: bool = True  # bias on every Linear of the blocks
    lm_head_bias: bool = False
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP"] = "GptNeoxMLP"
    gelu_approximate: Literal["none", "tanh"] = "none"
    intermediate_size: Optional[int] = None
    sliding_window_size: Optional[int] = None  # Mistral: attend to the last W tokens only
    hf_model_type: str = ""  # "llama", "mistral", "falcon", "gpt_neox", "phi" (for HF export)
    extra_hf: dict = field(default_factory=dict)  # HF config fields we must give back on export

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.hf_name.split("/")[-1]
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_size = self.n_embd // self.n_head
        if self.padded_vocab_size is None:
            self.padded_vocab_size = find_multiple(self.vocab_size, self.padding_multiple)
        else:
            self.vocab_size = min(self.vocab_size, self.padded_vocab_size)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.n_head % self.n_query_groups:
            raise UserError(f"n_head={self.n_head} is not divisible by n_query_groups={self.n_query_groups}")
        if self.intermediate_size is None:
            if self.mlp_class_name == "LLaMAMLP":
                raise UserError(f"config {self.name!r}: LLaMAMLP needs intermediate_size")
            self.intermediate_size = 4 * self.n_embd
        self.rope_n_elem = int(self.rotary_percentage * self.head_size)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        match = name_to_config.get(name)
        if match is None:
            # accept "meta-llama/Llama-2-7b-hf" as well as "Llama-2-7b-hf"
            match = next((c for c in configs if c["hf_name"] == name), None)
        if match is None:
            close = difflib.get_close_matches(name.rpartition("/")[2], list(name_to_config), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(
                f"unknown model name {name!r}; {hint}known names: {', '.join(sorted(name_to_config))}"
            )
        kwargs = deepcopy(match)
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"rope_n_elem"})
        if unknown:
            raise UserError(f"{source}: unknown config keys {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: expected a mapping of config keys")
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "Config":
        checkpoint_dir = Path(checkpoint_dir)
        if (checkpoint_dir / CONFIG_FILE).is_file():
            return cls.from_file(checkpoint_dir / CONFIG_FILE)
        if (checkpoint_dir / "config.json").is_file():
            return cls.from_hf_config(read_json(checkpoint_dir / "config.json"))
        if checkpoint_dir.name in name_to_config:
            return cls.from_name(checkpoint_dir.name)
        raise UserError(f"no {CONFIG_FILE} in {checkpoint_dir} (is it a litquant checkpoint directory?)")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, checkpoint_dir: str | Path) -> None:
        from litquant.io import atomic_write_text

        atomic_write_text(Path(checkpoint_dir) / CONFIG_FILE, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Config":
        """Build a Config from a Hugging Face `config.json` (llama, mistral, falcon, gpt_neox, phi)."""
        mt = hf.get("model_type")
        name = hf.get("_name_or_path", "") or mt or ""
        common = dict(
            hf_name=name,
            name=Path(name).name if name else str(mt),
            vocab_size=hf["vocab_size"],
            padded_vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"] if "num_hidden_layers" in hf else hf.get("n_layer"),
            hf_model_type=mt,
        )
        if mt in ("llama", "mistral"):
            rope_scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or None
            adj = None
            if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3":
                adj = {
                    k: rope_scaling[k]
                    for k in (
                        "factor",
                        "low_freq_factor",
                        "high_freq_factor",
                        "original_max_position_embeddings",
                    )
                }
            rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000))
            n_head = hf["num_attention_heads"]
            head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
            return cls(
                **common,
                block_size=hf.get("max_position_embeddings", 4096),
                n_head=n_head,
                n_embd=hf["hidden_size"],
                head_size=head_dim,
                n_query_groups=hf.get("num_key_value_heads") or n_head,
                rotary_percentage=1.0,
                rope_base=int(rope_theta),
                rope_adjustments=adj,
                parallel_residual=False,
                bias=bool(hf.get("attention_bias", False)),
                norm_class_name="RMSNorm",
                norm_eps=hf.get("rms_norm_eps", 1e-5),
                mlp_class_name="LLaMAMLP",
                intermediate_size=hf["intermediate_size"],
                sliding_window_size=hf.get("sliding_window") if mt == "mistral" else None,
                extra_hf={
                    k: hf[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if k in hf
                },
            )
        if mt == "falcon":
            n_head = hf.get("num_attention_heads", hf.get("n_head"))
            new_arch = hf.get("new_decoder_architecture", False)
            if new_arch:
                # n_head_kv: pre-port configs
                groups = hf.get("num_kv_heads") or hf.get("n_head_kv") or n_head
            else:
                groups = 1 if hf.get("multi_query", True) else n_head
            if hf.get("alibi"):
                raise UserError("falcon checkpoints with alibi are not supported (only rotary Falcon models)")
            return cls(
                **common,
                block_size=hf.get("max_position_embeddings", 2048),
                n_head=n_head,
                n_embd=hf["hidden_size"],
                n_query_groups=groups,
                rotary_percentage=1.0,
                rope_base=int(_hf_rope(hf, "rope_theta", 10000)),
                # the new decoder is always parallel; it has one norm per branch unless num_ln_in_parallel_attn=1
                parallel_residual=True if new_arch else hf.get("parallel_attn", True),
                shared_attention_norm=hf.get("num_ln_in_parallel_attn") == 1 if new_arch else True,
                bias=hf.get("bias", False),
                norm_class_name="LayerNorm",
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                mlp_class_name="GptNeoxMLP",
                intermediate_size=hf.get("ffn_hidden_size") or 4 * hf["hidden_size"],
                extra_hf={
                    "new_decoder_architecture": new_arch,
                    "multi_query": hf.get("multi_query", True),
                    **{k: hf[k] for k in ("bos_token_id", "eos_token_id") if k in hf},
                },
            )
        if mt == "gpt_neox":
            act = hf.get("hidden_act", "gelu")
            if act not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
                raise UserError(f"gpt_neox hidden_act {act!r} is not supported")
            return cls(
                **common,
                block_size=hf.get("max_position_embeddings", 2048),
                n_head=hf["num_attention_heads"],
                n_embd=hf["hidden_size"],
                rotary_percentage=_hf_rope(hf, "partial_rotary_factor", 0.25, "rotary_pct"),
                rope_base=int(_hf_rope(hf, "rope_theta", 10000, "rotary_emb_base")),
                parallel_residual=hf.get("use_parallel_residual", True),
                shared_attention_norm=False,
                bias=True,
                norm_class_name="LayerNorm",
                norm_eps=hf.get("layer_norm_eps", 1e-5),
                mlp_class_name="GptNeoxMLP",
                gelu_approximate="none" if act == "gelu" else "tanh",
                intermediate_size=hf["intermediate_size"],
                extra_hf={
                    k: hf[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if k in hf
                },
            )
        if mt == "phi":
            n_head = hf["num_attention_heads"]
            groups = hf.get("num_key_value_heads") or n_head
            return cls(
                **common,
                block_size=hf.get("max_position_embeddings", 2048),
                n_head=n_head,
                n_embd=hf["hidden_size"],
                n_query_groups=groups,
                rotary_percentage=_hf_rope(hf, "partial_rotary_factor", 0.5),
                rope_base=int(_hf_rope(hf, "rope_theta", 10000)),
                parallel_residual=True,
                shared_attention_norm=True,
                bias=True,
                lm_head_bias=True,
                norm_class_name="LayerNorm",
                norm_eps=hf.get("layer_norm_eps", 1e-5),
                mlp_class_name="GptNeoxMLP",
                gelu_approximate="tanh" if hf.get("hidden_act", "gelu_new") != "gelu" else "none",
                intermediate_size=hf["intermediate_size"],
                extra_hf={
                    k: hf[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if k in hf
                },
            )
        raise UserError(
            f"unsupported Hugging Face model_type {mt!r} (supported: llama, mistral, falcon, gpt_neox, phi)"
        )


def _hf_rope(hf: dict, key: str, default: Any, *legacy: str) -> Any:
    """A RoPE field of an HF config.json: top level (maybe under a legacy name) in transformers 4 files,
    nested in `rope_parameters` in transformers 5 files."""
    for k in (key, *legacy):
        if hf.get(k) is not None:
            return hf[k]
    return (hf.get("rope_parameters") or {}).get(key, default)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def n_params(config: Config, include_embeddings: bool = True) -> int:
    """Parameter count from the config alone (used by `estimate` and by tests against the model)."""
    C, hs = config.n_embd, config.head_size
    qkv_out = (config.n_head + 2 * config.n_query_groups) * hs
    attn = C * qkv_out + config.n_head * hs * C + (qkv_out + C if config.bias else 0)
    if config.mlp_class_name == "LLaMAMLP":
        mlp = 3 * C * config.intermediate_size + (2 * config.intermediate_size + C if config.bias else 0)
    else:
        mlp = 2 * C * config.intermediate_size + (config.intermediate_size + C if config.bias else 0)
    norm = C * (1 if config.norm_class_name == "RMSNorm" else 2)
    n_norms = 1 if (config.parallel_residual and config.shared_attention_norm) else 2
    block = attn + mlp + n_norms * norm
    total = config.n_layer * block + norm  # + ln_f
    if include_embeddings:
        total += 2 * config.padded_vocab_size * C + (config.padded_vocab_size if config.lm_head_bias else 0)
    return total


# ------------------------------------------------------------------------------------------------
# Named configs. Values mirror each model's Hugging Face config.json.
# ------------------------------------------------------------------------------------------------

_llama = dict(
    rotary_percentage=1.0,
    parallel_residual=False,
    bias=False,
    norm_class_name="RMSNorm",
    mlp_class_name="LLaMAMLP",
    hf_model_type="llama",
)
configs: list[dict] = []

for size, (n_layer, n_head, n_embd, groups, inter) in {
    "7b": (32, 32, 4096, 32, 11008),
    "13b": (40, 40, 5120, 40, 13824),
    "70b": (80, 64, 8192, 8, 28672),
}.items():
    for kind in ("hf", "chat-hf"):
        configs.append(
            dict(
                _llama,
                hf_name=f"meta-llama/Llama-2-{size}-{kind}",
                block_size=4096,
                vocab_size=32000,
                padded_vocab_size=32000,
                n_layer=n_layer,
                n_head=n_head,
                n_embd=n_embd,
                n_query_groups=groups,
                intermediate_size=inter,
                norm_eps=1e-5,
            )
        )

for name, block, adj in (
    ("Meta-Llama-3-8B", 8192, None),
    ("Meta-Llama-3-8B-Instruct", 8192, None),
    (
        "Llama-3.1-8B",
        131072,
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    (
        "Llama-3.1-8B-Instruct",
        131072,
        dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
):
    configs.append(
        dict(
            _llama,
            hf_name=f"meta-llama/{name}",
            block_size=block,
            vocab_size=128000,
            padded_vocab_size=128256,
            n_layer=32,
            n_head=32,
            n_embd=4096,
            n_query_groups=8,
            intermediate_size=14336,
            rope_base=500000,
            rope_adjustments=adj,
            norm_eps=1e-5,
        )
    )

_mistral = dict(
    _llama,
    hf_model_type="mistral",
    vocab_size=32000,
    padded_vocab_size=32000,
    n_layer=32,
    n_head=32,
    n_embd=4096,
    n_query_groups=8,
    intermediate_size=14336,
    norm_eps=1e-5,
)
configs += [
    dict(_mistral, hf_name="mistralai/Mistral-7B-v0.1", block_size=4096, sliding_window_size=4096),
    dict(_mistral, hf_name="mistralai/Mistral-7B-Instruct-v0.1", block_size=4096, sliding_window_size=4096),
    dict(_mistral, hf_name="mistralai/Mistral-7B-Instruct-v0.2", block_size=32768, rope_base=1000000),
]

for name in ("TinyLlama-1.1B-Chat-v1.0", "TinyLlama-1.1B-intermediate-step-1431k-3T"):
    configs.append(
        dict(
            _llama,
            hf_name=f"TinyLlama/{name}",
            block_size=2048,
            vocab_size=32000,
            padded_vocab_size=32000,
            n_layer=22,
            n_head=32,
            n_embd=2048,
            n_query_groups=4,
            intermediate_size=5632,
            norm_eps=1e-5,
        )
    )

_falcon = dict(
    rotary_percentage=1.0,
    parallel_residual=True,
    bias=False,
    norm_class_name="LayerNorm",
    mlp_class_name="GptNeoxMLP",
    hf_model_type="falcon",
    block_size=2048,
    vocab_size=65024,
    padded_vocab_size=65024,
)
for kind in ("", "-instruct"):
    configs.append(
        dict(
            _falcon,
            hf_name=f"tiiuae/falcon-7b{kind}",
            n_layer=32,
            n_head=71,
            n_embd=4544,
            n_query_groups=1,
            shared_attention_norm=True,
            intermediate_size=18176,
            extra_hf={"new_decoder_architecture": False, "multi_query": True},
        )
    )
    configs.append(
        dict(
            _falcon,
            hf_name=f"tiiuae/falcon-40b{kind}",
            n_layer=60,
            n_head=128,
            n_embd=8192,
            n_query_groups=8,
            shared_attention_norm=False,
            intermediate_size=32768,
            extra_hf={"new_decoder_architecture": True, "multi_query": True},
        )
    )

for size, (n_layer, n_embd, n_head, padded) in {
    "70m": (6, 512, 8, 50304),
    "160m": (12, 768, 12, 50304),
    "410m": (24, 1024, 16, 50304),
    "1b": (16, 2048, 8, 50304),
    "1.4b": (24, 2048, 16, 50304),
    "2.8b": (32, 2560, 32, 50304),
    "6.9b": (32, 4096, 32, 50432),
    "12b": (36, 5120, 40, 50688),
}.items():
    configs.append(
        dict(
            hf_name=f"EleutherAI/pythia-{size}",
            hf_model_type="gpt_neox",
            block_size=2048,
            vocab_size=50254,
            padded_vocab_size=padded,
            n_layer=n_layer,
            n_embd=n_embd,
            n_head=n_head,
            rotary_percentage=0.25,
            parallel_residual=True,
            bias=True,
            norm_class_name="LayerNorm",
            mlp_class_name="GptNeoxMLP",
            intermediate_size=4 * n_embd,
        )
    )

configs.append(
    dict(
        hf_name="microsoft/phi-2",
        hf_model_type="phi",
        block_size=2048,
        vocab_size=50257,
        padded_vocab_size=51200,
        n_layer=32,
        n_head=32,
        n_embd=2560,
        rotary_percentage=0.4,
        parallel_residual=True,
        shared_attention_norm=True,
        bias=True,
        lm_head_bias=True,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        gelu_approximate="tanh",
        intermediate_size=10240,
    )
)

# The bundled model (trained by `litquant pretrain`, shipped in checkpoints/litquant-tiny) and test configs.
# Hidden sizes are multiples of 128 so group-wise quantization (group 64/128) fits every Linear.
configs += [
    dict(
        _llama,
        name="litquant-tiny",
        block_size=256,
        vocab_size=4096,
        padded_vocab_size=4096,
        n_layer=4,
        n_head=4,
        n_embd=256,
        n_query_groups=2,
        intermediate_size=768,
        norm_eps=1e-5,
    ),
    dict(
        _llama,
        name="tiny-llama-test",
        block_size=64,
        vocab_size=256,
        padded_vocab_size=256,
        n_layer=2,
        n_head=4,
        n_embd=128,
        n_query_groups=2,
        intermediate_size=256,
    ),
    dict(
        name="tiny-pythia-test",
        hf_model_type="gpt_neox",
        block_size=64,
        vocab_size=256,
        padded_vocab_size=256,
        n_layer=2,
        n_head=4,
        n_embd=128,
        rotary_percentage=0.25,
        parallel_residual=True,
        bias=True,
        norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP",
        intermediate_size=512,
    ),
]

for c in configs:
    c.setdefault("hf_name", "")
    c.setdefault("name", c["hf_name"].split("/")[-1])
name_to_config: dict[str, dict] = {c["name"]: c for c in configs}
