"""Instruction data for finetuning: Alpaca-layout JSON/JSONL from local files, prompt masking, batching.

`load_splits(path, val_fraction, seed)` reads (train, val) examples (path None: the bundled code-writing task),
`encode_dataset` turns them into prompt | output | EOS tokens (prompt labels -100 with `mask_prompt`), `collate`
pads a batch and `exact_match` scores greedy answers.
Encoding and the bundled task: docs/ARCHITECTURE.md, "Data and prompts".
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import torch

from litquant.errors import UserError
from litquant.prompts import Alpaca, PromptStyle

if TYPE_CHECKING:
    from litquant.tokenizer import Tokenizer

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_TASK_FILE = BUNDLED_DIR / "pyfunc_instructions.json"
BUNDLED_TASK_SEED = 2024
BUNDLED_TASK_SIZE = 3000
IGNORE_INDEX = -100
DATA_SUFFIXES = (".json", ".jsonl")


# ---- reading --------------------------------------------------------------------------------------------------


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"data directory {str(path)!r} has no .json or .jsonl files")
        return files
    raise UserError(f"data path {str(path)!r} does not exist")


def load_instructions(path: str | Path) -> list[dict]:
    """Alpaca-layout examples from a .json (a list of objects) or .jsonl file, or every such file in a directory."""
    import datasets

    path = Path(path)
    files = _data_files(path)
    for f in files:
        if f.stat().st_size == 0 or f.read_text(encoding="utf-8", errors="replace").strip() in ("", "[]"):
            raise UserError(f"{f} holds no examples")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    except Exception as e:  # the json builder raises several types for malformed files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read instruction data from {path}: {msg}") from None
    return check_examples(ds.to_list(), str(path))


def check_examples(rows: list[dict], source: str) -> list[dict]:
    if not rows:
        raise UserError(f"{source} holds no examples")
    missing = [k for k in ("instruction", "output") if k not in rows[0]]
    if missing:
        raise UserError(
            f"{source}: examples need 'instruction' and 'output' fields (Alpaca layout); "
            f"missing {missing}, found {sorted(rows[0])}"
        )
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise UserError(f"{source}: example {i} has a non-text instruction or output")
        out.append({"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]})
    return out


def split_train_val(examples: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last `val_fraction` (at least one example) is the validation set."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_split_fraction must be in (0, 1), got {val_fraction}")
    if len(examples) < 2:
        raise UserError(f"need at least 2 examples to split into train and validation, got {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(len(examples) * val_fraction)))
    return [examples[i] for i in order[:-n_val]], [examples[i] for i in order[-n_val:]]


def load_splits(path: Optional[Path], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val). A directory with train.json(l) and val.json(l) (or test.json(l)) gives its own split;
    anything else is split at random. `path=None`: the bundled task."""
    if path is None:
        return split_train_val(load_bundled_task(), val_fraction, seed)
    path = Path(path)
    if path.is_dir():

        def find(*stems: str) -> Optional[Path]:
            return next(
                (path / f"{s}{x}" for s in stems for x in DATA_SUFFIXES if (path / f"{s}{x}").is_file()), None
            )

        train, val = find("train"), find("val", "validation", "test")
        if train is not None and val is not None:
            return load_instructions(train), load_instructions(val)
    return split_train_val(load_instructions(path), val_fraction, seed)


# ---- prompts and tokens ---------------------------------------------------------------------------------------


def format_prompt(style: PromptStyle, example: dict) -> str:
    if isinstance(style, Alpaca):
        return style.apply(example["instruction"], input=example.get("input", ""))
    text = example["instruction"]
    if example.get("input"):
        text += "\n\n" + example["input"]
    return style.apply(text)


@dataclass
class EncodedExample:
    input_ids: torch.Tensor  # (T,) prompt + answer (+ EOS), truncated
    labels: torch.Tensor  # (T,) same, with IGNORE_INDEX on masked prompt tokens
    prompt_len: int


def encode_example(
    tokenizer: "Tokenizer", style: PromptStyle, example: dict, max_seq_length: int, mask_prompt: bool = True
) -> EncodedExample:
    prompt = tokenizer.encode(format_prompt(style, example))
    answer = tokenizer.encode(example["output"], bos=False, eos=tokenizer.eos_id is not None)
    ids = torch.cat((prompt, answer))[:max_seq_length]
    labels = ids.clone()
    if mask_prompt:
        labels[: prompt.numel()] = IGNORE_INDEX
    return EncodedExample(ids, labels, prompt.numel())


def encode_dataset(
    tokenizer: "Tokenizer",
    style: PromptStyle,
    examples: Sequence[dict],
    max_seq_length: int,
    mask_prompt: bool = True,
) -> tuple[list[EncodedExample], list[dict]]:
    """The encoded examples that still have an answer token to learn (after the shift), and those examples."""
    out, kept = [], []
    for ex in examples:
        enc = encode_example(tokenizer, style, ex, max_seq_length, mask_prompt)
        if (enc.labels[1:] != IGNORE_INDEX).any():
            out.append(enc)
            kept.append(ex)
    return out, kept


