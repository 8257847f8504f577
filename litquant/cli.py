"""`litquant <job> ...`: one subcommand per job function (the same functions the scripts run).

Jobs are imported lazily, so `litquant generate` does not import the finetuning stack.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Callable

from litquant.errors import run_job

# subcommand -> "module:function"; nested dicts are sub-subcommands (`litquant quantize gptq`).
JOBS: dict = {
    "generate": "generate.base:main",
    "chat": "generate.chat:main",
    "pretrain": "pretrain.base:main",
    "convert_hf_checkpoint": "litquant.convert:convert_hf_checkpoint",
    "convert_lit_checkpoint": "litquant.convert:convert_lit_checkpoint",
    "quantize": {"bnb": "quantize.bnb:main", "gptq": "quantize.gptq:main"},
    "finetune": {"lora": "litquant.jobs.finetune:lora", "full": "litquant.jobs.finetune:full"},
    "merge_lora": "litquant.lora:merge_lora_job",
    "evaluate": "litquant.evaluate_job:main",
    "benchmark": "litquant.benchmark:main",
    "estimate": "litquant.estimate:main",
}


def _load(spec: str) -> Callable:
    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)


def _resolve(jobs: dict, argv: list[str]) -> dict:
    """Import only the job that argv names (keeps `litquant generate` fast); all of them for --help."""
    out = {}
    for name, spec in jobs.items():
        if argv and argv[0] != name and not argv[0].startswith("-"):
            continue
        if isinstance(spec, dict):
            sub = _resolve(spec, argv[1:] if argv and argv[0] == name else [])
            if sub:
                out[name] = sub
        elif _exists(spec.split(":")[0]):
            out[name] = _load(spec)
    return out


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `litquant <job> [<sub>] ARGS`: parse ARGS with the job's own parser (the same one its script uses),
    # so errors and --help read the same both ways (jsonargparse's nested subcommands also garble errors).
    spec, rest, prog = JOBS, argv, "litquant"
    while rest and isinstance(spec, dict) and rest[0] in spec:
        spec, prog, rest = spec[rest[0]], f"{prog} {rest[0]}", rest[1:]
    if isinstance(spec, str) and _exists(spec.split(":")[0]):
        run_job(_load(spec), args=rest, prog=prog)
        return
    components = _resolve(spec if isinstance(spec, dict) else JOBS, [])
    run_job(components, args=rest if spec is not JOBS else argv, prog=prog)


if __name__ == "__main__":
    main()
