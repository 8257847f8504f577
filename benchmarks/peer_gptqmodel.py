"""Peer benchmark: `litquant quantize gptq` + `--quantize gptq.int4` vs gptqmodel, same model, same calibration set.

    python benchmarks/peer_gptqmodel.py [--checkpoint_dir checkpoints/litquant-tiny] [--n_samples 128]

What it does, in order (one run; CPU unless --accelerator cuda):
1. makes (once) a venv at benchmarks/.venvs/gptqmodel that reuses this interpreter's torch (`--system-site-packages`,
   torch pinned by a constraints file, checked afterwards): gptqmodel's requirements (read from its sdist, torch
   left out: it asks for a newer one than it needs) and then `pip install --no-deps gptqmodel`;
2. exports the checkpoint to an HF directory with our converter and draws the calibration windows once
   (`litquant.data.calibration`, the bundled training corpus by default); both tools get exactly these token ids;
3. converts with each tool as its own process, same settings (bits, group size, sym, act-order off unless asked,
   damping, true-sequential; gptqmodel's extras that we do not have are switched off: act_group_aware,
   offload_to_disk): wall time of the process, the time each tool reports for quantization, and peak RSS;
4. perplexity on the held-out text of both quantized models with our evaluator (gptqmodel's output is imported
   with `litquant convert_hf_checkpoint`, which is itself checked: it must run in litquant exactly what
   gptqmodel wrote), next to full precision;
5. gptq.int4 decoding speed: `litquant generate --quantize gptq.int4` vs gptqmodel's own runtime
   (`GPTQModel.load(...).generate`) on its own quantized model, greedy, same prompt ids, tokens/sec =
   new tokens / wall time of the whole generation (prefill included), median of --runs;
6. prints a Markdown table with the ratios and writes benchmarks/out/peer_gptqmodel.json.

gptqmodel needs GPTQMODEL_CPU_WORKERS=2 on this 2-core machine (set here).
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
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, REPO, VENVS, machine, sh  # noqa: E402
from benchmarks.common import ensure_venv as peer_venv  # noqa: E402
from benchmarks.common import venv_env as common_venv_env  # noqa: E402
from litquant.errors import UserError, run_guarded  # noqa: E402

GPTQMODEL_VERSION = "7.7.0"


def venv_env() -> dict:
    return common_venv_env(GPTQMODEL_CPU_WORKERS="2")  # gptqmodel wants a worker count on CPU


# ---------------------------------------------------------------------------------------------------------
# 1. the gptqmodel venv
# ---------------------------------------------------------------------------------------------------------


def _requirements(py: Path) -> list[str]:
    """gptqmodel's own requirements.txt (from its sdist), without torch: the system's torch must stay."""
    with tempfile.TemporaryDirectory() as tmp:
        sh(
            [
                py,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                tmp,
                f"gptqmodel=={GPTQMODEL_VERSION}",
            ],
            env=venv_env(),
        )
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = next(
                m for m in tar.getmembers() if m.name.endswith("/requirements.txt") and m.name.count("/") == 1
            )
            text = tar.extractfile(member).read().decode()
    reqs = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [r for r in reqs if not re.match(r"torch\b", r)]


def ensure_venv() -> Path:
    def install(py: Path, constraints: Path) -> None:
        print(
            f"Installing gptqmodel=={GPTQMODEL_VERSION}'s requirements into {VENVS / 'gptqmodel'}", flush=True
        )
        sh(
            [py, "-m", "pip", "install", "-q", "-c", constraints, *_requirements(py)],
            env=venv_env(),
            timeout=3600,
        )
        print(f"Installing gptqmodel=={GPTQMODEL_VERSION} (--no-deps: it asks for torch>=2.14)", flush=True)
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
                f"gptqmodel=={GPTQMODEL_VERSION}",
            ],
            env=venv_env(),
            timeout=3600,
        )

    py, _ = peer_venv(
        "gptqmodel",
        "import gptqmodel",
        {"gptqmodel": "gptqmodel"},
        lambda i: i["gptqmodel"] == GPTQMODEL_VERSION,
        install,
        venv_env(),
    )
    return py


# ---------------------------------------------------------------------------------------------------------
# 3. conversion, each tool in its own process
# ---------------------------------------------------------------------------------------------------------

# Runs in the venv: gptqmodel's documented flow (load fp model with a QuantizeConfig, quantize, save).
_QUANTIZE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from gptqmodel import GPTQModel, QuantizeConfig
a = json.loads(sys.argv[1])
windows = json.load(open(a["calibration"]))
calibration = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows]
qc = QuantizeConfig(bits=a["bits"], group_size=a["group_size"], sym=a["sym"], desc_act=a["act_order"],
                    act_group_aware=False, damp_percent=a["damp_percent"], true_sequential=True,
                    offload_to_disk=False)
t1 = time.perf_counter()
model = GPTQModel.load(a["hf_dir"], qc, device=a["device"])
model.quantize(calibration, batch_size=a["batch_size"])
t2 = time.perf_counter()
model.save(a["out_dir"])
t3 = time.perf_counter()
print(json.dumps(dict(import_s=t1 - t0, load_quantize_s=t2 - t1, save_s=t3 - t2,
                      peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)))
"""


