"""Measuring one mode: load it, time greedy generations, score perplexity (`measure_mode`), normally in a process
of its own (`measure_in_subprocess`, which runs `python -m litquant.benchmark --_worker SPEC_FILE RESULT_FILE`).

What one mode is measured with is a `MeasureSpec`: the settings of `litquant benchmark` plus the mode's name.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from litquant.benchmark.environment import CPU_MMAP_THRESHOLD, REPO, pick_device
from litquant.benchmark.modes import split_mode
from litquant.errors import UserError


@dataclass(frozen=True)
class MeasureSpec:
    """One mode and how to measure it (the flags of `litquant benchmark` of the same names)."""

    mode: str = ""
    checkpoint_dir: Optional[str] = None
    precision: Optional[str] = None
    accelerator: str = "auto"
    prompt_tokens: int = 128
    max_new_tokens: int = 100
    runs: int = 3
    warmup: int = 1
    ppl_tokens: int = 4096
    window: Optional[int] = None
    random_init: bool = False
    model_name: Optional[str] = None
    compile: bool = False
    seed: int = 1234
    threads: Optional[int] = None

    def for_mode(self, mode: str) -> MeasureSpec:
        return replace(self, mode=mode)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MeasureSpec:
        return cls(**json.loads(text))

    def check(self, config, device: torch.device) -> None:
        """Every setting, before any work (the mode names are `modes.check_modes`'s)."""
        for name, v, lo in (
            ("--runs", self.runs, 1),
            ("--warmup", self.warmup, 0),
            ("--prompt_tokens", self.prompt_tokens, 1),
            ("--max_new_tokens", self.max_new_tokens, 1),
            ("--ppl_tokens", self.ppl_tokens, 0),
        ):
            if v < lo:
                raise UserError(f"{name} must be at least {lo}")
        if self.threads is not None and self.threads < 1:
            raise UserError("--threads must be at least 1")
        self.check_context(config)
        self.check_compile(device)

    def check_context(self, config) -> None:
        if self.prompt_tokens + self.max_new_tokens > config.block_size:
            raise UserError(
                f"--prompt_tokens {self.prompt_tokens} + --max_new_tokens {self.max_new_tokens} exceed "
                f"the model's context of {config.block_size} tokens"
            )

    def check_compile(self, device: torch.device) -> None:
        if self.compile and device.type != "cuda":
            raise UserError("--compile is for CUDA; on CPU run without it")


def failed(mode: str, why: str) -> dict:
    """The result of a mode that was not measured."""
    return {"mode": mode, "error": why}


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
    raise UserError(
        "cannot cut the held-out text into a prompt that re-encodes to itself with this tokenizer"
    )


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_stats(runs: list[dict]) -> dict:
    """Per-run timings -> the medians the table shows."""
    return {
        "prefill_tokens_per_sec": _median([r["prompt_tokens"] / r["prefill_s"] for r in runs]),
        "decode_tokens_per_sec": _median(
            [r["decode_steps"] / r["decode_s"] for r in runs if r["decode_steps"]]
        ),
        "time_to_first_token_s": _median([r["prefill_s"] for r in runs]),
        "tokens_per_sec": _median([r["new_tokens"] / (r["prefill_s"] + r["decode_s"]) for r in runs]),
    }


def measure_mode(spec: MeasureSpec) -> dict:
    """Load one mode and measure it (meant to run in a process of its own, see `measure_in_subprocess`)."""
    from litquant.api import LLM
    from litquant.config import Config
    from litquant.estimate import kv_cache_bytes
    from litquant.evaluation import DEFAULT_BATCH_SIZE, check_window, heldout_tokens, perplexity
    from litquant.generation import compiled_decode_step, generate
    from litquant.precision import resolve
    from litquant.utils import current_rss_bytes, peak_memory_bytes, reset_peak_memory, weight_bytes_by_dtype

    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = pick_device(spec.accelerator)
    # None: the registry's default for the mode on this device
    prec, quantize = split_mode(spec.mode, spec.precision)
    spec.check_compile(device)
    plugin = resolve(prec, quantize, device)  # bad flags fail before the baseline is taken
    torch.manual_seed(spec.seed)
    baseline = current_rss_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    if spec.random_init:
        config = Config.from_name(spec.model_name)
        model = random_model(config, plugin, device, spec.seed)
        tokenizer = None
    else:  # the load path every job takes; torch's thread count left as it is (or --threads)
        llm = LLM.load(
            spec.checkpoint_dir,
            quantize,
            prec,
            accelerator=device.type,
            progress=False,
            configure_threads=False,
        )
        model, plugin, tokenizer, config = llm.model, llm.plugin, llm.tokenizer, llm.config
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    by_dtype = weight_bytes_by_dtype(model)  # before any forward: CPU kernels may keep layouts of their own
    peak_after_load = peak_memory_bytes(device)

    spec.check_context(config)
    prompt_text = None
    if tokenizer is not None:
        prompt_text, ids = benchmark_prompt(tokenizer, spec.prompt_tokens)
        prompt = torch.tensor(ids, device=device)
    else:
        prompt = torch.randint(
            0,
            config.vocab_size,
            (spec.prompt_tokens,),
            device=device,
            generator=torch.Generator(device=device).manual_seed(spec.seed),
        )
    model.set_kv_cache(batch_size=1, max_seq_length=prompt.numel() + spec.max_new_tokens, device=device)
    step = compiled_decode_step(model) if spec.compile else None

    records, new_ids = [], None
    for i in range(spec.warmup + spec.runs):
        with plugin.forward_context():
            res = generate(model, prompt, spec.max_new_tokens, temperature=0.0, decode_step=step)
        if i >= spec.warmup:
            records.append(
                dict(
                    prompt_tokens=int(prompt.numel()),
                    new_tokens=int(res.new_tokens.numel()),
                    prefill_s=res.prefill_s,
                    decode_s=res.decode_s,
                    decode_steps=res.decode_steps,
                )
            )
        if new_ids is None:
            new_ids = res.new_tokens.tolist()
    text = tokenizer.decode(prompt.tolist() + new_ids) if tokenizer is not None else None
    peak = peak_memory_bytes(device)

    ppl = None
    if spec.ppl_tokens and tokenizer is not None:
        model.clear_kv_cache()
        model.max_seq_length = config.block_size
        w, s = check_window(spec.window, None, config.block_size)
        with plugin.forward_context():
            ppl = perplexity(
                model, heldout_tokens(tokenizer, spec.ppl_tokens), w, s, batch_size=DEFAULT_BATCH_SIZE
            )
        ppl.update(window=w, stride=s)

    wbytes = sum(by_dtype.values())
    elem_bytes = torch.finfo(plugin.dtype).bits // 8
    kv_bytes = kv_cache_bytes(config, prompt.numel() + spec.max_new_tokens, 1, elem_bytes)
    wte_bytes = config.padded_vocab_size * config.n_embd * elem_bytes
    return {
        "mode": spec.mode,
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
        "compiled": spec.compile,
    }


def measure_or_error(spec: MeasureSpec) -> dict:
    """`measure_mode`, with a user error (the mode cannot run here) as the mode's result."""
    try:
        return measure_mode(spec)
    except UserError as e:
        return failed(spec.mode, str(e))


def worker(spec_file: str, result_file: str) -> None:
    """The subprocess side: a `MeasureSpec` as JSON in, the mode's result written as JSON."""
    result = measure_or_error(MeasureSpec.from_json(Path(spec_file).read_text()))
    Path(result_file).write_text(json.dumps(result))


def measure_in_subprocess(spec: MeasureSpec, timeout: Optional[float]) -> dict:
    """`measure_mode` in a fresh Python process, so peak memory is the mode's alone."""
    with tempfile.TemporaryDirectory(prefix="litquant-bench-") as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(spec.to_json())
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        if spec.accelerator == "cpu":
            env.setdefault("MALLOC_MMAP_THRESHOLD_", CPU_MMAP_THRESHOLD)
        try:
            cmd = [sys.executable, "-m", "litquant.benchmark", "--_worker", str(spec_file), str(result_file)]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return failed(spec.mode, f"timed out after {timeout:.0f} s")
        if result_file.is_file():
            return json.loads(result_file.read_text())
        tail = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
        why = (
            "killed (out of memory?)"
            if proc.returncode in (-9, 137)
            else (tail[-1] if tail else f"exit {proc.returncode}")
        )
        return failed(spec.mode, f"failed: {why}")
