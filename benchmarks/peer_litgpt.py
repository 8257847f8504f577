"""Peer benchmark: `litquant generate` vs litgpt 0.5.13's `litgpt generate`, same weights, same prompt, CPU.

    python benchmarks/peer_litgpt.py [--checkpoint_dir checkpoints/litquant-tiny] [--max_new_tokens 200] [--runs 5]

What it does, in order:
1. makes (once) a venv at benchmarks/.venvs/litgpt that reuses this interpreter's torch
   (`--system-site-packages`, torch pinned by a constraints file, checked afterwards) and installs litgpt there;
2. converts the checkpoint the honest way: `litquant convert_lit_checkpoint` -> an HF directory -> litgpt's own
   `convert_hf_checkpoint` -> benchmarks/out/litgpt-<name>/ (model_config.yaml + lit_model.pth + tokenizer);
3. checks the conversion: both models' fp32 logits on the same ids, and both greedy generations token by token;
4. times the two CLIs alternately, `--runs` processes each per precision, and reports the median tokens/sec
   and the ratio litquant/litgpt as a Markdown table and benchmarks/out/peer_litgpt.json.

Both tools define tokens/sec the same way (read from litgpt/generate/base.py): new tokens (the stop token
included, if one is hit) / wall time of the whole generation, prefill plus every decode step. Model load
time and process start are outside both numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, REPO, VENVS, machine, sh, venv_env  # noqa: E402
from benchmarks.common import ensure_venv as peer_venv  # noqa: E402
from litquant.errors import UserError, run_guarded  # noqa: E402

LITGPT_VERSION = "0.5.13"
# `pip install litgpt==0.5.13` would also pull huggingface_hub<1.4 into the venv, where it shadows the
# system's newer one and breaks the system transformers that lightning imports (through torchmetrics).
# So litgpt goes in with --no-deps, plus the only two of its pins the system does not already satisfy.
LITGPT_EXTRA = ("jsonargparse==4.41.0", "psutil==7.2.2")
TIMING = re.compile(r"Time for inference (\d+): ([\d.]+) sec total, ([\d.]+) tokens/sec")


# ---------------------------------------------------------------------------------------------------------
# 1. the litgpt venv
# ---------------------------------------------------------------------------------------------------------


def ensure_venv() -> Path:
    """The venv's python, with litgpt installed on top of *this* torch (never a second torch)."""

    def install(py: Path, constraints: Path) -> None:
        print(f"Installing litgpt=={LITGPT_VERSION} into {VENVS / 'litgpt'}", flush=True)
        sh(
            [
                py,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "-c",
                constraints,
                f"litgpt=={LITGPT_VERSION}",
                *LITGPT_EXTRA,
            ],
            env=venv_env(),
        )

    py, _ = peer_venv(
        "litgpt",
        "import litgpt",
        {"litgpt": "litgpt"},
        lambda i: i["litgpt"] == LITGPT_VERSION,
        install,
        venv_env(),
    )
    return py


# ---------------------------------------------------------------------------------------------------------
# 2. conversion: litquant -> HF -> litgpt (litgpt's own converter)
# ---------------------------------------------------------------------------------------------------------

# Runs in the venv. litgpt's converter only knows the configs in its own table, so ours is added to that
# table first, translated field by field; a litquant field litgpt has no name for stops the conversion
# unless it is one that only matters to litquant.
_CONVERT = r"""
import json, sys
from dataclasses import fields
from pathlib import Path
import litgpt.config as C
from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint

ours, out_dir = json.loads(sys.argv[1]), Path(sys.argv[2])
known = {f.name for f in fields(C.Config)}
litquant_only = {"hf_name", "hf_model_type", "extra_hf", "rope_n_elem"}
unknown = sorted(k for k in ours if k not in known and k not in litquant_only)
if unknown:
    sys.exit(f"litgpt {C.__name__} has no fields {unknown}: cannot express this config")
cfg = {k: v for k, v in ours.items() if k in known}
org, _, hf = ours.get("hf_name", "").rpartition("/")
cfg["hf_config"] = dict(org=org or "litquant", name=hf or ours["name"])
C.configs.append(cfg)
C.name_to_config[cfg["name"]] = cfg
convert_hf_checkpoint(out_dir, model_name=cfg["name"])
"""


def convert(checkpoint_dir: Path, venv_py: Path) -> Path:
    """litquant checkpoint -> benchmarks/out/litgpt-<name>/ that `litgpt generate` loads."""
    from dataclasses import asdict

    from litquant.config import Config
    from litquant.jobs.convert import convert_lit_checkpoint

    config = Config.from_checkpoint(checkpoint_dir)
    out = OUT / f"litgpt-{checkpoint_dir.name}"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_lit_checkpoint(checkpoint_dir, tmp)  # config.json + model.safetensors + tokenizer files
    sh([venv_py, "-c", _CONVERT, json.dumps(asdict(config)), tmp], env=venv_env(), cwd=OUT)
    (tmp / "model.safetensors").unlink()  # litgpt reads lit_model.pth; no second copy of the weights
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------------------
# 3. the conversion check: same ids -> same fp32 logits, same greedy tokens
# ---------------------------------------------------------------------------------------------------------