def _timed(cmd: list, env: dict, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    p = sh(cmd, env=env, cwd=cwd, timeout=7200)
    return p, time.perf_counter() - t0


def convert_ours(checkpoint_dir: Path, out_dir: Path, a: dict) -> dict:
    cmd = [
        sys.executable,
        REPO / "quantize" / "gptq.py",
        "--checkpoint_dir",
        checkpoint_dir,
        "--output_dir",
        out_dir,
        "--bits",
        a["bits"],
        "--group_size",
        a["group_size"],
        "--sym",
        str(a["sym"]).lower(),
        "--act_order",
        str(a["act_order"]).lower(),
        "--damp_percent",
        a["damp_percent"],
        "--n_samples",
        a["n_samples"],
        "--seq_len",
        a["seq_len"],
        "--batch_size",
        a["batch_size"],
        "--seed",
        a["seed"],
        "--accelerator",
        a["accelerator"],
        "--eval_tokens",
        0,
    ]  # like for like: gptqmodel scores nothing (our quality gate is measured apart)
    p, wall = _timed(cmd, {**os.environ, "PYTHONPATH": str(REPO)}, REPO)
    quant_s = float(re.search(r"Time for quantization: ([\d.]+) sec total", p.stderr).group(1))
    peak = float(re.search(r"Memory used: ([\d.]+) GB", p.stderr).group(1))
    return dict(process_s=wall, quantize_s=quant_s, peak_memory_gb=peak)


def convert_theirs(py: Path, hf_dir: Path, out_dir: Path, calibration: Path, a: dict) -> dict:
    args = dict(
        a,
        hf_dir=str(hf_dir),
        out_dir=str(out_dir),
        calibration=str(calibration),
        device="cuda" if a["accelerator"] == "cuda" else "cpu",
    )
    p, wall = _timed([py, "-c", _QUANTIZE, json.dumps(args)], venv_env(), OUT)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(process_s=wall, quantize_s=r["load_quantize_s"], peak_memory_gb=r["peak_rss_gb"], detail=r)


# ---------------------------------------------------------------------------------------------------------
# 4. perplexity with our evaluator
# ---------------------------------------------------------------------------------------------------------


def import_theirs(checkpoint_dir: Path, their_dir: Path, dest: Path) -> Path:
    """gptqmodel's output -> a litquant GPTQ checkpoint (our importer), with the original tokenizer files."""
    from litquant.jobs.convert import convert_hf_checkpoint

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(their_dir, dest)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "tokenizer.model"):
        if (checkpoint_dir / f).is_file():
            shutil.copyfile(checkpoint_dir / f, dest / f)
    convert_hf_checkpoint(dest)
    return dest


_LOGITS = r"""
import json, sys, torch
from gptqmodel import GPTQModel
from safetensors.torch import save_file
m = GPTQModel.load(sys.argv[1], device="cpu", dtype=torch.bfloat16)
ids = torch.tensor([json.loads(sys.argv[3])])
with torch.inference_mode():
    save_file({"logits": m.model(ids).logits[0].float().contiguous()}, sys.argv[2])
"""


def check_import(py: Path, their_dir: Path, imported: Path, ids: list[int]) -> dict:
    """Our import of gptqmodel's file must compute what gptqmodel computes (to bf16 rounding: its CPU kernel)."""
    from safetensors.torch import load_file

    from litquant.checkpoint import load_model
    from litquant.precision import resolve

    f = OUT / "peer_gptqmodel_logits.safetensors"
    sh([py, "-c", _LOGITS, their_dir, f, json.dumps(ids)], env=venv_env(), cwd=OUT)
    theirs = load_file(f)["logits"]
    f.unlink()
    model = load_model(imported, resolve("bf16-true", "gptq.int4"), progress=False)
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0].float()
    diff, scale = float((ours - theirs).abs().max()), float(ours.abs().max())
    print(
        f"Import check (bf16): max |logits diff| litquant vs gptqmodel on gptqmodel's file = {diff:.3g} "
        f"(logits up to {scale:.3g})",
        flush=True,
    )
    if diff > 0.05 * scale:
        raise UserError(
            f"litquant's import of gptqmodel's checkpoint does not compute the same model ({diff:.3g})"
        )
    return dict(max_abs_logits_diff=diff, max_abs_logits=scale)


