"""Real-size CPU benchmark: every mode at default flags on random-init Llamas of 200M and 1.1B, peers in the same run.

    python benchmarks/scale.py [--models 200m,1.1b] [--modes ...] [--peers hf_bnb,litgpt,gptqmodel,llama_cpp]
        [--emulate none|no-bf16|avx2] [--llama_isa native|avx2] [--prompt_tokens 64] [--max_new_tokens 32] [--runs 2]

What it does:
1. builds (once, cached in benchmarks/out/scale/<model>/) a random-init `LlamaForCausalLM` with transformers, saves
   it as sharded bf16 safetensors with the bundled tokenizer, converts it in place with `litquant
   convert_hf_checkpoint`, and makes a GPTQ file with `litquant quantize gptq` (a small calibration set: the file is
   for speed, its quality does not matter here);
2. for every mode, at the default `--precision` (what a user gets), loads the model in a fresh process and measures
   load time, prefill and decode tokens/sec and peak RSS (`litquant.benchmark.measure.measure_mode`);
3. in the same run, the peers on the same weights: transformers + bitsandbytes (nf4, int8; bf16 compute), litgpt
   0.5.13 (full precision, its CLI at our default precision) and gptqmodel 7.7.0 on our GPTQ file exported with
   `litquant convert_lit_checkpoint`; llama.cpp (llama-cpp-python 0.3.36 built from its sdist, `peer_llama_cpp.py`)
   on the same weights as bf16, Q8_0, Q4_0 and Q4_K_M GGUF files, built for AVX2 with `--emulate avx2` (like with
   like) and natively otherwise (`--llama_isa`);
4. measures the machine's memory bandwidth once (a triad and a read-only reduction over arrays far larger than the
   caches) and reports each decode row's bytes per token and its share of the read bandwidth;
5. records the CPU model and flags (avx512f, avx512_bf16, amx, vnni) and writes
   benchmarks/out/scale/results-<date>.{json,md}; paste the Markdown into benchmarks/RESULTS.md under the CPU's kind.

--emulate measures what other CPU kinds run on this one: `no-bf16` hides native bf16 (litquant's default and
kernel choices, oneDNN limited to AVX512_CORE), `avx2` also drops AVX-512 (torch's kernels, oneDNN and litquant's
kernels built for AVX2). The peers cannot be told the same, so their columns stay this CPU's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, REPO, machine, sh  # noqa: E402
from litquant.benchmark.environment import measured_cpu_bandwidth  # noqa: E402
from litquant.errors import UserError, run_guarded  # noqa: E402

MODELS = {  # LlamaConfig fields
    "200m": dict(
        hidden_size=1024,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    # TinyLlama-1.1B
    "1.1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
}
DEFAULT_MODES = ("full", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "gptq.int4")
EMULATE = {
    "none": {},
    "no-bf16": {"LITQUANT_NATIVE_BF16": "0", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx2": {
        "LITQUANT_NATIVE_BF16": "0",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "LITQUANT_KERNEL_CFLAGS": "-mno-avx512f",
    },
}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> dict:
    try:
        line = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        return {}
    have = set(line.split(":", 1)[1].split())
    return {f: f in have for f in FLAGS}


# ---- 1. the models -----------------------------------------------------------------------------------------


def build(name: str) -> Path:
    """benchmarks/out/scale/<name>: an HF Llama (random init, bf16 shards, bundled tokenizer) converted in place,
    plus a GPTQ 4-bit file."""
    d = OUT / "scale" / name
    if not (d / "lit_model.safetensors").is_file():
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        code = (
            "import json, sys, torch, transformers; a = json.loads(sys.argv[1]); torch.manual_seed(0); "
            "cfg = transformers.LlamaConfig(**a['config'], tie_word_embeddings=False); "
            "m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16); "
            "m.save_pretrained(a['out'], safe_serialization=True, max_shard_size='1GB')"
        )
        print(f"[{name}] building a random-init Llama with transformers", flush=True)
        sh([sys.executable, "-c", code, json.dumps(dict(config=MODELS[name], out=str(tmp)))])
        bundled = REPO / "checkpoints" / "litquant-tiny"
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(bundled / f, tmp / f)
        print(f"[{name}] converting with litquant convert_hf_checkpoint", flush=True)
        sh(
            [sys.executable, "-m", "litquant.cli", "convert_hf_checkpoint", "--checkpoint_dir", tmp],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    gptq = d / "lit_model_gptq.4bit.safetensors"
    # files from before --sym true became the default: made again
    if not gptq.is_file() or not _symmetric(gptq):
        print(f"[{name}] litquant quantize gptq (8 x 128 calibration tokens: for speed only)", flush=True)
        sh(
            [
                sys.executable,
                "-m",
                "litquant.cli",
                "quantize",
                "gptq",
                "--checkpoint_dir",
                d,
                "--n_samples",
                "8",
                "--seq_len",
                "128",
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=7200,
        )
    return d


def _symmetric(path: Path) -> bool:
    from litquant.io import open_safetensors

    with open_safetensors(path) as f:
        return json.loads((f.metadata() or {}).get("quantize_config", "{}")).get("sym") is True


# ---- 2. litquant ----------------------------------------------------------------------------------------------


def run_litquant(d: Path, mode: str, a: argparse.Namespace) -> dict:
    from litquant.benchmark.measure import MeasureSpec, measure_in_subprocess

    spec = MeasureSpec(
        mode=mode,
        checkpoint_dir=str(d),
        precision=None,
        accelerator="cpu",
        prompt_tokens=a.prompt_tokens,
        max_new_tokens=a.max_new_tokens,
        runs=a.runs,
        warmup=1,
        ppl_tokens=0,
        threads=None,
    )
    if mode == "full":  # no --quantize and no --precision: what `litquant generate` runs
        from litquant.precision import default_precision

        spec = spec.for_mode(default_precision("cpu"))
    res = measure_in_subprocess(spec, 3600)
    if "error" in res:
        print(f"  {mode}: {res['error']}", flush=True)
    else:
        print(
            f"  {mode:12s} {res['description']:32s} load {res['load_s']:5.1f} s  prefill "
            f"{res['prefill_tokens_per_sec']:6.1f}  decode {res['decode_tokens_per_sec']:6.2f} tok/s  peak "
            f"{res['peak_memory_bytes'] / 1e9:.2f} GB",
            flush=True,
        )
    return res


# ---- 3. peers ----------------------------------------------------------------------------------------------------


def peer_hf_bnb(d: Path, ids: list[int], a: argparse.Namespace) -> dict:
    from benchmarks import peer_hf_bnb as hf

    py, info = hf.ensure_venv()
    out = {}
    for mode in ("nf4", "int8"):
        r = hf.run_hf(py, d, mode, ids, a.max_new_tokens, a.runs, 1, None)
        decode = statistics.median((x["new_tokens"] - 1) / (x["total_s"] - x["ttft_s"]) for x in r["runs"])
        out[mode] = dict(
            tokens_per_sec=r["tokens_per_sec"],
            decode_tokens_per_sec=decode,
            load_s=r["load_s"],
            peak_memory_bytes=r["peak_memory_bytes"],
            versions=dict(transformers=info.get("transformers"), bitsandbytes=info.get("bitsandbytes")),
        )
        print(
            f"  transformers+bnb {mode}: {r['tokens_per_sec']:.2f} tok/s (whole generation), decode {decode:.2f}",
            flush=True,
        )
    return out


def peer_litgpt(d: Path, a: argparse.Namespace) -> dict:
    from benchmarks import peer_litgpt as lg
    from litquant.benchmark.measure import benchmark_prompt
    from litquant.precision import default_precision
    from litquant.tokenizer import Tokenizer

    py = lg.ensure_venv()
    litgpt_dir = lg.convert(d, py)
    prompt, _ = benchmark_prompt(Tokenizer(d), a.prompt_tokens)
    r = lg.time_both(d, litgpt_dir, prompt, a.max_new_tokens, default_precision("cpu"), a.runs, 1, py)
    print(
        f"  litgpt {lg.LITGPT_VERSION} {r['precision']}: {r['litgpt_tok_s']:.2f} tok/s, litquant "
        f"{r['litquant_tok_s']:.2f}",
        flush=True,
    )
    return r


_GPTQMODEL_GENERATE = r"""
import json, sys, time, torch
from gptqmodel import GPTQModel
d, ids, n, runs = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = GPTQModel.load(d, device="cpu")
x = torch.tensor([ids])
rates, decode = [], []
def timed(k):
    t0 = time.perf_counter()
    y = m.model.generate(input_ids=x, max_new_tokens=k, min_new_tokens=k, do_sample=False)
    return y.shape[1] - x.shape[1], time.perf_counter() - t0