# Runs in the venv: litgpt's tokenizer, model, weights loader and greedy generate, as `litgpt generate` uses them.
_CHECK = r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from litgpt.config import Config
from litgpt.generate.base import generate
from litgpt.model import GPT
from litgpt.prompts import PromptStyle, has_prompt_style
from litgpt.tokenizer import Tokenizer
from litgpt.utils import lazy_load

d, prompt, n, logits_file = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
config = Config.from_file(d / "model_config.yaml")
tok = Tokenizer(d)
style = PromptStyle.from_config(config)
styled = style.apply(prompt)
ids = tok.encode(styled).long()
model = GPT(config)
model.load_state_dict(lazy_load(d / "lit_model.pth"))
model.eval()
with torch.inference_mode():
    logits = model(ids.view(1, -1))[0]
    model.max_seq_length = ids.numel() + n
    model.set_kv_cache(batch_size=1)
    out = generate(model, ids, ids.numel() + n, temperature=0.0, top_k=1, eos_id=tok.eos_id, include_prompt=False)
save_file({"logits": logits.float().contiguous()}, logits_file)
print(json.dumps(dict(ids=ids.tolist(), new=out.tolist(), styled=styled == prompt, prompt_style=type(style).__name__,
                      has_prompt_style_file=has_prompt_style(d), eos_id=tok.eos_id)))
