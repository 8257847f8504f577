"""Calibration text for post-training quantization (GPTQ): `n_samples` windows of `seq_len` tokens.

`calibration_tokens(tokenizer, n_samples, seq_len, source=None, seed=0)` gives a seeded (n_samples, seq_len) tensor
from the bundled training corpus (never its held-out split) or local text / JSON / JSONL files; nothing is fetched.
Sources and sampling: docs/ARCHITECTURE.md, "Data and prompts".
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from litquant.errors import UserError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".json", ".jsonl")
POOL_FACTOR = 4  # tokenize ~4x the tokens we need, so windows rarely overlap


def load_documents(source: Optional[Path] = None) -> list[str]:
    """The calibration documents: the bundled training corpus, or those of a local file / directory."""
    if source is None:
        from litquant.data.corpus import corpus_documents

        return corpus_documents()[0]
    source = Path(source)
    if source.is_dir():
        files = sorted(
            p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES
        )
        if not files:
            raise UserError(
                f"--calibration_data {source} has no {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files"
            )
    elif source.is_file():
        files = [source]
    else:
        raise UserError(f"--calibration_data {str(source)!r} does not exist")
    docs: list[str] = []
    for suffixes, builder in ((TEXT_SUFFIXES, "text"), (JSON_SUFFIXES, "json")):
        group = [str(p) for p in files if p.suffix.lower() in suffixes]
        if group:
            docs += _read_with_datasets(builder, group)
    if len(files) == 1 and files[0].suffix.lower() not in TEXT_SUFFIXES + JSON_SUFFIXES:
        docs += _read_with_datasets("text", [str(files[0])])  # a single file named anything: plain text
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise UserError(f"--calibration_data {source} holds no text")
    return docs


def _read_with_datasets(builder: str, files: list[str]) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UserError("--calibration_data needs the `datasets` package: pip install datasets") from None
    datasets.disable_progress_bars()
    # `sample_by="document"`: one row per file, so a window can span what were lines of one text
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as e:  # datasets raises many types for unreadable/malformed files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read calibration data {', '.join(files[:3])}: {msg}") from None
    if "text" not in ds.column_names:
        raise UserError(
            f"calibration data {', '.join(files[:3])} has no 'text' field (fields: {', '.join(ds.column_names)})"
        )
    return [t for t in ds["text"] if isinstance(t, str)]


def calibration_tokens(
    tokenizer,
    n_samples: int,
    seq_len: int,
    source: Optional[Path] = None,
    seed: int = 0,
    documents: Optional[list[str]] = None,
) -> torch.Tensor:
    """(n_samples, seq_len) long tensor of token windows, reproducible for a given seed and source."""
    if n_samples < 1:
        raise UserError(f"--n_samples must be at least 1, got {n_samples}")
    if seq_len < 2:
        raise UserError(f"--seq_len must be at least 2, got {seq_len}")
    docs = load_documents(source) if documents is None else documents
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    want = POOL_FACTOR * n_samples * seq_len
    pool: list[int] = []
    for i in order:
        pool += tokenizer.encode(docs[i], bos=False).tolist()
        if tokenizer.eos_id is not None:
            pool.append(tokenizer.eos_id)  # document boundary, as in pretraining
        if len(pool) >= want:
            break
    if len(pool) < seq_len:
        raise UserError(
            f"the calibration data has only {len(pool)} tokens, fewer than one window of --seq_len {seq_len}"
        )
    ids = torch.tensor(pool, dtype=torch.long)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


SELF = "self"  # --calibration_data self: windows the model samples itself


def self_generated_tokens(
    model, tokenizer, n_samples: int, seq_len: int, seed: int = 0, batch_size: int = 16
) -> torch.Tensor:
    """(n_samples, seq_len) windows sampled from `model` itself at temperature 1 (LLM-QAT's data-free calibration):
    each starts at BOS (if the tokenizer has one) and a token drawn uniformly from the vocabulary, and runs on
    through EOS, so the windows follow the model's own distribution whatever it was trained on."""
    from tqdm import tqdm

    from litquant.generation import BatchDecoder, SamplingParams, Sequence, run

    device = model.lm_head.weight.device
    g = torch.Generator().manual_seed(seed)
    vocab = min(tokenizer.vocab_size, model.config.vocab_size)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    prompts = [bos + [int(torch.randint(vocab, (1,), generator=g))] for _ in range(n_samples)]
    decoder = BatchDecoder(model, min(batch_size, n_samples), seq_len, device)
    seqs = [
        Sequence(p, SamplingParams(seq_len - len(p), 1.0, seed=seed * 100_003 + i))
        for i, p in enumerate(prompts)
    ]
    with tqdm(total=n_samples * seq_len, desc="Sampling calibration text", unit="tok", leave=False) as bar:
        for s in run(decoder, seqs):
            bar.update(1)
    return torch.tensor([s.prompt + s.tokens for s in seqs], dtype=torch.long)
