"""Tokenizer: byte-level BPE training and round trip, BOS/EOS from the config files, the SentencePiece path
(checked against `sentencepiece` itself), tokenizer.json parity with transformers, streaming decode, errors."""

from __future__ import annotations

import inspect
import io
import json
import pydoc_data.topics
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from litquant.errors import UserError
from litquant.tokenizer import Tokenizer, train_bpe_tokenizer

TOPICS = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
TRAIN_TEXTS = TOPICS[:12]  # ~ a few tens of KB: enough for 512 merges, trains in well under a second
HELD_OUT = TOPICS[-1]  # text the tokenizer did not see

SAMPLES = [
    HELD_OUT[:2000],
    inspect.getsource(json)[:3000],  # code: indentation, quotes, newlines
    "naïve café — 世界 🙂🚀 Здравствуйте\r\n\ttabs\u00a0nbsp  trailing  ",
    "  leading spaces and\n\n\nblank lines\n",
    "x",
    "",
]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(TRAIN_TEXTS, 512, out)
    return out


@pytest.fixture(scope="module")
def sp_proto() -> bytes:
    """A tiny llama-style SentencePiece model (unk=0, bos=1, eos=2) trained on the same text."""
    buf = io.BytesIO()
    lines = [line for text in TRAIN_TEXTS for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=400,
        model_type="bpe",
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def copy_tokenizer_json(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return dst


# ---------------------------------------------------------------------------- trained byte-level BPE


def test_trained_bpe_files_and_ids(bpe_dir):
    tok = Tokenizer(bpe_dir)
    hf = HFTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tok_cfg = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    gen_cfg = json.loads((bpe_dir / "generation_config.json").read_text())
    assert tok.backend == "huggingface"
    assert tok.vocab_size == hf.get_vocab_size() == 512
    assert tok_cfg["add_bos_token"] is True
    assert (
        gen_cfg["bos_token_id"]
        == hf.token_to_id(tok_cfg["bos_token"])
        == tok.bos_id
        == hf.token_to_id("<|bos|>")
    )
    assert (
        gen_cfg["eos_token_id"]
        == hf.token_to_id(tok_cfg["eos_token"])
        == tok.eos_id
        == hf.token_to_id("<|eos|>")
    )
    assert tok.stop_ids == {tok.eos_id}
    assert tok.use_bos is True
    assert tok.token_to_id("<|pad|>") == hf.token_to_id("<|pad|>") is not None
    assert tok.token_to_id("<|no such token|>") is None


@pytest.mark.parametrize("text", SAMPLES)
def test_bpe_round_trip(bpe_dir, text):
    tok = Tokenizer(bpe_dir)
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids[0].item() == tok.bos_id  # add_bos_token: true
    assert tok.decode(ids) == text
    plain = tok.encode(text, bos=False)
    assert torch.equal(plain, ids[1:])
    assert tok.decode(plain.tolist()) == text


def test_bpe_compresses_text(bpe_dir):
    # the merges are real: far fewer tokens than bytes on English prose the tokenizer has not seen
    tok = Tokenizer(bpe_dir)
    n_bytes = len(HELD_OUT.encode("utf-8"))
    assert len(tok.encode(HELD_OUT, bos=False)) < 0.6 * n_bytes


def test_bpe_training_is_deterministic(tmp_path):
    a = train_bpe_tokenizer(iter(TRAIN_TEXTS[:6]), 400, tmp_path / "a")
    b = train_bpe_tokenizer(list(TRAIN_TEXTS[:6]), 400, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert torch.equal(a.encode(HELD_OUT[:500]), b.encode(HELD_OUT[:500]))


def test_bpe_vocab_too_small(tmp_path):
    with pytest.raises(UserError, match="vocab_size"):
        train_bpe_tokenizer(TRAIN_TEXTS[:1], 100, tmp_path)


def test_eos_and_max_length(bpe_dir):
    tok = Tokenizer(bpe_dir)
    text = HELD_OUT[:300]
    full = tok.encode(text, eos=True)
    assert full[-1].item() == tok.eos_id and full[0].item() == tok.bos_id
    assert torch.equal(full[1:-1], tok.encode(text, bos=False))
    assert torch.equal(tok.encode(text, max_length=5), full[:5])
    assert tok.encode(text, device="meta").device.type == "meta"


# ---------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_json_parity_with_transformers(bpe_dir, text):
    tok = Tokenizer(bpe_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(bpe_dir / "tokenizer.json"))
    ids = ref.encode(text, add_special_tokens=False)
    assert tok.encode(text, bos=False).tolist() == ids
    assert tok.decode(ids) == ref.decode(ids)
    # special tokens written in the text are single ids in both
    special = "<|bos|>" + text + "<|eos|>"
    assert tok.encode(special, bos=False).tolist() == ref.encode(special, add_special_tokens=False)


@pytest.fixture()
def post_processor_dir(bpe_dir, tmp_path) -> Path:
    """Llama-3 style: tokenizer.json's post-processor adds BOS; no tokenizer_config.json, ids in config.json."""
    hf = HFTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    bos = hf.token_to_id("<|bos|>")
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", bos)])
    hf.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "config.json", {"bos_token_id": bos, "eos_token_id": hf.token_to_id("<|eos|>")})
    return tmp_path


@pytest.mark.parametrize("text", SAMPLES[:3])
def test_post_processor_bos_parity_and_no_double_bos(post_processor_dir, text):
    tok = Tokenizer(post_processor_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(post_processor_dir / "tokenizer.json"))
    assert tok.use_bos is True  # detected from the post-processor
    assert tok.encode(text).tolist() == ref.encode(text)  # transformers adds BOS through the post-processor
    # a prompt that already starts with the BOS string (chat templates do this): transformers doubles it
    with_bos = "<|bos|>" + text
    assert ref.encode(with_bos)[:2] == [tok.bos_id, tok.bos_id]
    ids = tok.encode(with_bos).tolist()
    assert ids == ref.encode(text) and ids.count(tok.bos_id) == 1


def test_no_bos_when_config_says_so(post_processor_dir):
    write_json(post_processor_dir / "tokenizer_config.json", {"bos_token": "<|bos|>", "add_bos_token": False})
    tok = Tokenizer(post_processor_dir)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(post_processor_dir / "tokenizer.json"))
    text = HELD_OUT[:200]
    assert tok.use_bos is False
    assert tok.encode(text).tolist() == ref.encode(text, add_special_tokens=False)
    assert tok.encode(text, bos=True).tolist() == ref.encode(text)


# ---------------------------------------------------------------------------- BOS / EOS from the config files


@pytest.fixture(scope="module")
def bpe4_dir(tmp_path_factory) -> Path:
    """A tokenizer with an extra end-of-turn token (like Llama 3's <|eot_id|>)."""
    out = tmp_path_factory.mktemp("bpe4")
    train_bpe_tokenizer(
        TRAIN_TEXTS[:4], 400, out, special_tokens=("<|bos|>", "<|eos|>", "<|pad|>", "<|eot|>")
    )
    return out


def test_special_tokens_as_dicts_and_eos_list(bpe4_dir, tmp_path):
    d = copy_tokenizer_json(bpe4_dir, tmp_path / "ckpt")
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    bos, eos, eot = (hf.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|eot|>"))
    write_json(
        d / "tokenizer_config.json",
        {
            "bos_token": {"content": "<|bos|>", "lstrip": False, "normalized": False, "special": True},
            "eos_token": {"content": "<|eos|>", "lstrip": False, "normalized": False, "special": True},
        },
    )
    write_json(d / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [eot, eos]})
    tok = Tokenizer(d)
    # eos_token of tokenizer_config is the one `eos=True` appends
    assert (tok.bos_id, tok.eos_id) == (
        bos,
        eos,
    )
    assert tok.stop_ids == {eos, eot}  # every eos id of generation_config stops generation
    assert tok.use_bos is False  # no add_bos_token, no post-processor: HF would not add BOS either
    assert tok.encode("hi", eos=True)[-1].item() == eos

    # without tokenizer_config.json the first eos id of generation_config is used
    (d / "tokenizer_config.json").unlink()
    tok = Tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (bos, eot, {eos, eot})


def test_ids_from_config_json_only(bpe4_dir, tmp_path):
    d = copy_tokenizer_json(bpe4_dir, tmp_path / "ckpt")
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    eot, eos = hf.token_to_id("<|eot|>"), hf.token_to_id("<|eos|>")
    write_json(d / "config.json", {"model_type": "llama", "bos_token_id": eos, "eos_token_id": eot})
    tok = Tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (eos, eot, {eot})
    assert tok.encode("hi", bos=True)[0].item() == eos


def test_no_special_tokens_defined(bpe4_dir, tmp_path):
    tok = Tokenizer(copy_tokenizer_json(bpe4_dir, tmp_path / "ckpt"))
    assert tok.bos_id is None and tok.eos_id is None and tok.stop_ids == set() and tok.use_bos is False
    assert tok.decode(tok.encode("plain text")) == "plain text"
    with pytest.raises(UserError, match="BOS"):
        tok.encode("x", bos=True)
    with pytest.raises(UserError, match="EOS"):
        tok.encode("x", eos=True)


# ---------------------------------------------------------------------------- SentencePiece


@pytest.fixture()
def sp_dir(sp_proto, tmp_path) -> Path:
    (tmp_path / "tokenizer.model").write_bytes(sp_proto)
    return tmp_path


@pytest.mark.parametrize(
    "text", [HELD_OUT[:1500], "Hello world, the quick brown fox.", "  two  spaces\nnewline", ""]
)
def test_sentencepiece_matches_sentencepiece(sp_dir, sp_proto, text):
    sp = spm.SentencePieceProcessor(model_proto=sp_proto)
    tok = Tokenizer(sp_dir)
    assert tok.backend == "sentencepiece"
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.vocab_size())
    assert tok.use_bos is True  # llama-style SentencePiece with a BOS piece
    assert tok.encode(text, bos=False).tolist() == sp.encode(text)
    assert tok.encode(text).tolist() == [sp.bos_id()] + sp.encode(text)
    ids = sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode(torch.tensor([sp.bos_id()] + ids + [sp.eos_id()])) == sp.decode(ids)


