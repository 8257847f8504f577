"""One command, one comparison table: `litquant benchmark --checkpoint_dir ... --modes 32-true,bf16-true,bnb.nf4`.

For each mode: load the model, warm up, then `--runs` greedy generations of exactly `--max_new_tokens` tokens
after a `--prompt_tokens` prompt (the start of the bundled held-out text), and report the medians of
  prefill tokens/sec   prompt tokens / prefill time (one forward over the prompt, first token sampled)
  decode tokens/sec    decode steps / decode time (one token per forward, KV cache)
  time to first token  = the prefill time
  tokens/sec           new tokens / (prefill + decode): the figure `litquant generate` prints
plus peak memory, weight bytes and perplexity on the first `--ppl_tokens` held-out tokens (window/stride as
`litquant evaluate`). The same `generate()` and `perplexity()` as the generate and evaluate jobs compute them,
so `litquant evaluate --max_tokens <ppl_tokens>` prints the same perplexity.

Each mode runs in a fresh subprocess, so "peak memory" is that mode's alone: CUDA's peak allocated bytes, or
on CPU the process's peak resident set (which includes the ~0.5 GB of the Python/torch libraries: the JSON's
`baseline_memory_bytes` is the resident set right before loading; see CPU_MMAP_THRESHOLD for the allocator).

`--random_init true --model_name Llama-2-7b-hf` measures speed and memory of a real model size without weights:
the model is built on the meta device and each tensor is drawn and handed to the precision plugin one at a
time, exactly as a checkpoint's tensors are, so no full-precision copy of the model ever exists.
On CUDA, `--compile` compiles the decode step over the static KV cache (`generation.compiled_decode_step`), and
the table shows the fraction of the memory-bandwidth roofline each mode reaches (weights + KV cache read per
decoded token x tokens/sec / peak bandwidth).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR
from litquant.errors import UserError
from litquant.quantization.gptq_plugin import gptq_file

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODES = ("32-true", "bf16-true", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "gptq.int4")
PRECISION_MODES = ("32-true", "16-true", "bf16-true")
GPTQ_FILE = gptq_file(4)  # what the default gptq.int4 mode reads
# CPU workers: glibc serves allocations from 1 MiB up with mmap and returns them to the OS when freed. Its default
# threshold grows with the sizes freed, after which freed per-layer temporaries (loading, quantizing) stay in the
# heap and the peak resident set of the same run varies by hundreds of MB: this keeps "peak memory" what a mode
# needs, not allocator luck. (Decode-time tensors are far below 1 MiB: speed is unaffected.)
CPU_MMAP_THRESHOLD = "1048576"

# peak memory bandwidth (bytes/s) by device-name fragment, most specific first
BANDWIDTH = [
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
    ("L40S", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("RTX 4090", 1.008e12), ("T4", 0.32e12),
]


# ---- one mode, measured inside its own process --------------------------------------------------------------


def split_mode(mode: str, precision: Optional[str]) -> tuple[str, Optional[str]]:
    """'bf16-true' -> ('bf16-true', None); 'bnb.nf4' -> (precision, 'bnb.nf4'); 'bnb.nf4@32-true' -> ('32-true', ...)."""
    if "@" in mode:
        quant, _, prec = mode.partition("@")
        return prec, (None if quant in PRECISION_MODES else quant)
    if mode in PRECISION_MODES:
        return mode, None
    return precision, mode


def default_quant_precision(device: torch.device) -> str:
    """Compute dtype of quantized modes without --precision: the registry's default for the device (bf16 where
    the hardware computes in it natively)."""
    from litquant.precision import default_precision

    return default_precision(device)


def random_model(config, plugin, device: torch.device, seed: int = 1234, std: float = 0.02):
    """A GPT with random weights built the way `load_model` builds one: on meta, Linears swapped by the plugin,
    then each tensor drawn on the device and handed over (a quantized Linear quantizes it at once; a GPTQ
    layer gets it rounded to its grid and packed), so at most one layer's full-precision weight exists."""
    from litquant.checkpoint import build_model

    model = build_model(config, "meta")
    shapes = [(k, tuple(t.shape)) for k, t in model.state_dict().items()]
    model = plugin.convert_module(model, plugin.load_plan(None))
    gen = torch.Generator(device=device).manual_seed(seed)
    for key, shape in shapes:
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        t = torch.empty(shape, dtype=plugin.dtype, device=device)
        if attr == "bias":
            t.zero_()
        elif len(shape) == 1:  # norm weights
            t.fill_(1.0)
        else:
            t.normal_(0.0, std, generator=gen)
        loader = getattr(module, "load_litquant_tensor", None)
        if loader is not None and attr == "weight" and "qzeros" in module._buffers:
            # a GPTQ layer takes only its packed file tensors: round the random weight to its grid (RTN)
            from litquant.quantization.gptq import rtn_quantize

            for name, packed in rtn_quantize(t, module.bits, module.group_size).pack().items():
                loader(name, packed, device, plugin.dtype)
        elif loader is not None:
            loader(attr, t, device, plugin.dtype)
        else:
            setattr(module, attr, torch.nn.Parameter(t, requires_grad=False))
        del t
    model = plugin.after_load(model)
    return model.eval()