def perplexities(checkpoint_dir: Path, ours: Path, theirs: Path, bits: int, window: int) -> dict:
    from litquant.checkpoint import load_model
    from litquant.data.corpus import heldout_text
    from litquant.evaluation import perplexity
    from litquant.precision import resolve
    from litquant.tokenizer import Tokenizer

    tokens = Tokenizer(checkpoint_dir).encode(heldout_text(), bos=False)
    out = {}
    for name, d, mode in (
        ("fp", checkpoint_dir, None),
        ("litquant", ours, f"gptq.int{bits}"),
        ("gptqmodel", theirs, f"gptq.int{bits}"),
    ):
        model = load_model(d, resolve("32-true", mode), progress=False)
        out[name] = perplexity(model, tokens, window=window, batch_size=8)["perplexity"]
        print(f"  perplexity {name}: {out[name]:.3f}", flush=True)
    out["tokens"] = int(tokens.numel())
    return out


# ---------------------------------------------------------------------------------------------------------
# 5. decoding speed
# ---------------------------------------------------------------------------------------------------------

_GENERATE = r"""
import json, sys, time, torch
from gptqmodel import GPTQModel
d, ids, n, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = GPTQModel.load(d, device="cpu", dtype=torch.bfloat16)
x = torch.tensor([ids])
rates = []
with torch.inference_mode():
    m.model.generate(input_ids=x, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
    for _ in range(runs):
        t0 = time.perf_counter()
        y = m.model.generate(input_ids=x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        rates.append((y.shape[1] - x.shape[1]) / (time.perf_counter() - t0))
print(json.dumps(dict(rates=rates,
                      kinds=sorted({type(q).__name__ for q in m.model.modules() if hasattr(q, "qweight")}))))
"""
TIMING = re.compile(r"Time for inference (\d+): ([\d.]+) sec total, ([\d.]+) tokens/sec")


