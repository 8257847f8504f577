"""One error type for bad user input, and the guard every job's entry point runs under.

Anything the user can get wrong (a path, a flag value, a file that does not match) raises `UserError`
with a one-line message. `run_guarded` turns it into `error: <message>` on stderr and exit code 1,
never a traceback. Bugs still show their traceback.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any, Callable


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 1."""


def read_json(path: str | Path, what: str = "") -> dict:
    """A JSON object from a user's file; anything else (unreadable, not JSON, not an object) is a UserError.
    `what` prefixes the message (e.g. "tokenizer")."""
    prefix = f"{what}: " if what else ""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{prefix}{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{prefix}{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{prefix}{path}: expected a JSON object")
    return data


def run_guarded(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(
            f"error: no space left on the device{where}; what was there before is unchanged (writes are atomic)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except MemoryError:
        print(
            "error: out of memory (try --quantize bnb.nf4, a lower --precision or a smaller batch)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except Exception as e:  # CUDA OOM is a RuntimeError subclass; say it in one line too
        if type(e).__name__ == "OutOfMemoryError":
            print(f"error: device out of memory ({str(e).splitlines()[0]})", file=sys.stderr)
            raise SystemExit(1) from None
        raise


def run_job(components: Any, args: list[str] | None = None, prog: str | None = None) -> Any:
    """Entry point of every job script and of `litquant`: jsonargparse CLI under `run_guarded`.

    A bad flag, type or config key is one `error:` line and exit code 2 (jsonargparse would otherwise
    print the whole usage, dozens of lines for the jobs with many flags, before the error)."""
    from argparse import ArgumentError

    import jsonargparse
    from jsonargparse import CLI

    # dataclass option groups (--train.*, ...) document each field with an attribute docstring: its --help text
    if hasattr(jsonargparse, "set_parsing_settings"):  # jsonargparse >= 4.35
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    else:
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)
    if callable(components):
        args = merge_repeated_flags(components, sys.argv[1:] if args is None else args)
    try:
        kwargs = {"prog": prog} if prog else {}
        return run_guarded(CLI, components, args=args, as_positional=False, exit_on_error=False, **kwargs)
    except ArgumentError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def merge_repeated_flags(fn: Callable, args: list[str]) -> list[str]:
    """`--prompt a --prompt b` -> `--prompt '["a", "b"]'` for the list-typed parameters of `fn` (argparse would
    keep only the last)."""
    import typing

    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return args
    lists = {
        name
        for name, t in hints.items()
        if typing.get_origin(t) is list or any(typing.get_origin(a) is list for a in typing.get_args(t))
    }
    out, seen = [], {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        name = flag[2:] if flag.startswith("--") else None
        if name in lists and (eq or i + 1 < len(args)):
            if not eq:
                value, i = args[i + 1], i + 1
            seen.setdefault(name, []).append(value)
            if len(seen[name]) == 1:
                out += [flag, value]
            else:
                out[out.index(flag) + 1] = json.dumps(seen[name])
        else:
            out.append(args[i])
        i += 1
    return out
