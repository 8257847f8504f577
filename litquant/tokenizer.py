"""The tokenizer of a checkpoint directory: HF `tokenizer.json` or SentencePiece `tokenizer.model`.

One class hides the two backends. BOS/EOS come from the small JSON files next to the weights (`tokenizer_config.json`,
`generation_config.json`, `config.json`), because the tokenizer files alone do not say which token starts a sequence
or which tokens end a generation. `train_bpe_tokenizer` makes the byte-level BPE of the bundled tiny model:
byte-level so every string (code, any unicode) round-trips exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from litquant.errors import UserError, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class Tokenizer:
    """Text <-> token ids for the checkpoint in `checkpoint_dir`.

    Attributes: `bos_id`, `eos_id` (None when the checkpoint defines none), `stop_ids` (every id that ends a
    generation: eos plus any extra eos ids of generation_config.json, e.g. Llama 3's <|eot_id|>),
    `vocab_size`, `use_bos` (whether `encode` prepends BOS by default), `backend` ("huggingface" or
    "sentencepiece").
    """

    def __init__(self, checkpoint_dir: Union[Path, str]) -> None:
        checkpoint_dir = Path(checkpoint_dir)
        looked_for = " or ".join(TOKENIZER_FILES)
        if not checkpoint_dir.is_dir():
            raise UserError(
                f"tokenizer: directory {str(checkpoint_dir)!r} does not exist (looked for {looked_for})"
            )
        self.checkpoint_dir = checkpoint_dir

        # tokenizer.json wins: it carries the exact pre-tokenizer, added tokens and decoder that HF uses
        if (vocab_file := checkpoint_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(vocab_file))
            except Exception as e:
                raise UserError(f"tokenizer: cannot read {vocab_file}: {str(e).splitlines()[0]}") from None
            self.backend = "huggingface"
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        elif (vocab_file := checkpoint_dir / "tokenizer.model").is_file():
            from sentencepiece import SentencePieceProcessor

            try:
                self._sp = SentencePieceProcessor(model_file=str(vocab_file))
            except Exception as e:
                raise UserError(f"tokenizer: cannot read {vocab_file}: {str(e).splitlines()[0]}") from None
            self.backend = "sentencepiece"
            self.vocab_size = self._sp.vocab_size()
            # SentencePiece does not parse "<s>"/"</s>" written in the text (chat templates do that), so we
            # split on the control pieces ourselves, as HF's Llama tokenizers do
            controls = [self._sp.id_to_piece(i) for i in range(self.vocab_size) if self._sp.is_control(i)]
            self._sp_controls = {p: self._sp.piece_to_id(p) for p in controls if p}
            self._sp_split = (
                re.compile(
                    "("
                    + "|".join(re.escape(p) for p in sorted(self._sp_controls, key=len, reverse=True))
                    + ")"
                )
                if self._sp_controls
                else None
            )
        else:
            raise UserError(
                f"tokenizer: no tokenizer file in {str(checkpoint_dir)!r} (looked for {looked_for})"
            )

        tok_cfg = _read_json(checkpoint_dir / "tokenizer_config.json")
        gen_cfg = _read_json(checkpoint_dir / "generation_config.json")
        model_cfg = _read_json(checkpoint_dir / "config.json")

        # Token strings of tokenizer_config.json first (what HF's tokenizer uses), then the id fields.
        bos_ids, eos_ids = [], []
        for kind, ids in (("bos", bos_ids), ("eos", eos_ids)):
            ids.append(self._special_id(tok_cfg.get(f"{kind}_token")))
            ids += _ids(gen_cfg.get(f"{kind}_token_id")) + _ids(model_cfg.get(f"{kind}_token_id"))
        if self.backend == "sentencepiece":
            bos_ids.append(self._sp.bos_id() if self._sp.bos_id() >= 0 else None)
            eos_ids.append(self._sp.eos_id() if self._sp.eos_id() >= 0 else None)
        bos_ids = [i for i in bos_ids if i is not None and 0 <= i < self.vocab_size]
        eos_ids = [i for i in eos_ids if i is not None and 0 <= i < self.vocab_size]
        self.bos_id: Optional[int] = bos_ids[0] if bos_ids else None
        self.eos_id: Optional[int] = eos_ids[0] if eos_ids else None
        self.stop_ids: set[int] = set(eos_ids)

        add_bos = tok_cfg.get("add_bos_token")
        if add_bos is not None:
            self.use_bos = bool(add_bos) and self.bos_id is not None
        elif self.bos_id is None:
            self.use_bos = False
        elif self.backend == "sentencepiece":
            self.use_bos = True  # llama-style SentencePiece models are trained with BOS
        else:
            # Llama 3 style: no add_bos_token, the tokenizer.json post-processor adds BOS
            self.use_bos = self._post_processor_adds_bos()

    # ------------------------------------------------------------------ encode / decode

    def encode(
        self,
        text: str,
        bos: Optional[bool] = None,
        eos: bool = False,
        max_length: int = -1,
        device: Optional[Union[torch.device, str]] = None,
    ) -> torch.Tensor:
        """1-D long tensor of ids. `bos=None` follows the checkpoint (`use_bos`); `max_length > 0` truncates."""
        ids = self._encode_plain(text)
        if bos is None:
            bos = self.use_bos
        if bos:
            if self.bos_id is None:
                raise UserError(
                    f"tokenizer: a BOS token was asked for but {self.checkpoint_dir} defines none"
                )
            # the text itself may begin with the BOS string (chat templates write it): never add a second one
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise UserError(
                    f"tokenizer: an EOS token was asked for but {self.checkpoint_dir} defines none"
                )
            ids = ids + [self.eos_id]
        if max_length > 0:
            ids = ids[:max_length]
        return torch.tensor(ids, dtype=torch.long, device=device)

    def decode(self, ids: Union[torch.Tensor, Sequence[int]], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Special/control tokens (BOS, EOS, <|eot_id|>, ...) are left out unless asked for."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        if self.backend == "huggingface":
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            return self._sp.decode(ids)
        # SentencePiece always drops control pieces: put them back between decoded runs
        out, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                out += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(out + [self._sp.decode(run)])

    def decode_stream(self, ids: Iterable[int], context: Sequence[int] = ()) -> Iterator[str]:
        """Yield printable text as token ids arrive (pass the generator of new ids); see `StreamDecoder`."""
        decoder = self.stream_decoder(context)
        for i in ids:
            piece = decoder.step(int(i))
            if piece:
                yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def stream_decoder(self, context: Sequence[int] = ()) -> "StreamDecoder":
        """An incremental decoder for the ids that follow `context` (e.g. the prompt's last token, so the first new
        token keeps its leading space)."""
        return StreamDecoder(self, [int(i) for i in context])

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a single token string (e.g. "<|eot_id|>"), None when the vocabulary lacks it."""
        if self.backend == "huggingface":
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        if i == self._sp.unk_id() and self._sp.id_to_piece(i) != token:
            return None
        return i

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self.checkpoint_dir)!r}, backend={self.backend}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, stop_ids={sorted(self.stop_ids)}, "
            f"use_bos={self.use_bos})"
        )

    # ------------------------------------------------------------------ internals

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of `text` alone: no BOS/EOS added by the backend (we add them, once, in `encode`)."""
        if self.backend == "huggingface":
            return list(self._hf.encode(text, add_special_tokens=False).ids)
        if self._sp_split is None:
            return list(self._sp.encode(text))
        ids: list[int] = []
        for part in self._sp_split.split(text):
            if part in self._sp_controls:
                ids.append(self._sp_controls[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def _special_id(self, token: Any) -> Optional[int]:
        """Id of a bos_token/eos_token entry of tokenizer_config.json (a string or {"content": ...})."""
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str) or not token:
            return None
        return self.token_to_id(token)

    def _post_processor_adds_bos(self) -> bool:
        with_special = self._hf.encode("a", add_special_tokens=True).ids
        plain = self._hf.encode("a", add_special_tokens=False).ids
        return (
            bool(with_special) and with_special[0] == self.bos_id and (not plain or plain[0] != self.bos_id)
        )


class StreamDecoder:
    """Text of a growing id sequence, one piece per new id, without decoding the whole sequence again.

    Decoding one token alone is wrong for byte-level BPE (a character can span tokens) and for SentencePiece (a
    lone "▁word" decodes without its space). With tokenizer.json this is tokenizers' `DecodeStream`; for
    SentencePiece, a window from the last emitted token on is decoded (constant work per token). Text ending in
    an incomplete UTF-8 character is held back until it completes."""

    def __init__(self, tokenizer: Tokenizer, context: list[int]) -> None:
        self.tokenizer = tokenizer
        self._stream = None
        if tokenizer.backend == "huggingface":
            from tokenizers.decoders import DecodeStream

            self._stream = (
                DecodeStream(ids=context, skip_special_tokens=True)
                if context
                else DecodeStream(skip_special_tokens=True)
            )
        self.ids = list(context)
        self._prefix, self._read = 0, len(self.ids)  # window start; ids decoded so far

    def step(self, token: int) -> str:
        """The new text that `token` completes ("" while a character is incomplete)."""
        if self._stream is not None:
            return self._stream.step(self.tokenizer._hf, token) or ""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read])
        text = decode(self.ids[self._prefix :])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (a dangling partial character, as the replacement character)."""
        if self._stream is not None or self._read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        return decode(self.ids[self._prefix :])[len(decode(self.ids[self._prefix : self._read])) :]


