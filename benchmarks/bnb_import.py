"""Importing a pre-quantized bitsandbytes checkpoint: peak RSS and time of `litquant convert_hf_checkpoint` on a
1.1B `*-bnb-4bit`-style model, and how fast generation then loads it against quantizing the full-precision model
on load.

    python benchmarks/bnb_import.py

The source is the TinyLlama-shaped random Llama of benchmarks/scale.py (bf16). transformers + bitsandbytes quantize
it on CPU as the hub's `*-bnb-4bit` models are made (nf4, double quantization, bf16 compute, uint8 storage) and
save_pretrained it (cached in benchmarks/out/bnb_import/). Every step runs as its own process; its figure is that
process's peak resident set (VmHWM), runtime included; "runtime" is the same process doing nothing
(`convert_hf_checkpoint --help`: torch, transformers-free litquant imported). Load times are those `litquant
generate` prints ("Time to load the model"), the best of two runs (the page cache warm for both).
Targets (issue 18): import peak <= 1.2 x the 4-bit files + runtime; loading the import >= 3x faster than
`--quantize bnb.nf4-dq` on the full-precision checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, machine  # noqa: E402
from benchmarks.convert_scale import run  # noqa: E402
from benchmarks.scale import build  # noqa: E402
from litquant.errors import run_guarded  # noqa: E402

MODE = "bnb.nf4-dq"
_QUANTIZE = (
    "import sys, torch, transformers as T; "
    "q = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
    "bnb_4bit_compute_dtype=torch.bfloat16); "
    "m = T.AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, dtype=torch.bfloat16); "
    "m.save_pretrained(sys.argv[2], max_shard_size='1GB')"
)


def make_bnb_4bit(src: Path) -> Path:
    """benchmarks/out/bnb_import/tinyllama-1.1b-bnb-4bit: `src` quantized and saved by transformers."""
    d = OUT / "bnb_import" / "tinyllama-1.1b-bnb-4bit"
    if not (d / "config.json").is_file():
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        print("[bnb] transformers + bitsandbytes quantize the 1.1B model (nf4, double quant)", flush=True)
        subprocess.run([sys.executable, "-c", _QUANTIZE, str(src), str(tmp)], check=True, cwd=OUT)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, tmp / f)
        tmp.rename(d)
    return d


def fresh_copy(src: Path, name: str) -> Path:
    """A directory of hard links to `src`'s HF files (no copy), without litquant's outputs."""
    d = OUT / "bnb_import" / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.startswith(("lit_model", "model_config")):
            os.link(f, d / f.name)
    return d


def load_seconds(checkpoint_dir: Path) -> dict:
    """`litquant generate --quantize MODE` from `checkpoint_dir`, twice: the best load time and that run's peak."""
    args = ["generate", "--checkpoint_dir", checkpoint_dir, "--quantize", MODE, "--accelerator", "cpu"]
    best: Optional[dict] = None
    for _ in range(2):
        r = run([*args, "--prompt", "Hello", "--max_new_tokens", "4"])
        r["load_s"] = float(re.search(r"Time to load the model: ([\d.]+) seconds", r["output"]).group(1))
        best = r if best is None or r["load_s"] < best["load_s"] else best
    return best


def main(argv: Optional[list[str]] = None) -> dict:
    src = build("1.1b")
    hf = make_bnb_4bit(src)
    four_bit = sum(f.stat().st_size for f in hf.glob("model*.safetensors")) / 1e9
    runtime = run(["convert_hf_checkpoint", "--help"])["peak_rss_gb"]
    d = fresh_copy(hf, "import")
    print(f"[import] convert_hf_checkpoint on {four_bit:.3f} GB of bnb 4-bit shards", flush=True)
    imp = run(["convert_hf_checkpoint", "--checkpoint_dir", d])
    lit = d / f"lit_model_bnb.{MODE.removeprefix('bnb.')}.safetensors"
    print(f"  {imp['seconds']:.1f} s, peak RSS {imp['peak_rss_gb']:.3f} GB", flush=True)
    print(f"[load] generate --quantize {MODE} from the import", flush=True)
    pre = load_seconds(d)
    print(
        f"[load] generate --quantize {MODE} from the full-precision checkpoint (quantized on load)",
        flush=True,
    )
    fp = load_seconds(src)
    budget = 1.2 * four_bit + runtime
    m = machine()
    print(f"\n{m['cpu']} ({m['cores']} cores), torch {m['torch']}, commit {m['commit']}\n")
    print("| step | file read | seconds | peak RSS GB (runtime included) |\n| --- | --- | ---: | ---: |")
    print(f"| runtime (`convert_hf_checkpoint --help`) | - | - | {runtime:.3f} |")
    print(
        f"| import (`convert_hf_checkpoint`) | {four_bit:.3f} GB bnb shards | {imp['seconds']:.1f} | "
        f"{imp['peak_rss_gb']:.3f} |"
    )
    print(
        f"| load the import (`generate --quantize {MODE}`) | {lit.name} ({lit.stat().st_size / 1e9:.3f} GB) | "
        f"{pre['load_s']:.2f} | {pre['peak_rss_gb']:.3f} |"
    )
    fp_bytes = (src / "lit_model.safetensors").stat().st_size / 1e9
    print(
        f"| quantize on load (`generate --quantize {MODE}`) | lit_model.safetensors ({fp_bytes:.3f} GB bf16) | "
        f"{fp['load_s']:.2f} | {fp['peak_rss_gb']:.3f} |"
    )
    ratio = fp["load_s"] / pre["load_s"]
    print(
        f"\nimport peak {imp['peak_rss_gb']:.3f} GB vs budget 1.2 x {four_bit:.3f} + {runtime:.3f} = {budget:.3f} GB "
        f"({'met' if imp['peak_rss_gb'] <= budget else 'NOT met'}); load {ratio:.1f}x faster than quantizing on "
        f"load ({'met' if ratio >= 3 else 'NOT met'}, target 3x)"
    )
    shutil.rmtree(d, ignore_errors=True)
    return dict(runtime=runtime, four_bit=four_bit, imp=imp, pre=pre, fp=fp)


if __name__ == "__main__":
    run_guarded(main)