with torch.inference_mode():
    for i in range(runs + 1):
        _, t1 = timed(1)  # prefill and the first token
        new, t = timed(n)
        if i:
            rates.append(new / t)
            decode.append((new - 1) / (t - t1))
print(json.dumps(dict(rates=rates, decode=decode,
                      kinds=sorted({type(q).__name__ for q in m.model.modules() if hasattr(q, "qweight")}))))
"""


def peer_gptqmodel(d: Path, ids: list[int], a: argparse.Namespace) -> dict:
    from benchmarks import peer_gptqmodel as gm

    py = gm.ensure_venv()
    export = d.with_name(d.name + "-gptq-hf")
    source = d / "lit_model_gptq.4bit.safetensors"
    if (
        not (export / "config.json").is_file()
        or (export / "config.json").stat().st_mtime < source.stat().st_mtime
    ):
        sh(
            [
                sys.executable,
                "-m",
                "litquant.cli",
                "convert_lit_checkpoint",
                "--checkpoint_dir",
                d,
                "--output_dir",
                export,
                "--quantize",
                "gptq.int4",
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    p = sh(
        [py, "-c", _GPTQMODEL_GENERATE, export, json.dumps(ids), a.max_new_tokens, a.runs],
        env=gm.venv_env(),
        cwd=OUT,
    )
    r = json.loads(p.stdout.strip().splitlines()[-1])
    res = dict(
        tokens_per_sec=statistics.median(r["rates"]),
        decode_tokens_per_sec=statistics.median(r["decode"]),
        kernels=r["kinds"],
        version=gm.GPTQMODEL_VERSION,
    )
    print(
        f"  gptqmodel {gm.GPTQMODEL_VERSION}: {res['tokens_per_sec']:.2f} tok/s (whole generation), decode "
        f"{res['decode_tokens_per_sec']:.2f} ({', '.join(r['kinds'])})",
        flush=True,
    )
    return res


def peer_llama_cpp(d: Path, ids: list[int], a: argparse.Namespace) -> dict:
    from benchmarks import peer_llama_cpp as lc

    isa = a.llama_isa or ("avx2" if a.emulate == "avx2" else "native")
    res = lc.run_peer(d, ids, isa, ["bf16", "q8_0", "q4_0", "q4_k_m"], a.max_new_tokens, a.runs)
    return dict(isa=isa, version=lc.VERSION, types=res)


# ---- 4. report ---------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m = report["machine"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["cpu_flags"].items())
    lines = [
        f"### {report['date']}: {m['cpu']} ({m['cores']} cores), emulate={report['emulate']}",
        "",
        f"CPU flags: {flags}. torch {m['torch']}, commit {m['commit']}. Prompt {report['prompt_tokens']} "
        f"tokens, {report['max_new_tokens']} new tokens (greedy), median of {report['runs']} runs after a "
        "warm-up; tok/s (whole) = new tokens / (prefill + decode), as the peers count it.",
        "",
    ]
    for name, r in report["models"].items():
        lines += [
            f"**{name}**",
            "",
            "| mode (default flags) | compute | load s | peak RSS GB | prefill tok/s | decode tok/s | x full | "
            "tok/s (whole) | peer | peer tok/s (whole) | x peer (whole) | peer decode tok/s | x peer (decode) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        full = r["litquant"].get("full", {}).get("decode_tokens_per_sec")
        peers = {
            "bnb.nf4": ("transformers+bnb nf4", r.get("peers", {}).get("hf_bnb", {}).get("nf4")),
            "bnb.int8": ("transformers+bnb int8", r.get("peers", {}).get("hf_bnb", {}).get("int8")),
            "gptq.int4": ("gptqmodel", r.get("peers", {}).get("gptqmodel")),
        }
        lit = r.get("peers", {}).get("litgpt")
        for mode, x in r["litquant"].items():
            if "error" in x:
                lines.append(f"| {mode} | {x['error']} | | | | | | | | | | | |")
                continue
            peer, p = peers.get(mode, ("", None))
            p = p if p and "error" not in p else {}
            ptok, pdec = p.get("tokens_per_sec"), p.get("decode_tokens_per_sec")
            ratio = x["tokens_per_sec"] / ptok if ptok else None
            if mode == "full" and lit and "error" not in lit:  # both CLIs timed alike, interleaved
                peer, ptok, ratio = f"litgpt {lit['precision']} (CLIs)", lit["litgpt_tok_s"], lit["ratio"]
            cells = [
                mode,
                x["precision"],
                f"{x['load_s']:.1f}",
                f"{x['peak_memory_bytes'] / 1e9:.2f}",
                f"{x['prefill_tokens_per_sec']:.1f}",
                f"{x['decode_tokens_per_sec']:.2f}",
                f"{x['decode_tokens_per_sec'] / full:.2f}" if full else "",
                f"{x['tokens_per_sec']:.2f}",
                peer,
                "" if ptok is None else f"{ptok:.2f}",
                "" if ratio is None else f"{ratio:.2f}",
                "" if pdec is None else f"{pdec:.2f}",
                "" if pdec is None else f"{x['decode_tokens_per_sec'] / pdec:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += _llama_cpp_table(r, report.get("bandwidth_bytes_per_s"))
    return "\n".join(lines)


# our mode -> the llama.cpp type it is set beside (same bits per weight class)
LLAMA_PEER = {
    "full": "bf16",
    "bnb.int8": "q8_0",
    "bnb.nf4": "q4_0",
    "bnb.nf4-dq": "q4_0",
    "bnb.fp4": "q4_0",
    "bnb.fp4-dq": "q4_0",
    "gptq.int4": "q4_0",
}


def _llama_cpp_table(r: dict, bw: Optional[float]) -> list[str]:
    lc = r.get("peers", {}).get("llama_cpp")
    if not lc or "error" in lc:
        return []
    types = lc["types"]
    bw_txt = f"read {bw['read'] / 1e9:.1f} GB/s (triad {bw['triad'] / 1e9:.1f})" if bw else "not measured"
    bw = bw["read"] if bw else None
    lines = [
        f"Next to llama.cpp {lc['version']} ({lc['isa']} build), same weights; measured bandwidth {bw_txt}. GB/s = "
        "bytes read per decode token (every weight but the embedding table) x decode tok/s; % of the read bandwidth.",
        "",
        "| mode | decode tok/s | GB/token | GB/s | % of bandwidth | llama.cpp type | its decode tok/s | its GB/s | "
        "x llama.cpp (decode) | prefill tok/s | its prefill | x llama.cpp (prefill) |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, x in r["litquant"].items():
        t = LLAMA_PEER.get(mode)
        if "error" in x or t not in types:
            continue
        p = types[t]
        gb = x["bytes_per_decode_step"] / 1e9
        rate = gb * x["decode_tokens_per_sec"]
        prate = p["step_bytes"] / 1e9 * p["decode_tokens_per_sec"]
        cells = [
            mode,
            f"{x['decode_tokens_per_sec']:.2f}",
            f"{gb:.3f}",
            f"{rate:.1f}",
            f"{100 * rate * 1e9 / bw:.0f}%" if bw else "",
            t,
            f"{p['decode_tokens_per_sec']:.2f}",
            f"{prate:.1f}",
            f"{x['decode_tokens_per_sec'] / p['decode_tokens_per_sec']:.2f}",
            f"{x['prefill_tokens_per_sec']:.1f}",
            f"{p['prefill_tokens_per_sec']:.1f}",
            f"{x['prefill_tokens_per_sec'] / p['prefill_tokens_per_sec']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    extra = [t for t in types if t not in LLAMA_PEER.values()]
    for t in extra:
        p = types[t]
        lines.append(
            f"| (llama.cpp only) | | | | | {t} | {p['decode_tokens_per_sec']:.2f} | "
            f"{p['step_bytes'] / 1e9 * p['decode_tokens_per_sec']:.1f} | | | {p['prefill_tokens_per_sec']:.1f} | |"
        )
    lines.append("")
    return lines


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="200m,1.1b")
    p.add_argument(
        "--modes", default=",".join(DEFAULT_MODES), help="'full' = no --quantize, default --precision"
    )
    p.add_argument("--peers", default="hf_bnb,litgpt,gptqmodel,llama_cpp", help="comma list, or 'none'")
    p.add_argument("--emulate", default="none", choices=sorted(EMULATE))
    p.add_argument(
        "--llama_isa", default=None, choices=["native", "avx2"], help="default: avx2 with --emulate avx2"
    )
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise UserError(f"unknown --models {', '.join(bad)}; choose from {', '.join(MODELS)}")
    peers = [] if a.peers == "none" else a.peers.split(",")
    unknown = set(peers) - {"hf_bnb", "litgpt", "gptqmodel", "llama_cpp"}
    if unknown:
        raise UserError(f"unknown --peers {', '.join(sorted(unknown))}")

    report = dict(
        date=dt.date.today().isoformat(),
        machine=machine(),
        cpu_flags=cpu_flags(),
        emulate=a.emulate,
        bandwidth_bytes_per_s=measured_cpu_bandwidth(),  # {"triad", "read"}
        prompt_tokens=a.prompt_tokens,
        max_new_tokens=a.max_new_tokens,
        runs=a.runs,
        models={},
    )
    for name in models:
        d = build(name)
        os.environ.update(EMULATE[a.emulate])  # litquant's runs only (subprocesses read it)
        r = report["models"][name] = dict(litquant={}, peers={})
        print(f"[{name}] litquant, default flags", flush=True)
        for mode in a.modes.split(","):
            r["litquant"][mode] = run_litquant(d, mode, a)
        for k in EMULATE[a.emulate]:
            os.environ.pop(k)
        from benchmarks.peer_hf_bnb import prompt_ids

        ids = prompt_ids(d, a.prompt_tokens)
        for peer in peers:
            print(f"[{name}] peer {peer}", flush=True)
            try:
                r["peers"][peer] = {
                    "hf_bnb": lambda: peer_hf_bnb(d, ids, a),
                    "litgpt": lambda: peer_litgpt(d, a),
                    "gptqmodel": lambda: peer_gptqmodel(d, ids, a),
                    "llama_cpp": lambda: peer_llama_cpp(d, ids, a),
                }[peer]()
            except UserError as e:  # a peer that does not install or run here: say so, keep the rest
                print(f"  {peer} failed: {str(e).splitlines()[0]}", flush=True)
                lines = str(e).strip().splitlines()
                r["peers"][peer] = {
                    "error": " / ".join(dict.fromkeys([lines[0], lines[-1]]))
                }  # command, last line
    out = OUT / "scale"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    (out / f"results-{stamp}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / f"results-{stamp}.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    run_guarded(main)
