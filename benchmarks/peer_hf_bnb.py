"""Peer benchmark: litquant vs Hugging Face transformers + bitsandbytes, same weights, same prompt ids, CPU.

    python benchmarks/peer_hf_bnb.py [--checkpoint_dir checkpoints/litquant-tiny] [--modes bf16,nf4,int8]
        [--prompt_tokens 128] [--max_new_tokens 100] [--int8_max_new_tokens 20] [--runs 3] [--threads N]

What it does:
1. makes (once) a venv at benchmarks/.venvs/hf-bnb that reuses this interpreter's torch, transformers and
   bitsandbytes (`--system-site-packages`) and adds accelerate, which transformers needs for bitsandbytes
   models (`device_map="cpu"`); torch is pinned by a constraints file and checked afterwards;
2. exports the checkpoint with our converter (`litquant convert_lit_checkpoint`) to benchmarks/out/hf-<name>/;
3. for each mode, litquant and transformers each load the model in a fresh process (so peak memory is that
   run's alone; both with the same glibc allocator setting, see litquant.benchmark.CPU_MMAP_THRESHOLD), run the
   same prompt ids greedily for exactly the same number of new tokens, warm up once, and report medians;
4. prints a Markdown table with the ratios and writes benchmarks/out/peer_hf_bnb.json.

The modes, matched one to one (compute dtype bf16 on both sides, lm_head not quantized on either):
  bf16   transformers dtype=bfloat16                      litquant --precision bf16-true
  nf4    BitsAndBytesConfig(load_in_4bit, nf4, bf16)      litquant --quantize bnb.nf4 --precision bf16-true
  int8   BitsAndBytesConfig(load_in_8bit, threshold 6)    litquant --quantize bnb.int8 --precision bf16-true
transformers' int8 on CPU is bitsandbytes' reference path (it casts inputs to fp16, slow): it gets fewer
tokens (--int8_max_new_tokens), and so does litquant's int8 row, so the pair stays comparable.

tokens/sec is new tokens / wall time of the whole generation (prefill included) on both sides, as
`litquant generate` prints it; time to first token is litquant's prefill and transformers' `generate` of one
token. Model load time and process start are outside both. Memory: each process's peak resident set, and the
part of it over the process's resident set right before loading, both stacks imported by then (litquant's
includes Lightning, which transformers does not load: compare the "over baseline" figures for the model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, REPO, VENVS, sh  # noqa: E402
from benchmarks.common import ensure_venv as peer_venv  # noqa: E402
from benchmarks.common import venv_env as common_venv_env  # noqa: E402
from litquant.errors import UserError, run_guarded  # noqa: E402

ACCELERATE = "accelerate>=1.1.0,<2"
LITQUANT_MODE = {"bf16": "bf16-true", "nf4": "bnb.nf4@bf16-true", "int8": "bnb.int8@bf16-true"}


def venv_env() -> dict:
    from litquant.benchmark.environment import CPU_MMAP_THRESHOLD

    # the allocator setting litquant's runs get
    return common_venv_env(MALLOC_MMAP_THRESHOLD_=CPU_MMAP_THRESHOLD)


# ---- 1. the venv ----------------------------------------------------------------------------------------------


def ensure_venv() -> tuple[Path, dict]:
    """The venv's python (system torch/transformers/bitsandbytes + accelerate) and its package versions."""

    def install(py: Path, constraints: Path) -> None:
        print(f"Installing {ACCELERATE} into {VENVS / 'hf-bnb'}", flush=True)
        sh([py, "-m", "pip", "install", "-q", "-c", constraints, ACCELERATE], env=venv_env())

    versions = {k: k for k in ("transformers", "bitsandbytes", "accelerate")}
    return peer_venv(
        "hf-bnb",
        "import transformers, bitsandbytes, accelerate",
        versions,
        lambda i: True,
        install,
        venv_env(),
    )


# ---- 2. export ----------------------------------------------------------------------------------------------