def collate(batch: Sequence[EncodedExample], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (input_ids, labels), both (B, T); padding is ignored by the loss."""
    T = max(e.input_ids.numel() for e in batch)
    x = torch.full((len(batch), T), pad_id, dtype=torch.long)
    y = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(batch):
        x[i, : e.input_ids.numel()] = e.input_ids
        y[i, : e.labels.numel()] = e.labels
    return x, y


# ---- the bundled task -----------------------------------------------------------------------------------------

_WORDS = (
    "count index value name path size item key line file data text user node total level mode token buffer "
    "offset length result state config cache table field width height limit start end first last default target "
    "source block page score"
).split()
_ARGS = "x y a b n m left right first second start stop low high base step width height".split()
_OPS = {"sum": "+", "difference": "-", "product": "*", "quotient": "/", "remainder": "%"}
_VERBS = "get compute make find load parse apply build".split()
_MODULES = (
    "os sys json re math time random string itertools functools collections pathlib shutil struct".split()
)


def _name(rng: random.Random) -> str:
    return f"{rng.choice(_VERBS)}_{rng.choice(_WORDS)}"


def _func_example(rng: random.Random) -> dict:
    word, symbol = rng.choice(sorted(_OPS.items()))
    name, (a, b) = _name(rng), rng.sample(_ARGS, 2)
    return {
        "instruction": f"Write a Python function {name} that returns the {word} of {a} and {b}.",
        "input": "",
        "output": f"def {name}({a}, {b}):\n    return {a} {symbol} {b}",
    }


def _call_example(rng: random.Random) -> dict:
    name, (a, b) = _name(rng), rng.sample(_ARGS, 2)
    return {"instruction": f"Call {name} with {a} and {b}.", "input": "", "output": f"{name}({a}, {b})"}


def _import_example(rng: random.Random) -> dict:
    module, name = rng.choice(_MODULES), _name(rng)
    return {
        "instruction": f"Import {name} from the {module} module.",
        "input": "",
        "output": f"from {module} import {name}",
    }


def _attribute_example(rng: random.Random) -> dict:
    obj, attr = rng.sample(_WORDS, 2)
    return {"instruction": f"Get the {attr} attribute of {obj}.", "input": "", "output": f"{obj}.{attr}"}


TASK_KINDS = {
    "func": _func_example,
    "call": _call_example,
    "import": _import_example,
    "attribute": _attribute_example,
}


def task_kind(example: dict) -> str:
    first = example["instruction"].split()[0]
    return {"Write": "func", "Call": "call", "Import": "import", "Get": "attribute"}[first]


def generate_bundled_task(n: int = BUNDLED_TASK_SIZE, seed: int = BUNDLED_TASK_SEED) -> list[dict]:
    """`n` distinct examples, the three kinds in turn, fully determined by `seed`."""
    rng = random.Random(seed)
    kinds = list(TASK_KINDS.values())
    seen, out = set(), []
    while len(out) < n:
        ex = kinds[len(out) % len(kinds)](rng)
        key = (ex["instruction"], ex["input"])
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def write_bundled_task(path: Path = BUNDLED_TASK_FILE) -> Path:
    from litquant.io import atomic_write_text

    atomic_write_text(path, json.dumps(generate_bundled_task(), indent=1) + "\n")
    return path


def load_bundled_task() -> list[dict]:
    return check_examples(json.loads(BUNDLED_TASK_FILE.read_text(encoding="utf-8")), str(BUNDLED_TASK_FILE))


# ---- exact-match accuracy -------------------------------------------------------------------------------------


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer: "Tokenizer",
    style: PromptStyle,
    examples: Iterable[dict],
    max_new_tokens: Optional[int] = None,
) -> tuple[float, list[str]]:
    """Fraction of `examples` whose greedy answer equals `output` (surrounding whitespace ignored), and the answers.

    `model` is the plain GPT (not a DDP/Fabric wrapper); its KV cache is set here and removed afterwards, and its
    max_seq_length restored, so a training loop can call this between steps."""
    from litquant.generation import generate

    examples = list(examples)
    if not examples:
        return 0.0, []
    device = next(iter(model.parameters())).device
    was_training, max_seq = model.training, model.max_seq_length
    model.eval()
    answers, correct = [], 0
    try:
        for ex in examples:
            prompt = tokenizer.encode(format_prompt(style, ex), device=device)
            budget = max_new_tokens or tokenizer.encode(ex["output"], bos=False).numel() + 4
            budget = min(budget, model.config.block_size - prompt.numel())
            if budget < 1:
                answers.append("")
                continue
            model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + budget, device=device)
            result = generate(model, prompt, budget, temperature=0.0, stop_ids=tokenizer.stop_ids)
            text = tokenizer.decode(result.new_tokens)
            answers.append(text)
            correct += int(text.strip() == ex["output"].strip())
    finally:
        model.clear_kv_cache()
        model.max_seq_length = max_seq
        model.train(was_training)
    return correct / len(examples), answers