def test_sentencepiece_control_strings_in_text(sp_dir, sp_proto):
    # Llama-2 chat prompts write "<s>"/"</s>" as text; Meta's reference encodes each turn separately
    # with sentencepiece and joins them with the BOS/EOS ids
    sp = spm.SentencePieceProcessor(model_proto=sp_proto)
    tok = Tokenizer(sp_dir)
    a, b = "[INST] hi there [/INST] hello ", "[INST] again [/INST]"
    expected = [sp.bos_id()] + sp.encode(a) + [sp.eos_id(), sp.bos_id()] + sp.encode(b)
    assert tok.encode(f"<s>{a}</s><s>{b}").tolist() == expected
    assert tok.encode(f"{a}</s><s>{b}").tolist() == expected  # BOS added once, in front
    assert tok.decode(expected, skip_special_tokens=False).count("<s>") == 2


def test_tokenizer_json_preferred_over_model(bpe_dir, sp_proto, tmp_path):
    d = copy_tokenizer_json(bpe_dir, tmp_path / "both")
    (d / "tokenizer.model").write_bytes(sp_proto)
    tok = Tokenizer(d)
    assert tok.backend == "huggingface" and tok.vocab_size == 512


# ---------------------------------------------------------------------------- streaming decode


def test_decode_stream_byte_level_multibyte(bpe_dir):
    tok = Tokenizer(bpe_dir)
    text = "Emoji 🙂 and 世界 split into byte tokens, then ascii."
    ids = tok.encode(text, bos=False).tolist()
    # the case worth testing: some single tokens are partial UTF-8 and decode to U+FFFD on their own
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = list(tok.decode_stream(iter(ids)))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 5  # it streams, rather than returning everything at the end