def export(checkpoint_dir: Path) -> Path:
    """litquant checkpoint -> a Hugging Face directory (our converter), redone when the weights are newer."""
    from litquant.jobs.convert import convert_lit_checkpoint

    out = OUT / f"hf-{checkpoint_dir.name}"
    src = checkpoint_dir / "lit_model.safetensors"
    if not (out / "config.json").is_file() or (out / "config.json").stat().st_mtime < src.stat().st_mtime:
        convert_lit_checkpoint(checkpoint_dir, out)
    return out


# ---- 3. the transformers side (runs in the venv) ------------------------------------------------------------------

_HF = r"""
import json, os, resource, sys, time, warnings
warnings.filterwarnings("ignore")  # bnb int8 warns on every call that it casts inputs to fp16
import torch
spec = json.loads(sys.argv[1])
if spec["threads"]:
    torch.set_num_threads(spec["threads"])
import transformers
from transformers import AutoConfig, BitsAndBytesConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
import accelerate, bitsandbytes  # imported before the baseline, as litquant's worker imports its stack first
transformers.logging.set_verbosity_error()
model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(spec["model_dir"]))]  # imports the model code

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

quant = {
    "bf16": None,
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=False),
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
}[spec["mode"]]
baseline = rss()
t0 = time.perf_counter()
model = model_cls.from_pretrained(spec["model_dir"], dtype=torch.bfloat16, device_map="cpu", quantization_config=quant)
model.eval()
load_s = time.perf_counter() - t0
peak_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = torch.tensor([spec["ids"]])
n = spec["max_new_tokens"]
kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=model.config.eos_token_id or 0)

def gen(k):
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
    return time.perf_counter() - t, out[0, ids.shape[1]:].tolist()

runs, new = [], None
with torch.inference_mode():
    for i in range(spec["warmup"] + spec["runs"]):
        total, out = gen(n)
        ttft, _ = gen(1)
        new = new or out
        if i >= spec["warmup"]:
            runs.append(dict(total_s=total, ttft_s=ttft, new_tokens=len(out)))
print(json.dumps(dict(
    load_s=load_s, runs=runs, new_token_ids=new, baseline_memory_bytes=baseline,
    peak_memory_after_load_bytes=peak_after_load,
    peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    weight_bytes=model.get_memory_footprint(),
)))
"""


def run_hf(
    py: Path,
    model_dir: Path,
    mode: str,
    ids: list[int],
    n: int,
    runs: int,
    warmup: int,
    threads: Optional[int],
) -> dict:
    spec = dict(
        model_dir=str(model_dir),
        mode=mode,
        ids=ids,
        max_new_tokens=n,
        runs=runs,
        warmup=warmup,
        threads=threads,
    )
    p = sh([py, "-c", _HF, json.dumps(spec)], env=venv_env(), cwd=OUT)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["tokens_per_sec"] = statistics.median(r["new_tokens"] / r["total_s"] for r in res["runs"])
    res["time_to_first_token_s"] = statistics.median(r["ttft_s"] for r in res["runs"])
    return res


# ---- 4. the litquant side -----------------------------------------------------------------------------------------


def prompt_ids(checkpoint_dir: Path, prompt_tokens: int) -> list[int]:
    """The ids `litquant benchmark` uses: the start of the held-out text that re-encodes to itself."""
    from litquant.benchmark.measure import benchmark_prompt
    from litquant.tokenizer import Tokenizer

    return benchmark_prompt(Tokenizer(checkpoint_dir), prompt_tokens)[1]


def run_litquant(
    checkpoint_dir: Path,
    mode: str,
    prompt_tokens: int,
    n: int,
    runs: int,
    warmup: int,
    threads: Optional[int],
) -> dict:
    from litquant.benchmark.measure import MeasureSpec, measure_in_subprocess

    spec = MeasureSpec(
        mode=LITQUANT_MODE[mode],
        checkpoint_dir=str(checkpoint_dir),
        precision="bf16-true",
        accelerator="cpu",
        prompt_tokens=prompt_tokens,
        max_new_tokens=n,
        runs=runs,
        warmup=warmup,
        ppl_tokens=0,
        threads=threads,
    )
    res = measure_in_subprocess(spec, None)
    if "error" in res:
        raise UserError(f"litquant {mode}: {res['error']}")
    return res


