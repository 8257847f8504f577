"""Load-time peak memory of each `--quantize` mode against the quantized model's own size (CPU or CUDA).

    python benchmarks/load_memory.py [--model_name TinyLlama-1.1B-Chat-v1.0] [--modes bf16-true,bnb.nf4,...]

1. Makes (once) a checkpoint of the named config with random bf16 weights at benchmarks/out/load-<name>/ (real
   shapes, real file size: the loader streams it exactly as it streams downloaded weights), and a pre-quantized
   nf4 file next to it (`litquant quantize bnb --mode nf4`).
2. Loads it once per mode, each in a fresh process: memory before `load_model` (torch, bitsandbytes and litquant
   imported), the peak during it, and the weight bytes of the loaded model. "over baseline" = peak - before:
   on CPU resident set (what the load itself cost), on CUDA peak allocated. The goal (bitsandbytes issue):
   over baseline <= 1.3x the quantized model's size, i.e. never a full-precision copy of the model.

The page cache holding the file is not part of a process's resident set; the loader reads tensor by tensor with
plain reads (no mmap), so what it keeps is what counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, REPO  # noqa: E402
from litquant.errors import UserError, run_guarded  # noqa: E402

DEFAULT_MODES = "bf16-true,bnb.nf4,bnb.nf4-dq,bnb.fp4,bnb.fp4-dq,bnb.int8,bnb.nf4+prequantized"

_WORKER = r"""
import gc, json, sys, time
import torch, bitsandbytes  # noqa: F401  (imported before the baseline: the libraries are not the load)
from litquant.checkpoint import load_model
from litquant.precision import resolve
from litquant.utils import current_rss_bytes, peak_memory_bytes, reset_peak_memory, weight_bytes
checkpoint, mode, precision, device = sys.argv[1:5]
plugin = resolve(precision, None if mode == precision else mode, device)
gc.collect()
reset_peak_memory(device)
before = torch.cuda.memory_allocated() if device == "cuda" else current_rss_bytes()
t0 = time.perf_counter()
model = load_model(checkpoint, plugin, device, progress=False)
seconds = time.perf_counter() - t0
peak = peak_memory_bytes(device)
print(json.dumps(dict(before=before, peak=peak, weights=weight_bytes(model), seconds=seconds,
                      file=str(plugin.weights_file(__import__("pathlib").Path(checkpoint))))))
"""


def make_checkpoint(name: str, directory: Path) -> None:
    """Random bf16 weights of the named config, saved as a litquant checkpoint (skipped when already there).
    Drawn tensor by tensor by the benchmark's `random_model`, so no fp32 copy of the model is ever made."""
    import torch

    from litquant.benchmark.measure import random_model
    from litquant.checkpoint import WEIGHTS_FILE, save_checkpoint
    from litquant.config import Config
    from litquant.precision import resolve

    if (directory / WEIGHTS_FILE).is_file():
        return
    config = Config.from_name(name)
    print(f"Writing a random-weight {name} checkpoint to {directory} ...", file=sys.stderr)
    model = random_model(config, resolve("bf16-true", None, "cpu"), torch.device("cpu"), seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.state_dict(), config, directory)


def measure(checkpoint: Path, mode: str, precision: str, device: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(checkpoint), mode, precision, device],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise UserError(f"{mode}: the load failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_name", default="TinyLlama-1.1B-Chat-v1.0")
    ap.add_argument(
        "--modes",
        default=DEFAULT_MODES,
        help="comma list; `MODE+prequantized` loads the file `litquant quantize bnb` wrote",
    )
    ap.add_argument("--precision", default="bf16-true", help="compute dtype of every mode")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)

    from litquant.config import Config
    from litquant.precision import resolve

    Config.from_name(args.model_name)  # an unknown name is a one-line error before any work
    specs = [m.strip() for m in args.modes.split(",") if m.strip()]
    for spec in specs:
        mode, _, variant = spec.partition("+")
        if variant not in ("", "prequantized") or (variant and not mode.startswith("bnb.")):
            raise UserError(f"--modes: {spec!r}: only a bnb mode takes '+prequantized'")
        # unknown names fail here
        resolve(args.precision, None if mode == args.precision else mode, args.device)

    base = OUT / f"load-{args.model_name}"
    make_checkpoint(args.model_name, base)
    results = []
    for spec in specs:
        mode, _, variant = spec.partition("+")
        checkpoint = base
        # a second directory (hard links to the same files) with the bnb file in it
        if variant == "prequantized":
            checkpoint = OUT / f"load-{args.model_name}-{mode}"
            if not any(checkpoint.glob("lit_model_bnb*.safetensors")):
                checkpoint.mkdir(parents=True, exist_ok=True)
                for f in base.iterdir():
                    if f.is_file() and not (checkpoint / f.name).exists():
                        os.link(f, checkpoint / f.name)
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "litquant.cli",
                        "quantize",
                        "bnb",
                        "--checkpoint_dir",
                        str(checkpoint),
                        "--mode",
                        mode.removeprefix("bnb."),
                    ],
                    check=True,
                    cwd=REPO,
                )
        r = measure(checkpoint, mode, args.precision, args.device)
        r.update(mode=spec, over=r["peak"] - r["before"])
        r["ratio"] = r["over"] / r["weights"]
        results.append(r)
        print(
            f"{spec:24s} weights {r['weights'] / 1e9:6.3f} GB  before {r['before'] / 1e9:5.2f}  peak "
            f"{r['peak'] / 1e9:5.2f}  over baseline {r['over'] / 1e9:6.3f} GB = {r['ratio']:.2f}x weights  "
            f"load {r['seconds']:.1f} s  ({Path(r['file']).name})",
            flush=True,
        )
    print("\n| mode | weights GB | peak over baseline GB | / weights | load s | file read |")
    print("|---|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['weights'] / 1e9:.3f} | {r['over'] / 1e9:.3f} | {r['ratio']:.2f}x | "
            f"{r['seconds']:.1f} | {Path(r['file']).name} |"
        )
    (OUT / f"load_memory-{args.model_name}.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_guarded(main)