def test_decode_stream_sentencepiece_keeps_spaces(sp_dir, sp_proto):
    sp = spm.SentencePieceProcessor(model_proto=sp_proto)
    tok = Tokenizer(sp_dir)
    full = sp.encode("The quick brown fox jumps over the lazy dog.")
    k = next(i for i in range(1, len(full)) if sp.id_to_piece(full[i]).startswith("\u2581"))
    prompt, new = full[:k], full[k:]
    streamed = "".join(tok.decode_stream(torch.tensor(new), context=prompt[-1:]))
    assert streamed.startswith(" ")  # a word-initial piece keeps its space after the prompt
    assert sp.decode(prompt) + streamed == sp.decode(full)
    # one token at a time would lose every space: the naive way is wrong, which is why decode_stream exists
    assert "".join(sp.decode([i]) for i in new) != streamed


# ---------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as e:
        Tokenizer(missing)
    msg = str(e.value)
    assert str(missing) in msg and "tokenizer.json" in msg and "tokenizer.model" in msg and "\n" not in msg


def test_directory_without_tokenizer(tmp_path):
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>"})
    with pytest.raises(UserError) as e:
        Tokenizer(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg and "tokenizer.model" in msg and "\n" not in msg


def test_corrupt_files(bpe_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        Tokenizer(tmp_path)
    d = copy_tokenizer_json(bpe_dir, tmp_path / "ok")
    (d / "generation_config.json").write_text("[1, 2")
    with pytest.raises(UserError, match="generation_config.json"):
        Tokenizer(d)
    (d / "generation_config.json").unlink()
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(UserError, match="tokenizer.model"):
        Tokenizer(d)