"""


def check_conversion(checkpoint_dir: Path, litgpt_dir: Path, venv_py: Path, prompt: str, n: int) -> dict:
    from safetensors.torch import load_file

    from litquant.checkpoint import load_model
    from litquant.generation import generate
    from litquant.tokenizer import Tokenizer

    logits_file = OUT / "peer_litgpt_logits.safetensors"
    p = sh([venv_py, "-c", _CHECK, litgpt_dir, prompt, n, logits_file], env=venv_env(), cwd=OUT)
    theirs = json.loads(p.stdout.strip().splitlines()[-1])
    their_logits = load_file(logits_file)["logits"]
    logits_file.unlink()

    tokenizer = Tokenizer(checkpoint_dir)
    ids = tokenizer.encode(prompt)
    if ids.tolist() != theirs["ids"]:
        raise UserError(
            f"the tokenizers disagree on the prompt: litquant {ids.tolist()} vs litgpt {theirs['ids']} "
            f"(litgpt prompt style {theirs['prompt_style']})"
        )
    model = load_model(checkpoint_dir, None, "cpu", progress=False)  # None = 32-true
    with torch.inference_mode():
        our_logits = model(ids.view(1, -1))[0].float()
        model.set_kv_cache(batch_size=1, max_seq_length=ids.numel() + n, device=torch.device("cpu"))
        result = generate(model, ids, n, temperature=0.0, stop_ids=tokenizer.stop_ids)
    diff = (our_logits - their_logits).abs().max().item()
    scale = our_logits.abs().max().item()
    ours_new = result.new_tokens.tolist()
    same_tokens = ours_new == theirs["new"]
    print(
        f"Conversion check (fp32, {ids.numel()} prompt tokens): max |logits diff| = {diff:.3g} "
        f"(logits up to {scale:.3g}); greedy {n} tokens identical: {same_tokens} "
        f"(litquant {len(ours_new)}, litgpt {len(theirs['new'])} new tokens)",
        flush=True,
    )
    if diff > 1e-4 * max(1.0, scale):
        raise UserError(f"the converted litgpt model does not match: max |logits diff| {diff:.3g}")
    if len(ours_new) != len(theirs["new"]):
        raise UserError(
            "the two tools would generate different numbers of tokens for this prompt; try another --prompt"
        )
    if len(ours_new) < n:
        print(
            f"warning: both stop at an end-of-sequence token after {len(ours_new)} of {n} tokens; "
            "the timing stays fair (same tokens) but is shorter; another --prompt may avoid it",
            flush=True,
        )
    return dict(
        max_abs_logits_diff=diff,
        max_abs_logits=scale,
        greedy_tokens_identical=same_tokens,
        prompt_tokens=ids.numel(),
        new_tokens=len(ours_new),
    )


# ---------------------------------------------------------------------------------------------------------
# 4. timing
# ---------------------------------------------------------------------------------------------------------


def _timings(p: subprocess.CompletedProcess, warmup: int) -> list[tuple[float, float]]:
    """(seconds, tokens/sec) of every sample after the first `warmup` ones."""
    found = [(float(s), float(t)) for _, s, t in TIMING.findall(p.stderr)]
    if len(found) <= warmup:
        raise UserError(f"no 'Time for inference' lines in the output:\n{(p.stdout + p.stderr)[-2000:]}")
    return found[warmup:]


def time_both(
    checkpoint_dir: Path,
    litgpt_dir: Path,
    prompt: str,
    n: int,
    precision: str,
    runs: int,
    warmup: int,
    venv_py: Path,
) -> dict:
    common = [
        "--prompt",
        prompt,
        "--max_new_tokens",
        n,
        "--temperature",
        "0",
        "--top_k",
        "1",
        "--precision",
        precision,
        "--num_samples",
        warmup + 1,
    ]
    ours_cmd = [
        sys.executable,
        "-m",
        "litquant.cli",
        "generate",
        "--checkpoint_dir",
        checkpoint_dir,
        *common,
        "--batch_size",
        "1",
    ]  # samples one after another, as litgpt runs them
    theirs_cmd = [VENVS / "litgpt" / "bin" / "litgpt", "generate", litgpt_dir, *common]
    ours_env = {**os.environ, "PYTHONPATH": str(REPO)}
    samples: dict[str, list[tuple[float, float]]] = {"litquant": [], "litgpt": []}
    jobs = [("litquant", ours_cmd, ours_env, REPO), ("litgpt", theirs_cmd, venv_env(), OUT)]
    for r in range(runs):  # interleaved, first one then the other first, so outside load hits both alike
        for name, cmd, env, cwd in jobs if r % 2 == 0 else jobs[::-1]:
            samples[name] += _timings(sh(cmd, env=env, cwd=cwd), warmup)
        print(
            f"  {precision} run {r + 1}/{runs}: litquant {samples['litquant'][-1][1]:.1f} tok/s, "
            f"litgpt {samples['litgpt'][-1][1]:.1f} tok/s",
            flush=True,
        )
    med = {k: statistics.median(t for _, t in v) for k, v in samples.items()}
    # tokens implied by each line (time is printed with 2 decimals, so this is approximate)
    implied = {k: round(statistics.median(s * t for s, t in v)) for k, v in samples.items()}
    return dict(
        precision=precision,
        litquant_tok_s=med["litquant"],
        litgpt_tok_s=med["litgpt"],
        ratio=med["litquant"] / med["litgpt"],
        implied_new_tokens=implied,
        samples={k: [t for _, t in v] for k, v in samples.items()},
    )


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def table(meta: dict, rows: list[dict]) -> str:
    lines = [
        "| date | machine | torch | commit | precision | litquant tok/s | litgpt tok/s | litquant/litgpt |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {meta['date']} | {meta['cpu']} ({meta['cores']} cores) | {meta['torch']} | {meta['commit']} "
            f"| {r['precision']} | {r['litquant_tok_s']:.1f} | {r['litgpt_tok_s']:.1f} | {r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--checkpoint_dir", type=Path, default=REPO / "checkpoints" / "litquant-tiny")
    ap.add_argument("--prompt", default="The Python standard library")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5, help="processes per tool and precision")
    ap.add_argument("--warmup", type=int, default=1, help="samples per process run before the timed one")
    ap.add_argument("--precision", nargs="+", default=["32-true", "bf16-true"])
    args = ap.parse_args(argv)
    if args.runs < 1 or args.max_new_tokens < 1 or args.warmup < 0:
        raise UserError("--runs and --max_new_tokens must be at least 1, --warmup at least 0")
    checkpoint_dir = args.checkpoint_dir.resolve()
    OUT.mkdir(parents=True, exist_ok=True)

    meta = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **machine())
    venv_py = ensure_venv()
    litgpt_dir = convert(checkpoint_dir, venv_py)
    print(f"litgpt checkpoint: {litgpt_dir}", flush=True)
    check = check_conversion(checkpoint_dir, litgpt_dir, venv_py, args.prompt, args.max_new_tokens)
    rows = [
        time_both(
            checkpoint_dir, litgpt_dir, args.prompt, args.max_new_tokens, p, args.runs, args.warmup, venv_py
        )
        for p in args.precision
    ]
    for r in rows:
        if any(
            abs(v - check["new_tokens"]) > 0.02 * check["new_tokens"] + 1
            for v in r["implied_new_tokens"].values()
        ):
            print(
                f"warning: {r['precision']}: tokens implied by the timing lines {r['implied_new_tokens']} differ "
                f"from the {check['new_tokens']} expected",
                flush=True,
            )

    md = table(meta, rows)
    print()
    print(md)
    print(
        f"\nlitgpt {LITGPT_VERSION}; {check['new_tokens']} new tokens after a {check['prompt_tokens']}-token prompt; "
        f"greedy; median of {args.runs} runs per tool (each after {args.warmup} warm-up sample); "
        f"load average at start {meta['loadavg_1m_at_start']}"
    )
    record = dict(
        meta,
        litgpt_version=LITGPT_VERSION,
        checkpoint=str(checkpoint_dir),
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        runs=args.runs,
        warmup=args.warmup,
        conversion_check=check,
        results=rows,
        markdown=md,
    )
    (OUT / "peer_litgpt.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {OUT / 'peer_litgpt.json'}")


if __name__ == "__main__":
    run_guarded(main)
