"""The measurement stages of benchmarks/gpu_check.sh (run that, not this): 7B-shaped decode, QLoRA step, GPTQ blocks.

    python benchmarks/gpu_check.py --out DIR --seconds 400 [--dry-run]

Each stage runs in a process of its own with a share of the seconds left, so a stage that hangs or runs out of
memory costs its share and no more; what finished is written (gpu_check.json and gpu_check.md in --out) even if a
later stage did not. --dry-run runs the same stages on CPU with the tiny test config and few tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = "bf16-true,bnb.nf4,bnb.nf4-dq,bnb.int8,gptq.int4"


def qlora_step(
    model_name: str, device: str, micro_batch_size: int = 1, seq_len: int = 512, steps: int = 3
) -> dict:
    """Peak memory and step time of QLoRA training steps on a random model of the named config (nf4 base in the
    device's default precision, adapters on every attention and MLP Linear, r=8, AdamW)."""
    from litquant.checkpoint import build_model
    from litquant.config import Config
    from litquant.lora import LoRAConfig, add_lora, mark_only_lora_as_trainable
    from litquant.precision import resolve
    from litquant.quantization.bnb_linear import Linear4bit
    from litquant.utils import peak_memory_bytes, reset_peak_memory

    device = torch.device(device)
    plugin = resolve(None, "bnb.nf4", device)
    config = Config.from_name(model_name)
    reset_peak_memory(device)
    model = plugin.convert_module(build_model(config, "meta"))
    model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Linear4bit):
                m.quantize_(
                    torch.randn(m.out_features, m.in_features, device=device, dtype=plugin.dtype, generator=g)
                    * 0.02
                )
        for p in model.parameters():
            p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02, generator=g)
    add_lora(
        model,
        LoRAConfig(r=8, alpha=16, dropout=0.05, query=True, key=True, value=True, projection=True, mlp=True),
        dtype=plugin.dtype,
    )
    mark_only_lora_as_trainable(model)
    model.train()
    model.max_seq_length = seq_len
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, config.vocab_size, (micro_batch_size, seq_len + 1), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    step = min(times[1:]) if len(times) > 1 else times[0]
    return {
        "model": model_name,
        "precision": plugin.precision,
        "micro_batch_size": micro_batch_size,
        "seq_len": seq_len,
        "peak_gb": peak_memory_bytes(device) / 1e9,
        "step_s": step,
        "tokens_per_sec": micro_batch_size * seq_len / step,
        "loss": loss.item(),
    }


def gptq_blocks(model_name: str, blocks: int, device: str, dry: bool) -> dict:
    """GPTQ conversion (the job, default calibration on the device) of a random model of the named config cut to
    `blocks` blocks; time and peak memory per block, extrapolated to the full depth."""
    from litquant.checkpoint import build_model, save_checkpoint
    from litquant.config import Config

    full = Config.from_name(model_name)
    vocab = max(full.vocab_size, 4096)  # the bundled tokenizer's ids (the calibration text) must fit
    config = Config.from_name(
        model_name, n_layer=blocks, vocab_size=vocab, padded_vocab_size=max(full.padded_vocab_size, vocab)
    )
    with tempfile.TemporaryDirectory(prefix="gpu-check-gptq-") as d:
        d = Path(d)
        torch.manual_seed(0)
        model = build_model(config, "cpu").to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0) if p.dim() == 1 else p.normal_(0, 0.02)
        save_checkpoint(model.state_dict(), config, d)
        del model
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).write_bytes((REPO / "checkpoints" / "litquant-tiny" / f).read_bytes())
        args = ["--n_samples", "8", "--seq_len", "32"] if dry else []
        t0 = time.perf_counter()
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "litquant.cli",
                "quantize",
                "gptq",
                "--checkpoint_dir",
                d,
                "--accelerator",
                "cuda" if device == "cuda" else "cpu",
                "--eval_tokens",
                "0",
                *map(str, args),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError((p.stderr.strip().splitlines() or ["?"])[-1])
    quant_s = float(
        next(l for l in p.stderr.splitlines() if l.startswith("Time for quantization")).split()[3]
    )
    peak = float(next(l for l in p.stderr.splitlines() if l.startswith("Memory used")).split()[2])
    calib = next((l for l in p.stderr.splitlines() if l.startswith("Quantized ")), "")
    return {
        "model": model_name,
        "blocks": blocks,
        "quantize_s": quant_s,
        "process_s": wall,
        "peak_gb": peak,
        "per_block_s": quant_s / blocks,
        "extrapolated_s": quant_s / blocks * full.n_layer,
        "n_layer": full.n_layer,
        "detail": calib,
    }