# ---- 5. report ---------------------------------------------------------------------------------------------------


def _agree(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens are the same."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def table(rows: list[dict]) -> str:
    head = [
        "mode",
        "new tokens",
        "tok/s litquant / HF",
        "ratio",
        "TTFT ms litquant / HF",
        "peak MB litquant / HF",
        "over baseline MB litquant / HF",
        "same greedy tokens",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]

    def mb(r, k):
        return r[k] / 1e6

    for r in rows:
        lq, hf = r["litquant"], r["hf"]
        out.append(
            "| "
            + " | ".join(
                [
                    r["mode"],
                    str(r["max_new_tokens"]),
                    f"{lq['tokens_per_sec']:.1f} / {hf['tokens_per_sec']:.1f}",
                    f"{lq['tokens_per_sec'] / hf['tokens_per_sec']:.2f}x",
                    f"{lq['time_to_first_token_s'] * 1e3:.1f} / {hf['time_to_first_token_s'] * 1e3:.1f}",
                    f"{mb(lq, 'peak_memory_bytes'):.0f} / {mb(hf, 'peak_memory_bytes'):.0f}",
                    f"{mb(lq, 'peak_memory_bytes') - mb(lq, 'baseline_memory_bytes'):.0f} / "
                    f"{mb(hf, 'peak_memory_bytes') - mb(hf, 'baseline_memory_bytes'):.0f}",
                    f"{r['agree']}/{r['max_new_tokens']}",
                ]
            )
            + " |"
        )
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint_dir", type=Path, default=REPO / "checkpoints" / "litquant-tiny")
    ap.add_argument("--modes", default="bf16,nf4,int8")
    ap.add_argument("--prompt_tokens", type=int, default=128)
    ap.add_argument("--max_new_tokens", type=int, default=100)
    ap.add_argument("--int8_max_new_tokens", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    from litquant.benchmark.environment import environment
    from litquant.checkpoint import Checkpoint

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in LITQUANT_MODE]
    if bad:
        raise UserError(f"unknown mode(s) {bad}; choose from {', '.join(LITQUANT_MODE)}")
    ckpt = args.checkpoint_dir
    Checkpoint.open(ckpt).file()
    if args.threads:
        torch.set_num_threads(args.threads)
    py, versions = ensure_venv()
    model_dir = export(ckpt)
    ids = prompt_ids(ckpt, args.prompt_tokens)
    rows = []
    for mode in modes:
        n = args.int8_max_new_tokens if mode == "int8" else args.max_new_tokens
        print(f"[{mode}] litquant ...", file=sys.stderr, flush=True)
        lq = run_litquant(ckpt, mode, args.prompt_tokens, n, args.runs, args.warmup, args.threads)
        print(f"[{mode}] transformers ...", file=sys.stderr, flush=True)
        hf = run_hf(py, model_dir, mode, ids, n, args.runs, args.warmup, args.threads)
        rows.append(
            dict(
                mode=mode,
                max_new_tokens=n,
                litquant=lq,
                hf=hf,
                agree=_agree(lq["new_token_ids"], hf["new_token_ids"]),
            )
        )
    env = environment(torch.device("cpu"))
    env.update({f"peer_{k}": v for k, v in versions.items() if k != "torch_file"})
    report = dict(
        environment=env,
        checkpoint_dir=str(ckpt),
        prompt_tokens=len(ids),
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        rows=rows,
    )
    print(
        f"{ckpt.name} on {env['device_name']}, {env['date']}, commit {env['commit']}; torch {env['torch']}, "
        f"transformers {versions['transformers']}, bitsandbytes {versions['bitsandbytes']}, "
        f"accelerate {versions['accelerate']}; prompt {len(ids)} tokens, greedy, median of {args.runs} runs"
    )
    print()
    print(table(rows))
    (OUT / "peer_hf_bnb.json").write_text(json.dumps(report, indent=2))
    print(f"\nWrote {OUT / 'peer_hf_bnb.json'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    run_guarded(main)
