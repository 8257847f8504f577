"""`litquant <job> ...`: one subcommand per job function (the same functions the scripts run).

Only the job that is run gets imported: `litquant --help` lists the jobs from the table below without
importing any of them, and `litquant generate` never imports the finetuning stack.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Callable, Union

# subcommand -> ("module:function", one-line summary); a nested dict holds sub-subcommands (`litquant quantize gptq`).
Jobs = dict[str, Union[tuple[str, str], "Jobs"]]
JOBS: Jobs = {
    "generate": ("litquant.jobs.generate:main", "sample text from a checkpoint (any --quantize mode)"),
    "chat": ("litquant.jobs.chat:main", "chat with a model in the terminal"),
    "serve": ("litquant.jobs.serve:main", "an OpenAI-compatible HTTP server with continuous batching"),
    "finetune": {
        "lora": ("litquant.jobs.finetune:lora", "LoRA / QLoRA finetuning (one or several devices)"),
        "full": ("litquant.jobs.finetune:full", "finetune every weight"),
    },
    "merge_lora": ("litquant.jobs.merge_lora:main", "fold a LoRA adapter into its base checkpoint"),
    "quantize": {
        "gptq": ("litquant.jobs.quantize:gptq", "GPTQ-quantize a checkpoint (AutoGPTQ layout)"),
        "bnb": ("litquant.jobs.quantize:bnb", "store a checkpoint pre-quantized in a bitsandbytes mode"),
    },
    "evaluate": ("litquant.jobs.evaluate:main", "perplexity (and exact match) on a dataset"),
    "benchmark": ("litquant.jobs.benchmark:main", "speed, memory and perplexity of each quantization mode"),
    "estimate": (
        "litquant.jobs.estimate:main",
        "predict memory for inference and finetuning, before loading",
    ),
    "pretrain": ("litquant.jobs.pretrain:main", "train a model from scratch"),
    "convert_hf_checkpoint": (
        "litquant.jobs.convert:convert_hf_checkpoint",
        "import a Hugging Face checkpoint",
    ),
    "convert_lit_checkpoint": (
        "litquant.jobs.convert:convert_lit_checkpoint",
        "export to the Hugging Face layout",
    ),
}


def _load(spec: str) -> Callable:
    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)


def _listing(prog: str, jobs: Jobs) -> str:
    lines = [f"usage: {prog} <{'|'.join(jobs)}> [--help] ...", "", "jobs:"]
    width = max(map(len, jobs))
    for name, entry in jobs.items():
        summary = entry[1] if isinstance(entry, tuple) else "one of: " + ", ".join(entry)
        lines.append(f"  {name:<{width}}  {summary}")
    lines.append(f"\n`{prog} <job> --help` lists a job's flags.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # `litquant <job> [<sub>] ARGS`: parse ARGS with the job's own parser (the same one its script uses),
    # so errors and --help read the same both ways.
    entry, rest, prog = JOBS, argv, "litquant"
    while isinstance(entry, dict):
        if not rest or rest[0] in ("-h", "--help"):
            print(_listing(prog, entry))
            raise SystemExit(0 if rest else 2)
        if rest[0] not in entry:
            close = difflib.get_close_matches(rest[0], list(entry), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            print(
                f"error: {prog}: unknown job {rest[0]!r}{hint}; choose one of: {', '.join(entry)}",
                file=sys.stderr,
            )
            raise SystemExit(2)
        entry, prog, rest = entry[rest[0]], f"{prog} {rest[0]}", rest[1:]

    from litquant.errors import run_job

    run_job(_load(entry[0]), args=rest, prog=prog)


if __name__ == "__main__":
    main()
