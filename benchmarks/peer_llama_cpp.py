"""llama.cpp as the CPU peer: the same weights converted to GGUF, quantized by llama.cpp, timed by llama.cpp itself.

    python benchmarks/peer_llama_cpp.py --checkpoint_dir benchmarks/out/scale/1.1b [--isa avx2|native]
        [--types bf16,q8_0,q4_0,q4_k_m] [--prompt_tokens 64] [--max_new_tokens 32] [--runs 2]

What it does (scale.py --peers llama_cpp calls `run_peer` the same way):
1. a venv per ISA, `benchmarks/.venvs/llama-cpp-<isa>`, with llama-cpp-python 0.3.36 built from its sdist here
   (`native`: GGML_NATIVE=ON; `avx2`: AVX2/FMA/F16C with AVX-512 off, the build an AVX2-only CPU gets);
2. the checkpoint's HF files converted with the sdist's vendored `convert_hf_to_gguf.py` (bf16), run by this
   interpreter with the vendored gguf-py. Our bundled BPE tokenizer is a GPT-2 byte-level one, which the converter
   does not recognise by its hash: the wrapper names it `gpt-2`, the llama.cpp pre-tokenizer it is;
3. Q8_0, Q4_0 and Q4_K_M made from that file with `llama_model_quantize` (2 threads);
4. each type loaded in a fresh process (n_threads = the cores torch uses), the same prompt ids as our rows, greedy
   decoding with EOS masked, prefill and decode tok/s from llama.cpp's own counters (`llama_perf_context`: prompt
   eval and eval time), best of `runs` after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import OUT, VENVS, sh  # noqa: E402
from litquant.errors import UserError, run_guarded  # noqa: E402

VERSION = "0.3.36"
SRC = OUT / "llama_cpp_src"
VENDOR = SRC / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
CMAKE = {
    "native": "-DGGML_NATIVE=ON",
    "avx2": "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF",
}
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}  # llama_ftype values


def ensure_venv(isa: str) -> Path:
    """The venv's python, with llama_cpp importable (built from the sdist with the ISA's flags)."""
    py = VENVS / f"llama-cpp-{isa}" / "bin" / "python"
    ok = py.exists() and subprocess.run([py, "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not ok:
        print(
            f"Building llama-cpp-python {VERSION} from its sdist ({isa}); takes ~10 minutes on 2 cores",
            flush=True,
        )
        sh([sys.executable, "-m", "venv", py.parent.parent])
        env = {
            **os.environ,
            "CMAKE_ARGS": f"{CMAKE[isa]} -DGGML_OPENMP=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF",
            "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        }
        sh(
            [py, "-m", "pip", "install", "--no-cache-dir", f"llama-cpp-python=={VERSION}"],
            env=env,
            timeout=5400,
        )
    return py


def _vendored() -> Path:
    """The sdist's convert_hf_to_gguf.py (with its conversion/ and gguf-py/), unpacked under benchmarks/out."""
    script = VENDOR / "convert_hf_to_gguf.py"
    if not script.is_file():
        SRC.mkdir(parents=True, exist_ok=True)
        sh(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={VERSION}",
                "-d",
                SRC,
            ]
        )
        with tarfile.open(SRC / f"llama_cpp_python-{VERSION}.tar.gz") as t:
            prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
            keep = [
                m
                for m in t.getmembers()
                if m.name.startswith(prefix)
                and m.name[len(prefix) :].split("/")[0] in ("convert_hf_to_gguf.py", "conversion", "gguf-py")
            ]
            t.extractall(SRC, members=keep, filter="data")
    return script


_CONVERT = """
import runpy, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/gguf-py")
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"  # byte-level BPE with GPT-2's regex
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
sys.exit(rc)
"""


