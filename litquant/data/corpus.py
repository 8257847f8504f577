"""The bundled corpus: text every Python install carries, split reproducibly.

Training text: the standard library's top-level modules (`Lib/*.py`) and the `pydoc_data.topics`
reference pages. Every 25th module (in sorted order) is held out; the held-out text is committed as
`litquant/data/bundled/heldout.txt`, so evaluation numbers do not depend on the local Python.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
HELDOUT_FILE = BUNDLED_DIR / "heldout.txt"
DOC_SEPARATOR = "\n\n"
HELDOUT_EVERY = 25


def stdlib_modules() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def corpus_documents() -> tuple[list[str], list[str]]:
    """(train documents, held-out documents)."""
    import pydoc_data.topics

    train, heldout = [], []
    for i, path in enumerate(stdlib_modules()):
        text = path.read_text(encoding="utf-8", errors="replace")
        (heldout if i % HELDOUT_EVERY == 0 else train).append(text)
    train += [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    return train, heldout


def heldout_text() -> str:
    return HELDOUT_FILE.read_text(encoding="utf-8")


def write_heldout(documents: list[str]) -> None:
    from litquant.io import atomic_write_text

    atomic_write_text(HELDOUT_FILE, DOC_SEPARATOR.join(documents))
