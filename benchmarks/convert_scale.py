"""Conversion at scale: peak RSS and time of `litquant convert_hf_checkpoint` and `convert_lit_checkpoint`.

    python benchmarks/convert_scale.py [--models 1.1b,13b] [--keep false]

1.1b is the TinyLlama-shaped random Llama of benchmarks/scale.py (built with transformers, 2.2 GB of bf16 in 3
shards). 13b has Llama-2-13B's shape (26 GB of bf16): transformers cannot build it in 24 GiB, so its HF directory is
written here shard by shard (random bf16 tensors under the HF names, a Llama config.json); it is deleted afterwards
unless --keep. Each conversion runs as its own process; the figure is that process's peak resident set (its
VmHWM, read by the child itself), runtime included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, REPO, machine  # noqa: E402
from benchmarks.scale import build  # noqa: E402
from litquant.errors import UserError, run_guarded  # noqa: E402

LLAMA_13B = dict(
    hidden_size=5120,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
    intermediate_size=13824,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    torch_dtype="bfloat16",
    hidden_act="silu",
)

# The child reports its own peak: VmHWM of the process that converted (after exec, so not inherited).
_PEAK = (
    "import atexit, sys; atexit.register(lambda: print('PEAK', [l for l in open('/proc/self/status') "
    "if l.startswith('VmHWM')][0].split()[1], file=sys.stderr)); from litquant.cli import main; main()"
)


def write_hf_13b(d: Path) -> None:
    """A Llama-2-13B-shaped HF directory of random bf16 weights, ~5 GB shards, written one tensor at a time."""
    from litquant.io import SafetensorsWriter

    if (d / "config.json").is_file():
        return
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    c = LLAMA_13B
    h, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    names = [("model.embed_tokens.weight", (v, h))]
    for i in range(n):
        p = f"model.layers.{i}."
        names += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    shards, size = [[]], 0
    for name, shape in names:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > 5e9:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        print(f"  writing {fname}", flush=True)
        plan = [(nm, torch.empty(s, dtype=torch.bfloat16, device="meta")) for nm, s in shard]
        with SafetensorsWriter(tmp / fname, plan, {"format": "pt"}) as w:
            for name, shape in shard:
                t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
                w.write(name, t.to(torch.bfloat16))
                weight_map[name] = fname
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(c, indent=2))
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "checkpoints" / "litquant-tiny" / fname, tmp / fname)
    tmp.rename(d)


def run(args: list) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-c", _PEAK, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        said = [
            line
            for line in (p.stdout + p.stderr).splitlines()
            if line.strip() and not line.startswith("PEAK")
        ]
        raise UserError(f"{' '.join(map(str, args))} failed: {(said or ['?'])[-1]}")
    peak_kb = int(next(l for l in p.stderr.splitlines() if l.startswith("PEAK")).split()[1])
    return dict(seconds=wall, peak_rss_gb=peak_kb * 1024 / 1e9, output=p.stdout + p.stderr)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="1.1b,13b")
    ap.add_argument("--keep", default="false", choices=["true", "false"])
    a = ap.parse_args(argv)
    rows = []
    for name in a.models.split(","):
        if name == "1.1b":
            src = build("1.1b")
            d = OUT / "convert-1.1b"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for f in src.iterdir():  # the HF files only (hard links: no copy)
                if f.name.startswith("model") or f.name.startswith("tokenizer") or f.name == "config.json":
                    os.link(f, d / f.name)
        elif name == "13b":
            d = OUT / "convert-13b"
            print("[13b] writing a Llama-2-13B-shaped HF checkpoint (26 GB)", flush=True)
            write_hf_13b(d)
        else:
            raise UserError(f"unknown model {name!r}: 1.1b or 13b")
        (d / "lit_model.safetensors").unlink(missing_ok=True)
        hf_bytes = sum(f.stat().st_size for f in d.glob("model*.safetensors"))
        print(f"[{name}] convert_hf_checkpoint ({hf_bytes / 1e9:.1f} GB of HF shards)", flush=True)
        r = run(["convert_hf_checkpoint", "--checkpoint_dir", d])
        rows.append(dict(model=name, job="convert_hf_checkpoint", gb=hf_bytes / 1e9, **r))
        print(f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        out = d.with_name(d.name + "-export")
        shutil.rmtree(out, ignore_errors=True)
        if name == "13b":  # the HF shards are not needed any more: the export needs their 26 GB of disk
            for f in d.glob("model*.safetensors*"):
                f.unlink()
        print(f"[{name}] convert_lit_checkpoint", flush=True)
        try:
            r = run(["convert_lit_checkpoint", "--checkpoint_dir", d, "--output_dir", out])
        finally:
            shutil.rmtree(out, ignore_errors=True)
            if name == "13b" and a.keep == "false":
                shutil.rmtree(d, ignore_errors=True)
        rows.append(dict(model=name, job="convert_lit_checkpoint", gb=hf_bytes / 1e9, **r))
        print(f"  {r['seconds']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
    m = machine()
    print(f"\n{m['cpu']} ({m['cores']} cores), commit {m['commit']}\n")
    print(
        "| model | job | weights GB | seconds | peak RSS GB (runtime included) |\n| --- | --- | ---: | ---: | ---: |"
    )
    for r in rows:
        print(f"| {r['model']} | {r['job']} | {r['gb']:.1f} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |")
    return rows


if __name__ == "__main__":
    run_guarded(main)