def speed(py: Path, ours: Path, theirs: Path, prompt: str, n: int, runs: int, bits: int) -> dict:
    from litquant.tokenizer import Tokenizer

    ids = Tokenizer(ours).encode(prompt).tolist()
    cmd = [
        sys.executable,
        "-m",
        "litquant.cli",
        "generate",
        "--checkpoint_dir",
        ours,
        "--quantize",
        f"gptq.int{bits}",
        "--precision",
        "bf16-true",
        "--prompt",
        prompt,
        "--max_new_tokens",
        n,
        "--temperature",
        "0",
        "--num_samples",
        runs + 1,
        "--batch_size",
        1,
        "--accelerator",
        "cpu",
    ]  # one at a time: timed alone
    p = sh(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    our_rates = [float(t) for _, _, t in TIMING.findall(p.stderr)][1:]  # the first sample is the warm-up
    r = json.loads(
        sh([py, "-c", _GENERATE, theirs, json.dumps(ids), n, runs], env=venv_env(), cwd=OUT)
        .stdout.strip()
        .splitlines()[-1]
    )
    res = dict(
        litquant_tok_s=statistics.median(our_rates),
        gptqmodel_tok_s=statistics.median(r["rates"]),
        samples=dict(litquant=our_rates, gptqmodel=r["rates"]),
        gptqmodel_kernels=r["kinds"],
        prompt_tokens=len(ids),
        new_tokens=n,
        precision="bf16",
    )
    print(
        f"  tokens/sec: litquant {res['litquant_tok_s']:.1f}, gptqmodel {res['gptqmodel_tok_s']:.1f} "
        f"({', '.join(r['kinds'])})",
        flush=True,
    )
    return res


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def table(meta: dict, conv: dict, ppl: dict, spd: dict) -> str:
    o, t = conv["litquant"], conv["gptqmodel"]
    rows = [
        ("conversion, whole process (s)", o["process_s"], t["process_s"]),
        ("conversion, quantization step (s)", o["quantize_s"], t["quantize_s"]),
        ("conversion, peak memory (GB, RSS)", o["peak_memory_gb"], t["peak_memory_gb"]),
        (f"held-out perplexity (fp {ppl['fp']:.3f})", ppl["litquant"], ppl["gptqmodel"]),
        ("gptq.int4 decode, bf16 (tokens/s)", spd["litquant_tok_s"], spd["gptqmodel_tok_s"]),
    ]
    lines = [
        f"{meta['date']} · {meta['cpu']} ({meta['cores']} cores) · torch {meta['torch']} · commit {meta['commit']}"
        f" · gptqmodel {GPTQMODEL_VERSION} · load average at start {meta['loadavg_1m_at_start']}",
        "",
        "| measure | litquant | gptqmodel | litquant/gptqmodel |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--model",
        default="bundled",
        choices=["bundled", "200m", "1.1b"],
        help="the bundled model, or a random Llama of benchmarks/scale.py (built and cached on first use)",
    )
    ap.add_argument(
        "--checkpoint_dir", type=Path, default=None, help="any other litquant checkpoint (overrides --model)"
    )
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group_size", type=int, default=128)
    ap.add_argument(
        "--sym",
        type=lambda s: s.lower() == "true",
        default=True,
        help="true (gptqmodel's default, and what it loads without a producer tag) or false",
    )
    ap.add_argument("--act_order", type=lambda s: s.lower() == "true", default=False)
    ap.add_argument("--damp_percent", type=float, default=0.01)
    ap.add_argument("--n_samples", type=int, default=128)
    ap.add_argument("--seq_len", type=int, default=None, help="default: the model's context, at most 2048")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--prompt", default="The Python standard library")
    ap.add_argument("--max_new_tokens", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3, help="timed generations per tool")
    args = ap.parse_args(argv)
    if args.bits != 4:
        raise UserError("the speed comparison is for gptq.int4: use --bits 4")

    from litquant.config import Config
    from litquant.data.calibration import calibration_tokens
    from litquant.jobs.convert import convert_lit_checkpoint
    from litquant.tokenizer import Tokenizer

    if args.checkpoint_dir is not None:
        checkpoint_dir = args.checkpoint_dir.resolve()
    elif args.model == "bundled":
        checkpoint_dir = REPO / "checkpoints" / "litquant-tiny"
    else:
        from benchmarks.scale import build

        checkpoint_dir = build(args.model)
    config = Config.from_checkpoint(checkpoint_dir)
    seq_len = args.seq_len or min(config.block_size, 2048)
    work = OUT / f"gptqmodel-{checkpoint_dir.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    meta = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **machine())
    py = ensure_venv()

    a = dict(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        damp_percent=args.damp_percent,
        n_samples=args.n_samples,
        seq_len=seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
        accelerator=args.accelerator,
    )
    convert_lit_checkpoint(checkpoint_dir, work / "hf-fp")
    windows = calibration_tokens(Tokenizer(checkpoint_dir), args.n_samples, seq_len, None, args.seed)
    (work / "calibration.json").write_text(json.dumps(windows.tolist()))

    print(f"Converting with litquant ({args.n_samples} x {seq_len} calibration tokens)", flush=True)
    conv = {"litquant": convert_ours(checkpoint_dir, work / "litquant", a)}
    print(f"  {conv['litquant']}", flush=True)
    print("Converting with gptqmodel", flush=True)
    conv["gptqmodel"] = convert_theirs(py, work / "hf-fp", work / "gptqmodel", work / "calibration.json", a)
    print(f"  {conv['gptqmodel']}", flush=True)

    imported = import_theirs(checkpoint_dir, work / "gptqmodel", work / "gptqmodel-lit")
    check = check_import(py, work / "gptqmodel", imported, windows[0, :64].tolist())
    print("Perplexity on the held-out text (litquant's evaluator, fp32 compute)", flush=True)
    ppl = perplexities(checkpoint_dir, work / "litquant", imported, args.bits, window=seq_len)
    print("Decoding speed", flush=True)
    spd = speed(
        py, work / "litquant", work / "gptqmodel", args.prompt, args.max_new_tokens, args.runs, args.bits
    )

    md = table(meta, conv, ppl, spd)
    print()
    print(md)
    record = dict(
        meta,
        gptqmodel_version=GPTQMODEL_VERSION,
        checkpoint=str(checkpoint_dir),
        settings=a,
        conversion=conv,
        import_check=check,
        perplexity=ppl,
        speed=spd,
        markdown=md,
    )
    (OUT / "peer_gptqmodel.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"Wrote {OUT / 'peer_gptqmodel.json'}")


if __name__ == "__main__":
    run_guarded(main)
