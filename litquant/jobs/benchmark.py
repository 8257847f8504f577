"""The `litquant benchmark` job: checks the flags, measures each mode (`litquant.benchmark.measure`, each in a
process of its own by default) and writes the report (`litquant.benchmark.report`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import torch

from litquant.benchmark.environment import available_memory, environment, peak_bandwidth, pick_device
from litquant.benchmark.measure import MeasureSpec, failed, measure_in_subprocess, measure_or_error
from litquant.benchmark.modes import check_modes, default_modes, weights_needed
from litquant.benchmark.report import format_terminal, header, write_report
from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, Checkpoint
from litquant.config import Config
from litquant.errors import UserError


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    *,
    modes: Optional[str] = None,
    precision: Optional[str] = None,
    accelerator: str = "auto",
    prompt_tokens: int = 128,
    max_new_tokens: int = 100,
    runs: int = 3,
    warmup: int = 1,
    ppl_tokens: int = 4096,
    window: Optional[int] = None,
    random_init: bool = False,
    model_name: Optional[str] = None,
    compile: bool = False,
    bandwidth_gbps: Optional[float] = None,
    out_dir: Path = Path("out/benchmark"),
    isolate: bool = True,
    timeout: Optional[float] = None,
    threads: Optional[int] = None,
    seed: int = 1234,
) -> dict:
    """Benchmark a checkpoint under several precisions and quantization modes; writes JSON, Markdown and a PNG.

    Args:
        checkpoint_dir: a litquant checkpoint directory (default: the bundled model).
        modes: comma list, e.g. 32-true,bf16-true,bnb.nf4,bnb.int8,gptq.int4; `mode@precision` picks a compute
            dtype for one mode (bnb.nf4@32-true). Default: 32-true, bf16-true, every bnb 4-bit mode, bnb.int8, and
            gptq.int4 when the checkpoint has lit_model_gptq.4bit.safetensors.
        precision: compute dtype of the quantized modes (default: bf16-true on CUDA and on CPUs with bf16 support).
        accelerator: auto, cuda or cpu.
        prompt_tokens: prompt length (the start of the bundled held-out text; random ids with --random_init).
        max_new_tokens: tokens generated per run (always all of them: no stop token).
        runs: timed runs per mode (the table shows medians).
        warmup: untimed runs first.
        ppl_tokens: perplexity on the first N held-out tokens (0: skip).
        window: perplexity window (default: as `litquant evaluate`).
        random_init: random weights for the named config --model_name (speed and memory only, no perplexity).
        model_name: a named config, for --random_init (e.g. Llama-2-7b-hf).
        compile: torch.compile the decode step over the static KV cache (CUDA).
        bandwidth_gbps: peak memory bandwidth (GB/s) for the roofline column (default: known GPUs only).
        out_dir: where benchmark.json, benchmark.md and benchmark.png go.
        isolate: run each mode in its own process (fresh peak-memory counters); False runs them in this one.
        timeout: seconds allowed per mode.
        threads: CPU threads for torch (default: torch's choice, one per core).
        seed: random seed.
    """
    device = pick_device(accelerator)
    if random_init:
        if not model_name:
            raise UserError("--random_init needs --model_name (a named config, e.g. Llama-2-7b-hf)")
        config = Config.from_name(model_name)
        checkpoint = None
    else:
        if model_name:
            raise UserError("--model_name is for --random_init; to benchmark weights use --checkpoint_dir")
        opened = Checkpoint.open(checkpoint_dir)
        checkpoint, config = opened.path, opened.config
    spec = MeasureSpec(
        checkpoint_dir=str(checkpoint) if checkpoint else None,
        precision=precision,
        accelerator=device.type,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        runs=runs,
        warmup=warmup,
        ppl_tokens=ppl_tokens,
        window=window,
        random_init=random_init,
        model_name=model_name,
        compile=compile,
        seed=seed,
        threads=threads,
    )
    spec.check(config, device)
    mode_list = (
        [m.strip() for m in modes.split(",") if m.strip()]
        if modes
        else default_modes(checkpoint, random_init)
    )
    if not mode_list:
        raise UserError("no modes to benchmark")
    check_modes(mode_list, precision, device)

    if threads:
        torch.set_num_threads(threads)
    env = environment(device)
    bandwidth = (
        bandwidth_gbps * 1e9
        if bandwidth_gbps
        else (peak_bandwidth(env["device_name"]) if device.type == "cuda" else None)
    )
    settings = dict(
        checkpoint_dir=spec.checkpoint_dir,
        model_name=model_name or config.name,
        random_init=random_init,
        precision=precision,
        prompt_tokens=prompt_tokens,
        max_new_tokens=max_new_tokens,
        runs=runs,
        warmup=warmup,
        ppl_tokens=0 if random_init else ppl_tokens,
        window=window,
        compile=compile,
        seed=seed,
        isolate=isolate,
        threads=threads,
    )
    report = {"environment": env, "settings": settings, "bandwidth": bandwidth, "results": []}
    print(header(report), file=sys.stderr)
    avail = available_memory(device)
    for mode in mode_list:
        need = weights_needed(config, mode, precision, device)
        if need is not None and avail is not None and need > 0.9 * avail:
            result = failed(
                mode, f"skipped: needs ~{need / 1e9:.1f} GB of weights, {avail / 1e9:.1f} GB available"
            )
        elif isolate:
            print(f"[{mode}] measuring ...", file=sys.stderr, flush=True)
            result = measure_in_subprocess(spec.for_mode(mode), timeout)
        else:
            result = measure_or_error(spec.for_mode(mode))
        if bandwidth and "error" not in result:
            result["roofline_fraction"] = (
                result["decode_tokens_per_sec"] * result["bytes_per_decode_step"] / bandwidth
            )
        report["results"].append(result)
        if "error" in result:
            print(f"[{mode}] {result['error']}", file=sys.stderr, flush=True)

    print(format_terminal(report))
    write_report(report, out_dir)
    return report


if __name__ == "__main__":
    from litquant.errors import run_job

    run_job(main)