def _read_json(path: Path) -> dict:
    return read_json(path, "tokenizer") if path.is_file() else {}


def _ids(value: Any) -> list[Optional[int]]:
    """generation_config/config ids may be an int, a list of ints, or null."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _write_json_atomic(path: Path, data: dict) -> None:
    from litquant.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Union[Path, str],
    special_tokens: Sequence[str] = ("<|bos|>", "<|eos|>", "<|pad|>"),
) -> Tokenizer:
    """Train a byte-level BPE on `texts`, write tokenizer.json + tokenizer_config.json + generation_config.json
    into `out_dir` and return it loaded. special_tokens = (bos, eos, pad...) and get the first ids.

    Byte-level: the 256 byte symbols are always in the vocabulary, so decode(encode(x)) == x for any x.
    The result depends only on the texts (the trainer breaks count ties by pair order).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    if len(special_tokens) < 2:
        raise UserError("train_bpe_tokenizer: special_tokens needs at least a BOS and an EOS token")
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_bytes + len(special_tokens):
        raise UserError(
            f"train_bpe_tokenizer: vocab_size {vocab_size} is below the {n_bytes} byte symbols "
            f"+ {len(special_tokens)} special tokens"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = HFTokenizer(models.BPE())
    # no prefix space: the tokenizer must not change the text it was given
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    bos, eos = special_tokens[0], special_tokens[1]
    pad = special_tokens[2] if len(special_tokens) > 2 else None
    from litquant.io import atomic_path

    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    tok_cfg = {
        "bos_token": bos,
        "eos_token": eos,
        "add_bos_token": True,
        "add_eos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if pad is not None:
        tok_cfg["pad_token"] = pad
    _write_json_atomic(out_dir / "tokenizer_config.json", tok_cfg)
    _write_json_atomic(
        out_dir / "generation_config.json",
        {"bos_token_id": tok.token_to_id(bos), "eos_token_id": tok.token_to_id(eos)},
    )
    return Tokenizer(out_dir)
