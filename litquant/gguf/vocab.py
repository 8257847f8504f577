"""GGUF tokenizer metadata (`tokenizer.ggml.*`) <-> the tokenizer files of a checkpoint.

Import: a gpt2-style byte-level BPE (tokens + merges) or a llama SentencePiece vocabulary (tokens + scores, byte
fallback) becomes a `tokenizer.json` that splits text the way llama.cpp does for the file's `tokenizer.ggml.pre`; the
chat template, bos/eos and add_bos go to tokenizer_config.json and generation_config.json. Export reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from litquant.errors import UserError

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp's pre-tokenizer splits, by `tokenizer.ggml.pre` (llama-vocab.cpp): the regexes, applied in turn
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_SPLITS = {
    "gpt-2": [_GPT2],
    "mpt": [_GPT2],
    "olmo": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "refact": [r"\p{N}", _GPT2],
    "codeshell": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
    "llama-v3": [_LLAMA3],
    "smaug-bpe": [_LLAMA3],
    "dbrx": [_LLAMA3],
    "falcon3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "stablelm2": [_QWEN2],
    "deepseek-r1-qwen": [_QWEN2],
}


# ------------------------------------------------------------------------------------------------
# import
# ------------------------------------------------------------------------------------------------


def write_tokenizer(meta: dict[str, Any], out_dir: Path, source: str) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json from a GGUF's tokenizer metadata."""
    from litquant.tokenizer import _write_json_atomic

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model not in ("gpt2", "llama") or not tokens:
        raise UserError(
            f"{source}: GGUF tokenizer {model!r} is not supported (gpt2-style BPE and llama SentencePiece are)"
        )
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    tk = _bpe(meta, tokens, source) if model == "gpt2" else _sentencepiece(meta, tokens, types)
    from tokenizers import AddedToken

    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    user = [
        AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED
    ]
    tk.add_special_tokens(special)
    tk.add_tokens(user)
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise UserError(f"{source}: the GGUF vocabulary has duplicate tokens")
    tmp = out_dir / "tokenizer.json.tmp"
    tk.save(str(tmp))
    tmp.replace(out_dir / "tokenizer.json")

    def tok(key: str) -> Optional[str]:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        add_bos = model == "llama"  # llama.cpp's default for a SentencePiece vocabulary that does not say
    cfg = {
        "bos_token": tok("bos"),
        "eos_token": tok("eos"),
        "unk_token": tok("unknown"),
        "pad_token": tok("padding"),
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    cfg.update(
        add_bos_token=bool(add_bos), add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False))
    )
    if model == "llama":
        cfg["add_space_prefix"] = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if meta.get("tokenizer.ggml.pre"):
        cfg["gguf_pre_tokenizer"] = meta["tokenizer.ggml.pre"]  # kept so that an export writes it back
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    _write_json_atomic(out_dir / "tokenizer_config.json", cfg)
    gen = {f"{k}_token_id": int(meta[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos")
           if meta.get(f"tokenizer.ggml.{k}_token_id") is not None}  # fmt: skip
    _write_json_atomic(out_dir / "generation_config.json", gen)


def _bpe(meta: dict[str, Any], tokens: list[str], source: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre") or "gpt-2"
    splits = PRE_SPLITS.get(pre)
    if splits is None:
        print(
            f"{source}: pre-tokenizer {pre!r} unknown to litquant; splitting text as GPT-2 does", flush=True
        )
        splits = [_GPT2]
    if splits == [_GPT2]:  # what HF writes for GPT-2 itself
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif splits == [r"\p{N}", _GPT2]:  # SmolLM's and StarCoder's tokenizer.json
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False, use_regex=True)]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tk.decoder = decoders.ByteLevel()
    return tk


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece BPE vocabulary implies: every split of a normal token into two normal tokens,
    ranked by the merged token's score (SentencePiece merges the best-scoring pair first)."""
    vocab = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (NORMAL, USER_DEFINED)}
    found = []
    for t, i in vocab.items():
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                found.append((-scores[i], i, vocab[left], vocab[right], left, right))
    found.sort()
    return [(f[4], f[5]) for f in found]


