"""Quality of the decode kernels: each mode's perplexity through the kernels a decoding token takes, against the
exact path (fp32 activations, LITQUANT_EXACT_KERNELS=1: litquant's fp32 kernels, whose only rounding is fp32's).

    python benchmarks/decode_quality.py [--checkpoint_dir DIR] [--modes full,bnb.nf4,...] [--max_tokens 8192]
        [--emulate none|no-bf16|avx2]

Decoding runs one row per sequence through the Linears, and on CPUs without AVX-512 those rows go through the
int16-activation kernels (cpu_gemv.c) and, in bf16, the bf16 GEMV. Every row's arithmetic there is independent of the
other rows, so a perplexity with the row limits lifted (every row of every window through the decode kernels) is the
perplexity decoding would see, at a window's cost instead of a token's. Gate (issue: CPU decode on every x86 CPU):
the default path within 0.3% of the exact one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.scale import EMULATE  # noqa: E402

MODES = ("full", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "gptq.int4")


def measure(checkpoint_dir: str, mode: str, exact: bool, max_tokens: int) -> dict:
    """In this process: load `mode` at its default precision (exact: fp32 and the exact kernels), lift the row limits
    of the decode kernels, and measure the held-out perplexity."""
    import torch

    import litquant.quantization.bf16_linear as bf
    import litquant.quantization.bnb_linear as bl
    import litquant.quantization.gptq_linear as gl
    from litquant.api import LLM
    from litquant.checkpoint import Checkpoint
    from litquant.evaluation import default_window, heldout_tokens, perplexity

    if exact:
        os.environ["LITQUANT_EXACT_KERNELS"] = "1"
    big = 1 << 30
    bl.GEMV_MAX_ROWS_4BIT = bl.I16_MAX_ROWS = bl.GEMV_MAX_ROWS_INT8 = big
    gl.GEMV_MAX_ROWS = gl.I16_MAX_ROWS = big
    bf.GEMV_MAX_ROWS = big
    ck = Checkpoint.open(Path(checkpoint_dir))
    quantize = None if mode == "full" else mode
    llm = LLM.load(ck, quantize, "32-true" if exact else None, None, "cpu")
    tokens = heldout_tokens(ck.tokenizer, max_tokens)
    with llm.plugin.forward_context(), torch.inference_mode():
        res = perplexity(llm.model, tokens, default_window(ck.config.block_size), batch_size=4)
    return dict(precision=llm.plugin.precision, perplexity=res["perplexity"], tokens=res["tokens"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint_dir",
        default=str(Path(__file__).resolve().parent.parent / "checkpoints" / "litquant-tiny"),
    )
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max_tokens", type=int, default=8192)
    p.add_argument("--emulate", default="none", choices=sorted(EMULATE))
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # mode exact|default: run in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.checkpoint_dir, a.one[0], a.one[1] == "exact", a.max_tokens)))
        return
    from litquant.errors import UserError
    from litquant.precision import quantize_modes

    modes = a.modes.split(",")
    bad = [m for m in modes if m != "full" and m not in quantize_modes()]
    if bad:
        raise UserError(f"unknown --modes {', '.join(bad)}; choose from full, {', '.join(quantize_modes())}")
    env = {**os.environ, **EMULATE[a.emulate]}
    rows = []
    for mode in modes:
        got = {}
        for kind in ("exact", "default"):
            cmd = [
                sys.executable,
                __file__,
                "--checkpoint_dir",
                a.checkpoint_dir,
                "--max_tokens",
                str(a.max_tokens),
            ]
            out = subprocess.run([*cmd, "--one", mode, kind], env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{mode} {kind}: {out.stderr.strip().splitlines()[-1]}")
            got[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        d = got["default"]["perplexity"] / got["exact"]["perplexity"] - 1
        rows.append(
            (mode, got["exact"]["perplexity"], got["default"]["precision"], got["default"]["perplexity"], d)
        )
        print(
            f"{mode:12s} exact {rows[-1][1]:.4f}  default ({rows[-1][2]}) {rows[-1][3]:.4f}  {100 * d:+.3f}%",
            flush=True,
        )
    print(
        "\n| mode | exact path (fp32) | default path | precision | change |\n| --- | ---: | ---: | --- | ---: |"
    )
    for mode, e, prec, v, d in rows:
        print(f"| {mode} | {e:.4f} | {v:.4f} | {prec} | {100 * d:+.3f}% |")


if __name__ == "__main__":
    from litquant.errors import run_guarded

    run_guarded(main)