def benchmark_prompt(tokenizer, n: int) -> tuple[str, list[int]]:
    """(text, ids): the start of the bundled held-out text, at most `n` tokens, such that `tokenizer.encode(text)`
    gives exactly `ids`, so `litquant generate --prompt <text>` (and peers fed the ids) see the same prompt."""
    from litquant.evaluation import heldout_tokens

    ids = heldout_tokens(tokenizer, n).tolist()
    for _ in range(4):  # decode/encode round trips settle in a step or two (a merge across the cut)
        text = tokenizer.decode(ids)
        again = tokenizer.encode(text).tolist()
        if again == ids:
            return text, ids
        ids = again[:n]
    raise UserError("cannot cut the held-out text into a prompt that re-encodes to itself with this tokenizer")


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_stats(runs: list[dict]) -> dict:
    """Per-run timings -> the medians the table shows."""
    return {
        "prefill_tokens_per_sec": _median([r["prompt_tokens"] / r["prefill_s"] for r in runs]),
        "decode_tokens_per_sec": _median([r["decode_steps"] / r["decode_s"] for r in runs if r["decode_steps"]]),
        "time_to_first_token_s": _median([r["prefill_s"] for r in runs]),
        "tokens_per_sec": _median([r["new_tokens"] / (r["prefill_s"] + r["decode_s"]) for r in runs]),
    }