def _sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = list(meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    merges = sentencepiece_merges(tokens, scores, types)
    tk = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[int(unk)] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(steps)
    return tk


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


def tokenizer_metadata(checkpoint_dir: Path) -> dict[str, Any]:
    """`tokenizer.ggml.*` and `tokenizer.chat_template` values for a checkpoint's tokenizer files."""
    from litquant.tokenizer import Tokenizer, _read_json

    tok = Tokenizer(checkpoint_dir)
    cfg = _read_json(checkpoint_dir / "tokenizer_config.json")
    if tok.backend == "sentencepiece":
        sp = tok._sp
        n = sp.vocab_size()
        tokens = [sp.id_to_piece(i) for i in range(n)]
        scores = [float(sp.get_score(i)) for i in range(n)]
        types = [
            UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
            else UNUSED if sp.is_unused(i) else NORMAL
            for i in range(n)
        ]  # fmt: skip
        meta: dict[str, Any] = {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types}
        if sp.unk_id() >= 0:
            meta["unknown_token_id"] = sp.unk_id()
    else:
        data = json.loads((checkpoint_dir / "tokenizer.json").read_text())
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise UserError(
                f"{checkpoint_dir}/tokenizer.json: a {model.get('type')} tokenizer cannot go into GGUF"
            )
        n = tok.vocab_size
        tokens = [None] * n
        for t, i in model["vocab"].items():
            tokens[i] = t
        types = [NORMAL] * n
        for a in data.get("added_tokens") or ():
            tokens[a["id"]] = a["content"]
            types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
        if any(t is None for t in tokens):
            raise UserError(f"{checkpoint_dir}/tokenizer.json: the vocabulary has gaps")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
        if model.get("byte_fallback"):  # a SentencePiece vocabulary in tokenizer.json form
            types = [BYTE if t.startswith("<0x") and len(t) == 6 else k for t, k in zip(tokens, types)]
            meta = {
                "model": "llama",
                "tokens": tokens,
                "token_type": types,
                "scores": _scores_from(merges, tokens),
            }
            if model.get("unk_token") in model["vocab"]:
                types[model["vocab"][model["unk_token"]]] = UNKNOWN
                meta["unknown_token_id"] = model["vocab"][model["unk_token"]]
            meta["add_space_prefix"] = bool(cfg.get("add_space_prefix", True))
        else:
            meta = {"model": "gpt2", "tokens": tokens, "token_type": types, "merges": merges}
            meta["pre"] = cfg.get("gguf_pre_tokenizer") or _pre_name(
                data.get("pre_tokenizer"), checkpoint_dir
            )
    if tok.bos_id is not None:
        meta["bos_token_id"] = tok.bos_id
    if tok.eos_id is not None:
        meta["eos_token_id"] = tok.eos_id
    pad = tok._special_id(cfg.get("pad_token")) if cfg.get("pad_token") is not None else None
    if pad is not None:
        meta["padding_token_id"] = pad
    meta["add_bos_token"] = bool(tok.use_bos)
    meta["add_eos_token"] = bool(cfg.get("add_eos_token", False))
    out = {f"tokenizer.ggml.{k}": v for k, v in meta.items()}
    template = cfg.get("chat_template")
    if isinstance(template, str):
        out["tokenizer.chat_template"] = template
    return out


def _scores_from(merges: list[str], tokens: list[str]) -> list[float]:
    """SentencePiece scores for a BPE vocabulary: a merged token scores by its merge's rank, others by their id."""
    rank = {"".join(m.split(" ", 1)): r for r, m in enumerate(merges)}
    return [-float(rank[t]) if t in rank else -float(len(merges) + i) for i, t in enumerate(tokens)]


def _pre_name(pre: Optional[dict], checkpoint_dir: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer, recognised by its structure."""
    steps = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds[:1] == ["Split"] and kinds[-1:] == ["ByteLevel"]:
        regex = [s.get("pattern", {}).get("Regex") for s in steps[:-1]]
        for name, splits in PRE_SPLITS.items():
            if regex == splits or (
                name == "llama-bpe" and regex and "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in regex[0]
            ):
                return name
    print(
        f"{checkpoint_dir}/tokenizer.json: pre-tokenizer not recognised; llama.cpp will split as GPT-2",
        flush=True,
    )
    return "gpt-2"