def _stage(name: str, code: str, seconds: float, out: Path) -> dict:
    """Run `code` (prints one JSON line last) in its own process within `seconds`."""
    if seconds < 20:
        return {"stage": name, "skipped": f"only {seconds:.0f} s left"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=seconds,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
        )
    except subprocess.TimeoutExpired as e:
        (out / f"{name}.log").write_text(
            ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
            + "\n"
            + (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
        )
        return {"stage": name, "error": f"stopped after {seconds:.0f} s"}
    (out / f"{name}.log").write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        return {"stage": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    result = json.loads(p.stdout.strip().splitlines()[-1])
    result.update(stage=name, seconds=round(time.perf_counter() - t0, 1))
    return result


def markdown(report: dict) -> str:
    lines = [
        f"### gpu_check {report['date']}: {report['device']}, torch {report['torch']}, commit {report['commit']}"
        + (" (dry run, CPU, tiny model)" if report["dry_run"] else ""),
        "",
    ]
    dec = report["stages"].get("decode", {})
    if "results" in dec:
        lines += [
            "| mode | compute | decode tok/s | roofline tok/s | share of roofline | weights GB | peak GB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in dec["results"]:
            if "error" in r:
                lines.append(f"| {r['mode']} | {r['error']} | | | | | |")
                continue
            bw = dec.get("bandwidth")
            roof = bw / r["bytes_per_decode_step"] if bw else None
            cells = [
                r["mode"],
                r["precision"],
                f"{r['decode_tokens_per_sec']:.1f}",
                "" if roof is None else f"{roof:.0f}",
                "" if roof is None else f"{r['decode_tokens_per_sec'] / roof:.0%}",
                f"{r['weight_bytes'] / 1e9:.2f}",
                f"{r['peak_memory_bytes'] / 1e9:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for name in ("qlora", "gptq"):
        r = report["stages"].get(name, {})
        lines.append(f"- **{name}**: " + json.dumps({k: v for k, v in r.items() if k != "stage"}))
    lines.append(
        "- **decode**: " + json.dumps({k: v for k, v in dec.items() if k not in ("results", "stage")})
    )
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=400)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + a.seconds - 10
    dry = a.dry_run
    device = "cpu" if dry else "cuda"
    name = "tiny-llama-test" if dry else "Llama-2-7b-hf"
    from litquant.benchmark.environment import git_commit

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": dry,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not dry else "cpu",
        "commit": git_commit() or "uncommitted",
        "stages": {},
    }

    def left(share: float) -> float:
        return max(0.0, (deadline - time.monotonic()) * share)

    def save() -> None:
        (a.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        (a.out / "gpu_check.md").write_text(markdown(report))

    bench_out = a.out / "decode"
    flags = [
        "--random_init",
        "true",
        "--model_name",
        name,
        "--modes",
        MODES,
        "--ppl_tokens",
        "0",
        "--runs",
        "2",
        "--out_dir",
        str(bench_out),
        "--accelerator",
        device,
        "--timeout",
        f"{left(0.5) / 5:.0f}",
    ]
    flags += (
        ["--prompt_tokens", "8", "--max_new_tokens", "8"]
        if dry
        else ["--prompt_tokens", "128", "--max_new_tokens", "128", "--compile", "true"]
    )
    code = (
        "import json, subprocess, sys; "
        f"p = subprocess.run([sys.executable, '-m', 'litquant.cli', 'benchmark', *{flags!r}]); "
        f"d = json.load(open({str(bench_out / 'benchmark.json')!r})); "
        "print(json.dumps({'results': d['results'], 'bandwidth': d['bandwidth']}))"
    )
    report["stages"]["decode"] = _stage("decode", code, left(0.5), a.out)
    save()
    code = (
        f"import json; from benchmarks.gpu_check import qlora_step; "
        f"print(json.dumps(qlora_step({name!r}, {device!r}, 1, {64 if dry else 512}, 3)))"
    )
    report["stages"]["qlora"] = _stage("qlora", code, left(0.35), a.out)
    save()
    code = (
        f"import json; from benchmarks.gpu_check import gptq_blocks; "
        f"print(json.dumps(gptq_blocks({name!r}, 2, {device!r}, {dry})))"
    )
    report["stages"]["gptq"] = _stage("gptq", code, left(0.95), a.out)
    save()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