def measure_mode(
    mode: str,
    checkpoint_dir: Optional[str],
    precision: Optional[str],
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
    seed: int = 1234,
    threads: Optional[int] = None,
) -> dict:
    """Load one mode and measure it (meant to run in a process of its own, see `main`)."""
    from litquant.config import Config
    from litquant.estimate import kv_cache_bytes
    from litquant.evaluation import DEFAULT_BATCH_SIZE, check_window, heldout_tokens
    from litquant.evaluation import perplexity
    from litquant.generation import compiled_decode_step, generate
    from litquant.precision import pick_accelerator, setup_fabric
    from litquant.utils import current_rss_bytes, peak_memory_bytes, reset_peak_memory, weight_bytes_by_dtype

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if pick_accelerator(accelerator) == "cuda" else "cpu")
    prec, quantize = split_mode(mode, precision)  # None: the registry's default for the mode on this device
    if compile and device.type != "cuda":
        raise UserError("--compile is for CUDA; on CPU run without it")
    fabric, plugin = setup_fabric(prec, quantize, accelerator=device.type)
    torch.manual_seed(seed)
    baseline = current_rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    if random_init:
        config = Config.from_name(model_name)
        model = random_model(config, plugin, device, seed)
        tokenizer = None
    else:
        from litquant.checkpoint import load_model
        from litquant.tokenizer import Tokenizer

        model = load_model(checkpoint_dir, plugin, device, progress=False)
        config = model.config
        tokenizer = Tokenizer(checkpoint_dir)
    model = fabric.setup_module(model, move_to_device=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    by_dtype = weight_bytes_by_dtype(model)  # before any forward: CPU kernels may keep layouts of their own
    peak_after_load = peak_memory_bytes(device)

    if prompt_tokens + max_new_tokens > config.block_size:
        raise UserError(f"--prompt_tokens {prompt_tokens} + --max_new_tokens {max_new_tokens} exceed the model's "
                        f"context of {config.block_size} tokens")
    prompt_text = None
    if tokenizer is not None:
        prompt_text, ids = benchmark_prompt(tokenizer, prompt_tokens)
        prompt = torch.tensor(ids, device=device)
    else:
        prompt = torch.randint(0, config.vocab_size, (prompt_tokens,), device=device,
                               generator=torch.Generator(device=device).manual_seed(seed))
    model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + max_new_tokens, device=device)
    step = compiled_decode_step(model) if compile else None

    records, new_ids = [], None
    for i in range(warmup + runs):
        with fabric._precision.forward_context():
            res = generate(model, prompt, max_new_tokens, temperature=0.0, decode_step=step)
        if i >= warmup:
            records.append(dict(prompt_tokens=int(prompt.numel()), new_tokens=int(res.new_tokens.numel()),
                                prefill_s=res.prefill_s, decode_s=res.decode_s, decode_steps=res.decode_steps))
        if new_ids is None:
            new_ids = res.new_tokens.tolist()
    text = tokenizer.decode(prompt.tolist() + new_ids) if tokenizer is not None else None
    peak = peak_memory_bytes(device)

    ppl = None
    if ppl_tokens and tokenizer is not None:
        model.clear_kv_cache()
        model.max_seq_length = config.block_size
        w, s = check_window(window, None, config.block_size)
        with fabric._precision.forward_context():
            ppl = perplexity(model, heldout_tokens(tokenizer, ppl_tokens), w, s, batch_size=DEFAULT_BATCH_SIZE)
        ppl.update(window=w, stride=s)

    wbytes = sum(by_dtype.values())
    kv_bytes = kv_cache_bytes(config, prompt.numel() + max_new_tokens, 1, torch.finfo(plugin.dtype).bits // 8)
    wte_bytes = config.padded_vocab_size * config.n_embd * torch.finfo(plugin.dtype).bits // 8
    return {
        "mode": mode,
        "precision": plugin.precision,
        "quantize": quantize,
        "description": plugin.describe(),
        "load_s": load_s,
        "weight_bytes": wbytes,
        "weight_bytes_by_dtype": by_dtype,
        # what one decode step reads: every weight but the embedding table (one row), and the static KV cache
        "bytes_per_decode_step": wbytes - wte_bytes + kv_bytes,
        "baseline_memory_bytes": baseline,
        "peak_memory_after_load_bytes": peak_after_load,
        "peak_memory_bytes": peak,
        "runs": records,
        **run_stats(records),
        "perplexity": ppl["perplexity"] if ppl else None,
        "ppl": ppl,
        "prompt_text": prompt_text,
        "new_token_ids": new_ids,
        "text": text,
        "compiled": compile,
    }


def _worker(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    out = Path(spec.pop("result_file"))
    try:
        result = measure_mode(**spec)
    except UserError as e:
        result = {"mode": spec["mode"], "error": str(e)}
    out.write_text(json.dumps(result))


# ---- the driver ---------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> Optional[str]:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device.type,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bitsandbytes": version("bitsandbytes"),
        "lightning": version("lightning"),
        "python": platform.python_version(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", CPU_MMAP_THRESHOLD) if device.type == "cpu" else None,
        "commit": git_commit(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """HEAD of the repository litquant runs from, '+dirty' when it has uncommitted changes (None: not a repo)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def peak_bandwidth(device_name: str) -> Optional[float]:
    return next((bw for frag, bw in BANDWIDTH if frag in device_name), None)


def available_memory(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_modes(checkpoint_dir: Optional[Path], random_init: bool) -> list[str]:
    from litquant.precision import quantize_modes

    registered = set(quantize_modes())
    modes = []
    for m in DEFAULT_MODES:
        if m in PRECISION_MODES:
            modes.append(m)
        elif m not in registered:
            print(f"Skipping {m}: not available in this install", file=sys.stderr)
        elif m.startswith("gptq.") and (random_init or checkpoint_dir is None or not (checkpoint_dir / GPTQ_FILE).is_file()):
            if not random_init:
                print(f"Skipping {m}: no {GPTQ_FILE} (make one with `litquant quantize gptq`)", file=sys.stderr)
        else:
            modes.append(m)
    return modes


def measure_in_subprocess(spec: dict, timeout: Optional[float]) -> dict:
    with tempfile.TemporaryDirectory(prefix="litquant-bench-") as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps({**spec, "result_file": str(result_file)}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        if spec["accelerator"] == "cpu":
            env.setdefault("MALLOC_MMAP_THRESHOLD_", CPU_MMAP_THRESHOLD)
        try:
            proc = subprocess.run([sys.executable, "-m", "litquant.benchmark", "--_worker", str(spec_file)],
                                  capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"mode": spec["mode"], "error": f"timed out after {timeout:.0f} s"}
        if result_file.is_file():
            return json.loads(result_file.read_text())
        tail = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else (tail[-1] if tail else f"exit {proc.returncode}")
        return {"mode": spec["mode"], "error": f"failed: {why}"}


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _unit(results: list[dict]) -> tuple[str, float]:
    """GB, or MB when every model in the table is under 1 GB of weights (the bundled one is a few MB)."""
    ok = [r["weight_bytes"] for r in results if "error" not in r]
    return ("MB", 1e6) if ok and max(ok) < 1e9 else ("GB", 1e9)


def table_rows(results: list[dict], roofline: bool) -> tuple[list[str], list[list[str]]]:
    unit, div = _unit(results)
    cols = ["mode", "load s", f"weights {unit}", f"peak mem {unit}", "prefill tok/s", "decode tok/s", "TTFT ms",
            "tok/s", "perplexity"] + (["% of BW roofline"] if roofline else [])
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["mode"], r["error"]] + [""] * (len(cols) - 2))
            continue
        row = [r["mode"], _fmt(r["load_s"], ".2f"), _fmt(r["weight_bytes"] / div, ".3f"),
               _fmt(r["peak_memory_bytes"] / div, ".3f"), _fmt(r["prefill_tokens_per_sec"], ".1f"),
               _fmt(r["decode_tokens_per_sec"], ".1f"), _fmt(r["time_to_first_token_s"] * 1000, ".1f"),
               _fmt(r["tokens_per_sec"], ".1f"), _fmt(r["perplexity"], ".3f")]
        if roofline:
            row.append(_fmt(r.get("roofline_fraction") and 100 * r["roofline_fraction"], ".1f"))
        rows.append(row)
    return cols, rows


def format_terminal(report: dict) -> str:
    cols, rows = table_rows(report["results"], report["bandwidth"] is not None)
    failed = {i for i, r in enumerate(report["results"]) if "error" in r}
    widths = [max([len(c), *(len(r[i]) for j, r in enumerate(rows) if j not in failed or i == 0)])
              for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [_header(report), "", line(cols), line(["-" * w for w in widths])]
    out += [f"{r[0].ljust(widths[0])}  {r[1]}" if j in failed else line(r) for j, r in enumerate(rows)]
    return "\n".join(out)


def _header(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    what = f"{s['model_name']} (random init)" if s["random_init"] else s["checkpoint_dir"]
    return (f"{what} on {env['device_name']}; torch {env['torch']}, bitsandbytes {env['bitsandbytes']}, "
            f"commit {env['commit']}, {env['date']}\n"
            f"prompt {s['prompt_tokens']} tokens, {s['max_new_tokens']} new tokens (greedy), median of {s['runs']} runs "
            f"after {s['warmup']} warm-up; perplexity: first {s['ppl_tokens']} held-out tokens"
            + (", compiled decode step (static KV cache)" if s["compile"] else ""))


def format_markdown(report: dict) -> str:
    cols, rows = table_rows(report["results"], report["bandwidth"] is not None)
    env = report["environment"]
    out = [f"## {env['device_name']}", "", _header(report).replace("\n", "  \n"), "",
           "| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out.append("")
    where = "the mode's own process" if report["settings"]["isolate"] else "the one process all modes ran in"
    out.append("Peak memory: " + ("CUDA peak allocated bytes" if env["device"] == "cuda" else
                                  "peak resident set (Python/torch libraries included)") + f" of {where}.")
    return "\n".join(out) + "\n"


def write_chart(report: dict, path: Path) -> Optional[Path]:
    """decode tokens/sec against peak memory, one labelled point per mode (needs matplotlib: the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("Skipping the PNG chart: matplotlib is not installed (pip install 'litquant[plot]')", file=sys.stderr)
        return None
    ok = [r for r in report["results"] if "error" not in r]
    unit, div = _unit(ok)
    # CPU peak RSS is mostly the Python/torch libraries for small models: weights show the modes apart better
    key, what = ("peak_memory_bytes", "peak memory") if report["environment"]["device"] == "cuda" else \
        ("weight_bytes", "weight memory")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in ok:
        x, y = r[key] / div, r["decode_tokens_per_sec"]
        ax.scatter([x], [y], s=40)
        label = r["mode"] + (f"\nppl {r['perplexity']:.2f}" if r["perplexity"] is not None else "")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel(f"{what} ({unit})")
    ax.set_ylabel("decode tokens/sec (median)")
    env, s = report["environment"], report["settings"]
    name = s["model_name"] if s["random_init"] else Path(s["checkpoint_dir"]).name
    ax.set_title(f"{name} on {env['device_name'][:60]}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
    from litquant.precision import pick_accelerator

    device = torch.device("cuda" if pick_accelerator(accelerator) == "cuda" else "cpu")
    if random_init:
        if not model_name:
            raise UserError("--random_init needs --model_name (a named config, e.g. Llama-2-7b-hf)")
        from litquant.config import Config

        config = Config.from_name(model_name)
        checkpoint = None
    else:
        if model_name:
            raise UserError("--model_name is for --random_init; to benchmark weights use --checkpoint_dir")
        from litquant.checkpoint import check_checkpoint_dir
        from litquant.config import Config

        checkpoint = Path(checkpoint_dir)
        check_checkpoint_dir(checkpoint, None)
        config = Config.from_checkpoint(checkpoint)
    for name, v, lo in (("--runs", runs, 1), ("--warmup", warmup, 0), ("--prompt_tokens", prompt_tokens, 1),
                        ("--max_new_tokens", max_new_tokens, 1), ("--ppl_tokens", ppl_tokens, 0)):
        if v < lo:
            raise UserError(f"{name} must be at least {lo}")
    if threads is not None and threads < 1:
        raise UserError("--threads must be at least 1")
    if prompt_tokens + max_new_tokens > config.block_size:
        raise UserError(f"--prompt_tokens {prompt_tokens} + --max_new_tokens {max_new_tokens} exceed the model's "
                        f"context of {config.block_size} tokens")
    if compile and device.type != "cuda":
        raise UserError("--compile is for CUDA; on CPU run without it")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()] if modes else default_modes(checkpoint, random_init)
    if not mode_list:
        raise UserError("no modes to benchmark")
    _check_modes(mode_list, precision, device)

    if threads:
        torch.set_num_threads(threads)
    env = environment(device)
    bandwidth = bandwidth_gbps * 1e9 if bandwidth_gbps else (peak_bandwidth(env["device_name"]) if device.type == "cuda" else None)
    settings = dict(checkpoint_dir=str(checkpoint) if checkpoint else None, model_name=model_name or config.name,
                    random_init=random_init, precision=precision, prompt_tokens=prompt_tokens,
                    max_new_tokens=max_new_tokens, runs=runs, warmup=warmup,
                    ppl_tokens=0 if random_init else ppl_tokens, window=window, compile=compile, seed=seed,
                    isolate=isolate, threads=threads)
    report = {"environment": env, "settings": settings, "bandwidth": bandwidth, "results": []}
    print(_header(report), file=sys.stderr)
    avail = available_memory(device)
    for mode in mode_list:
        spec = dict(mode=mode, checkpoint_dir=str(checkpoint) if checkpoint else None, precision=precision,
                    accelerator=device.type, prompt_tokens=prompt_tokens, max_new_tokens=max_new_tokens, runs=runs,
                    warmup=warmup, ppl_tokens=ppl_tokens, window=window, random_init=random_init,
                    model_name=model_name, compile=compile, seed=seed, threads=threads)
        need = _weights_needed(config, mode, precision, device)
        if need is not None and avail is not None and need > 0.9 * avail:
            result = {"mode": mode, "error": f"skipped: needs ~{need / 1e9:.1f} GB of weights, "
                                            f"{avail / 1e9:.1f} GB available"}
        elif isolate:
            print(f"[{mode}] measuring ...", file=sys.stderr, flush=True)
            result = measure_in_subprocess(spec, timeout)
        else:
            try:
                result = measure_mode(**spec)
            except UserError as e:
                result = {"mode": mode, "error": str(e)}
        if bandwidth and "error" not in result:
            result["roofline_fraction"] = result["decode_tokens_per_sec"] * result["bytes_per_decode_step"] / bandwidth
        report["results"].append(result)
        if "error" in result:
            print(f"[{mode}] {result['error']}", file=sys.stderr, flush=True)

    print(format_terminal(report))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from litquant.io import atomic_write_text

    atomic_write_text(out_dir / "benchmark.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "benchmark.md", format_markdown(report))
    written = [out_dir / "benchmark.json", out_dir / "benchmark.md"]
    if write_chart(report, out_dir / "benchmark.png"):
        written.append(out_dir / "benchmark.png")
    print("Wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return report


def _check_modes(mode_list: list[str], precision: Optional[str], device: torch.device) -> None:
    """Unknown names and bad precisions fail here, in one line, before any model loads."""
    from litquant.precision import parse_precision, quantize_modes

    known = quantize_modes()
    for m in mode_list:
        prec, quant = split_mode(m, precision)
        if prec is not None:
            parse_precision(prec, device)
        if quant is not None and quant not in known:
            raise UserError(f"unknown mode {m!r}; choose from {', '.join([*PRECISION_MODES, *known])}")


def _weights_needed(config, mode: str, precision: Optional[str], device: torch.device) -> Optional[int]:
    from litquant.estimate import weight_bytes

    from litquant.precision import resolve

    prec, quant = split_mode(mode, precision)
    try:
        prec = resolve(prec, quant, device).precision
        return weight_bytes(config, quant or prec, prec)["bytes"]
    except UserError:
        return None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        _worker(sys.argv[2])
    else:
        from litquant.errors import run_job

        run_job(main)
