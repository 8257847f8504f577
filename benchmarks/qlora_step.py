"""QLoRA vs LoRA training step on CPU at a real size: the 200M random Llama of benchmarks/scale.py, micro-batch 1.

    python benchmarks/qlora_step.py [--model 200m] [--seq_len 256] [--steps 8] [--quantize bnb.nf4,bnb.nf4-dq]

Both runs are `litquant finetune lora` as a user starts it (default --precision, the default LoRA targets), on
the same data: examples of exactly --seq_len tokens (standard-library source text as the answers). The figure is
the median step time after two warm-up steps, read from the job's own `step ... tokens/sec` lines. The QLoRA run
differs only by `--quantize`: the frozen base is 4-bit and the backward goes through it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, machine, sh  # noqa: E402
from benchmarks.scale import build, cpu_flags  # noqa: E402
from litquant.errors import run_guarded  # noqa: E402

STEP = re.compile(r"step\s+(\d+)/\d+ \| loss [\d.]+ \| lr \S+ \| ([\d,.]+) tokens/sec")


def make_data(d: Path, seq_len: int, n: int, path: Path) -> None:
    """n examples whose prompt + answer are seq_len tokens (answers: standard-library source)."""
    import inspect
    import json as _json

    from litquant.tokenizer import Tokenizer

    tok = Tokenizer(d)
    text = inspect.getsource(_json) + inspect.getsource(argparse)
    ids = tok.encode(text).tolist()
    rows, step = [], seq_len - 24
    for i in range(n):
        piece = ids[(i * step) % (len(ids) - step) :][:step]
        rows.append({"instruction": "Continue the module.", "input": "", "output": tok.decode(piece)})
    path.write_text("\n".join(json.dumps(r) for r in rows))


def run(d: Path, data: Path, quantize: Optional[str], a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="litquant-qlora-") as out:
        cmd = [
            sys.executable,
            "-m",
            "litquant.cli",
            "finetune",
            "lora",
            "--checkpoint_dir",
            d,
            "--out_dir",
            out,
            "--data.path",
            data,
            "--data.max_seq_length",
            a.seq_len,
            "--data.val_split_fraction",
            "0.1",
            "--train.micro_batch_size",
            "1",
            "--train.global_batch_size",
            "1",
            "--train.max_steps",
            a.steps,
            "--train.lr_warmup_steps",
            "1",
            "--eval.interval",
            "100000",
            "--eval.max_iters",
            "1",
            "--eval.sample_max_new_tokens",
            "0",
            "--logger",
            "csv",
        ]
        if quantize:
            cmd += ["--quantize", quantize]
        p = sh(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=7200)
    steps = [(int(s), float(t.replace(",", ""))) for s, t in STEP.findall(p.stdout + p.stderr)]
    rates = [t for s, t in steps if s > 2]
    tok_s = statistics.median(rates)
    return dict(quantize=quantize or "none", tokens_per_sec=tok_s, step_s=a.seq_len / tok_s, samples=rates)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="200m", choices=["200m", "1.1b"])
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--quantize", default="bnb.nf4")
    a = p.parse_args(argv)
    d = build(a.model)
    data = d.parent / f"qlora-data-{a.seq_len}.jsonl"
    make_data(d, a.seq_len, 40, data)
    rows = [run(d, data, None, a)]
    for q in a.quantize.split(","):
        rows.append(run(d, data, q, a))
    m = machine()
    print(
        f"\n{a.model}, micro-batch 1, seq {a.seq_len}, {m['cpu']} ({m['cores']} cores), flags {cpu_flags()}, "
        f"commit {m['commit']}"
    )
    print("| base | step s | tokens/sec | x LoRA step time |\n| --- | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['quantize']} | {r['step_s']:.2f} | {r['tokens_per_sec']:.1f} "
            f"| {r['step_s'] / rows[0]['step_s']:.2f} |"
        )
    return dict(machine=m, rows=rows)


if __name__ == "__main__":
    run_guarded(main)