def gguf_files(d: Path, py: Path, types: list[str]) -> dict[str, Path]:
    """bf16 GGUF of the checkpoint's HF files, and llama.cpp's quantizations of it (cached next to it)."""
    out = OUT / "llama_cpp" / d.name
    out.mkdir(parents=True, exist_ok=True)
    bf16 = out / "model-bf16.gguf"
    if not bf16.is_file():
        if not (d / "config.json").is_file():
            raise UserError(f"{d} has no HF config.json to convert (make it with convert_lit_checkpoint)")
        tmp = bf16.with_suffix(".tmp")
        print(f"[{d.name}] convert_hf_to_gguf.py --outtype bf16", flush=True)
        sh([sys.executable, "-c", _CONVERT, _vendored().parent, d, "--outtype", "bf16", "--outfile", tmp])
        tmp.rename(bf16)
    files = {"bf16": bf16}
    for t in types:
        if t == "bf16":
            continue
        f = out / f"model-{t}.gguf"
        if not f.is_file():
            print(f"[{d.name}] llama_model_quantize {t}", flush=True)
            sh([py, "-c", _QUANTIZE, bf16, f.with_suffix(".tmp"), FTYPES[t], os.cpu_count() or 2])
            f.with_suffix(".tmp").rename(f)
        files[t] = f
    return {t: files[t] for t in types}


_TIME = """
import json, sys, time, llama_cpp
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
llm = llama_cpp.Llama(a["path"], n_ctx=len(a["ids"]) + a["new"] + 8, n_batch=512, n_threads=a["threads"],
                      n_threads_batch=a["threads"], verbose=False)
load_s = time.perf_counter() - t0
ctx = llm._ctx.ctx
best = None
for i in range(a["runs"] + 1):  # the first is a warm-up
    llm.reset()
    llama_cpp.llama_perf_context_reset(ctx)
    llm.create_completion(a["ids"], max_tokens=a["new"], temperature=0.0, top_k=1,
                          logit_bias={llm.token_eos(): -1e9})
    p = llama_cpp.llama_perf_context(ctx)
    r = dict(prefill=p.n_p_eval / (p.t_p_eval_ms / 1e3), decode=p.n_eval / (p.t_eval_ms / 1e3), n_eval=p.n_eval)
    if i and (best is None or r["decode"] > best["decode"]):
        best = r
print(json.dumps(dict(load_s=load_s, prefill_tokens_per_sec=best["prefill"], decode_tokens_per_sec=best["decode"],
                      decode_steps=best["n_eval"], file_bytes=__import__("os").path.getsize(a["path"]))))
"""


def time_type(py: Path, path: Path, ids: list[int], new: int, runs: int, threads: int) -> dict:
    arg = json.dumps(dict(path=str(path), ids=ids, new=new, runs=runs, threads=threads))
    p = sh([py, "-c", _TIME, arg], cwd=OUT)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _embedding_bytes(path: Path) -> int:
    """Bytes of the token embedding table in a GGUF file (a decode step reads one row of it)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors if t.name == "token_embd.weight")


def run_peer(d: Path, ids: list[int], isa: str, types: list[str], new: int, runs: int) -> dict:
    """{type: timings} for llama.cpp built for `isa` on the checkpoint `d`'s weights."""
    import torch

    py = ensure_venv(isa)
    files = gguf_files(d, py, types)
    res = {}
    for t, f in files.items():
        res[t] = time_type(py, f, ids, new, runs, torch.get_num_threads())
        res[t]["step_bytes"] = res[t]["file_bytes"] - _embedding_bytes(f)
        print(
            f"  llama.cpp ({isa}) {t:7s} prefill {res[t]['prefill_tokens_per_sec']:6.1f}  decode "
            f"{res[t]['decode_tokens_per_sec']:6.2f} tok/s  file {res[t]['file_bytes'] / 1e9:.2f} GB",
            flush=True,
        )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_dir", type=Path, required=True)
    p.add_argument("--isa", default="native", choices=sorted(CMAKE))
    p.add_argument("--types", default="bf16,q8_0,q4_0,q4_k_m")
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=2)
    a = p.parse_args()
    from benchmarks.peer_hf_bnb import prompt_ids

    types = a.types.split(",")
    bad = set(types) - {"bf16", *FTYPES}
    if bad:
        raise UserError(f"unknown --types {', '.join(sorted(bad))}; choose from bf16, {', '.join(FTYPES)}")
    ids = prompt_ids(a.checkpoint_dir, a.prompt_tokens)
    print(json.dumps(run_peer(a.checkpoint_dir, ids, a.isa, types, a.max_new_tokens, a.runs), indent=2))


if __name__ == "__main__":
    run_guarded(main)
