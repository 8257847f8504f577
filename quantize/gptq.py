"""Quantize a checkpoint with GPTQ: `python quantize/gptq.py --bits 4` == `litquant quantize gptq --bits 4`.

Writes `lit_model_gptq.<bits>bit.safetensors` (the blocks' Linears in the AutoGPTQ layout, every other tensor
as saved) and `quantize_config.json`; `--quantize gptq.int<bits>` then runs it.

How it walks the model (what keeps device memory at ~ one block plus the activations):
1. calibration windows are embedded with `transformer.wte` alone (the model itself is built on meta);
2. for each block in order, its tensors are streamed from `lit_model.safetensors` to the device, and its
   Linears are quantized *true-sequentially*, in the order AutoGPTQ uses: attn.qkv, then attn.proj (with its
   inputs recomputed through the already-quantized qkv), then the MLP's input Linears together (fc_1 + fc_2,
   which share their input), then mlp.proj. For each step, forward hooks feed every calibration batch to that
   step's `GPTQ.add_batch` and the forward stops right after it;
3. the quantized block's outputs become the next block's inputs (so later blocks see the quantization error of
   earlier ones and can compensate), and the block's tensors go back to meta.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

if __package__ in (None, ""):  # `python quantize/gptq.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from litquant.checkpoint import DEFAULT_CHECKPOINT_DIR, SIDE_FILES, WEIGHTS_FILE, build_model, check_checkpoint_dir, copy_side_files
from litquant.io import SafetensorsWriter, atomic_write_text, open_safetensors
from litquant.config import CONFIG_FILE, Config
from litquant.errors import UserError, run_job
from litquant.model import build_mask_cache
from litquant.precision import PRECISIONS, parse_precision, pick_accelerator
from litquant.utils import memory_used_line, release_freed_memory, reset_peak_memory

# The Linears of a block in quantization order; a tuple is quantized together (same input, one forward).
SEQUENTIAL_GROUPS = {
    "LLaMAMLP": (("attn.qkv",), ("attn.proj",), ("mlp.fc_1", "mlp.fc_2"), ("mlp.proj",)),
    "GptNeoxMLP": (("attn.qkv",), ("attn.proj",), ("mlp.fc",), ("mlp.proj",)),
}
# The MLP's down-projection inputs are kept for the block's output pass only up to this size (n_tokens x
# intermediate_size activations: 50 MB for the bundled model, 5.8 GB for Llama-2-7B's default calibration)
MLP_CACHE_BYTES = 1 << 30
CPU_CALIBRATION_S = 240  # what the default calibration size aims at on a CPU

class _StopForward(Exception):
    """Raised by a hook once the layers being calibrated have seen their input: the rest of the block is skipped."""


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    *,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = True,
    damp_percent: float = 0.01,
    static_groups: bool = False,
    true_sequential: bool = True,
    block_size: int = 128,
    n_samples: Optional[int] = None,
    seq_len: Optional[int] = None,
    calibration_data: Optional[Path] = None,
    batch_size: int = 8,
    eval_data: Optional[Path] = None,
    eval_tokens: Optional[int] = None,
    output_dir: Optional[Path] = None,
    precision: Optional[str] = None,
    accelerator: str = "auto",
    seed: int = 0,
) -> Path:
    """Quantize the checkpoint's transformer blocks with GPTQ and save them in the AutoGPTQ layout.

    Args:
        checkpoint_dir: a litquant checkpoint directory (with lit_model.safetensors).
        bits: bits per weight: 2, 3, 4 or 8 (4 runs on the int4 kernels: --quantize gptq.int4).
        group_size: input channels sharing one scale and zero point; -1 = one group per output channel.
        act_order: quantize input channels in order of decreasing Hessian diagonal (AutoGPTQ's desc_act).
        sym: symmetric quantization (zero point fixed at the middle of the grid): AutoGPTQ's and gptqmodel's
            default, and what the Marlin and ExLlama GPU kernels require. false: asymmetric (min/max per group).
        damp_percent: dampening added to the Hessian diagonal, as a fraction of its mean.
        static_groups: with act_order, compute group parameters up front in the original channel order.
        true_sequential: quantize a block's Linears one step at a time, each step's inputs recomputed through
            the steps already quantized (False: all of a block's Linears from one forward).
        block_size: columns per lazy-update block inside GPTQ (speed only, same result).
        n_samples: calibration windows (default: 128 on CUDA; on CPU as many as about four minutes of calibration
            allow for this model on this machine, from a quick matmul measurement, between 8 and 128).
        seq_len: tokens per calibration window (default: the model's context, at most 2048 on CUDA, 512 on CPU).
        calibration_data: a local text/JSON/JSONL file or a directory of them (JSON needs a "text" field);
            default: the bundled training corpus.
        batch_size: calibration windows per forward pass.
        eval_data: text for the quality gate printed at the end, held-out perplexity of the quantized model next to
            the base's (a .txt/.json/.jsonl file; default: the bundled held-out split).
        eval_tokens: tokens of it scored (default: 4096 on CUDA, 1024 on CPU; 0 skips the gate).
        output_dir: where to write (default: checkpoint_dir); another directory gets the config and tokenizer
            files too, so it is a checkpoint directory of its own.
        precision: dtype of the calibration forward passes (32-true, 16-true, bf16-true; default: bf16-true where
            the GPU or CPU computes in bf16 natively, else 16-true on GPUs, 32-true on CPUs). Hessians and GPTQ
            itself always run in fp32 (on the bundled model bf16 calibration gives the same KL to fp as fp32).
        accelerator: auto, cuda or cpu.
        seed: seed of the calibration sampling.
    """
    from litquant.data.calibration import calibration_tokens
    from litquant.quantization.gptq_format import SUPPORTED_BITS
    from litquant.quantization.gptq_plugin import QUANTIZE_CONFIG_FILE, gptq_file, quantize_config
    from litquant.tokenizer import Tokenizer

    if bits not in SUPPORTED_BITS:
        raise UserError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise UserError(f"--group_size must be a positive integer or -1 (per channel), got {group_size}")
    if not 0.0 <= damp_percent <= 1.0:
        raise UserError(f"--damp_percent must be in [0, 1], got {damp_percent}")
    for flag, value in (("--block_size", block_size), ("--n_samples", n_samples or 1), ("--batch_size", batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    checkpoint_dir = Path(checkpoint_dir)
    source = check_checkpoint_dir(checkpoint_dir, WEIGHTS_FILE)
    config = Config.from_checkpoint(checkpoint_dir)
    if config.mlp_class_name not in SEQUENTIAL_GROUPS:
        raise UserError(f"GPTQ does not know the Linear order of a {config.mlp_class_name} block")
    device = torch.device("cuda" if pick_accelerator(accelerator) == "cuda" else "cpu")
    dtype = PRECISIONS[parse_precision(precision, device)]
    if seq_len is None:
        seq_len = min(config.block_size, 2048 if device.type == "cuda" else 512)
    if not 2 <= seq_len <= config.block_size:
        raise UserError(f"--seq_len must be in [2, {config.block_size}] (the model's context), got {seq_len}")
    if n_samples is None:
        n_samples, why = default_n_samples(config, seq_len, device, dtype)
        print(f"Calibration: {n_samples} x {seq_len} tokens ({why}; --n_samples and --seq_len choose)", file=sys.stderr)
    if eval_tokens is None:
        eval_tokens = 4096 if device.type == "cuda" else 1024
    if eval_tokens < 0 or eval_tokens == 1:
        raise UserError(f"--eval_tokens must be 0 (no quality gate) or at least 2, got {eval_tokens}")
    _check_shapes(config, bits)
    output_dir = checkpoint_dir if output_dir is None else Path(output_dir)
    try:  # before the work, not after it
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {output_dir}: cannot create it ({e.strerror or e})") from None
    if not os.access(output_dir, os.W_OK):
        raise UserError(f"--output_dir {output_dir} is not writable")

    tokenizer = Tokenizer(checkpoint_dir)
    tokens = calibration_tokens(tokenizer, n_samples, seq_len, calibration_data, seed)
    gate_tokens, gate_source = None, None
    if eval_tokens:
        from litquant.evaluate_job import load_text, text_tokens

        text, gate_source = load_text(eval_data)
        ids = text_tokens(tokenizer, text, eval_tokens)
        w = min(seq_len, ids.numel())  # windows of the calibration length (one RoPE table), the tail dropped
        gate_tokens = ids[: ids.numel() // w * w].view(-1, w)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    settings = dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order, damp_percent=damp_percent,
                    block_size=block_size, static_groups=static_groups)
    qc = quantize_config(bits, group_size, act_order, sym, damp_percent, true_sequential, static_groups)
    out = output_dir / gptq_file(bits)
    quantized = [f"transformer.h.{i}.{name}" for i in range(config.n_layer)
                 for group in SEQUENTIAL_GROUPS[config.mlp_class_name] for name in group]
    # the output is written as it is made: every tensor that is not a quantized weight as saved, then each block's
    # packed layers as soon as the block is done (nothing accumulates in memory)
    with open_safetensors(source) as f, SafetensorsWriter(
        out, _output_plan(f, config, quantized, bits, group_size),
        metadata={"format": "pt", "litquant": "1", "quantize_config": json.dumps(qc)},
    ) as writer:
        skip = {m + ".weight" for m in quantized}
        for key in f.keys():
            if key not in skip:
                writer.write(key, f.get_tensor(key))

        def emit(module: str, packed: dict[str, torch.Tensor]) -> None:
            for attr, t in packed.items():
                writer.write(f"{module}.{attr}", t)

        gate = quantize_blocks(source, config, tokens, settings, device, dtype, batch_size, true_sequential, emit=emit,
                               gate_tokens=gate_tokens)
    atomic_write_text(output_dir / QUANTIZE_CONFIG_FILE, json.dumps(qc, indent=2) + "\n")
    if output_dir.resolve() != checkpoint_dir.resolve():
        copy_side_files(checkpoint_dir, output_dir, (CONFIG_FILE, *SIDE_FILES))
    elapsed = time.perf_counter() - t0

    print(
        f"Quantized {len(quantized)} Linear layers to {bits} bits (group_size {group_size}, act_order {act_order}) "
        f"with {n_samples} x {seq_len} calibration tokens on {device.type}; saved {out} "
        f"({out.stat().st_size / 1e6:.2f} MB, source {source.stat().st_size / 1e6:.2f} MB)",
        file=sys.stderr,
    )
    print(f"Time for quantization: {elapsed:.02f} sec total", file=sys.stderr)
    print(memory_used_line(device), file=sys.stderr)
    if gate is not None:
        base, quant = gate["base"], gate["quantized"]
        print(f"Quality gate: held-out perplexity {quant:.4g} quantized vs {base:.4g} base ({(quant / base - 1) * 100:+.2f}%), "
              f"{gate['tokens']} tokens of {gate_source}", file=sys.stderr)
    return out


def default_n_samples(config: Config, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[int, str]:
    """Calibration windows when --n_samples is not given: the GPTQ paper's 128 on a GPU; on a CPU as many as about
    CPU_CALIBRATION_S seconds of calibration allow, between 8 and 128. The cost per token (block forwards, ~2.5
    per block, in the calibration dtype; Hessians in fp32) is timed here on the model's own widest layer."""
    if device.type == "cuda":
        return 128, "the GPTQ paper's 128 windows"
    block = build_model(config, "meta").transformer.h[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.in_features * m.out_features for m in linears)
    hessian = sum(m.in_features ** 2 for m in linears if m is not getattr(block.mlp, "fc_2", None))
    wide = max(linears, key=lambda m: m.in_features * m.out_features)
    rows = min(seq_len * 4, 1024)
    x, w = torch.randn(rows, wide.in_features, dtype=dtype), torch.randn(wide.out_features, wide.in_features, dtype=dtype)
    xh, h = x.float(), torch.zeros(wide.in_features, wide.in_features)
    timings = []
    for fn in (lambda: F.linear(x, w), lambda: h.addmm_(xh.t(), xh)):
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        timings.append(max(time.perf_counter() - t0, 1e-9))
    fwd_rate = 2 * rows * wide.in_features * wide.out_features / timings[0]
    hess_rate = 2 * rows * wide.in_features**2 / timings[1]
    per_token = config.n_layer * (2.5 * 2 * weights / fwd_rate + 2 * hessian / hess_rate)  # seconds
    n = max(8, min(128, int(CPU_CALIBRATION_S / per_token / seq_len)))
    return n, f"default for this model on this CPU, about {n * seq_len * per_token / 60:.0f} min of calibration at " \
              f"the {fwd_rate / 1e9:.0f} GFLOP/s measured"


@torch.no_grad()
def quantize_blocks(
    source: Path,
    config: Config,
    tokens: torch.Tensor,
    settings: dict,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    true_sequential: bool = True,
    progress: bool = True,
    emit=None,
    gate_tokens: Optional[torch.Tensor] = None,
):
    """GPTQ over every block of the model in `source`. Each quantized layer's AutoGPTQ tensors {qweight, qzeros,
    scales, g_idx} (CPU; biases stay as in `source`) go to `emit(name, tensors)` as the layer is done.
    `settings`: GPTQ.quantize's arguments. With `gate_tokens` (windows of the calibration length) returns the
    quality gate {"base", "quantized", "tokens"}: their perplexity through the blocks as they were and as
    quantized, both streams carried block by block beside the calibration (no second model is loaded)."""

    model = build_model(config, "meta")
    T = tokens.shape[1]
    cos, sin = model._rope(device)
    cos, sin = cos[:T], sin[:T]
    w = config.sliding_window_size
    mask = build_mask_cache(T, w, device) if (w is not None and T > w) else None  # as GPT.forward builds it
    groups = SEQUENTIAL_GROUPS[config.mlp_class_name]
    if not true_sequential:
        groups = (tuple(name for g in groups for name in g),)

    with open_safetensors(source) as f:
        wte = f.get_tensor("transformer.wte.weight").to(device=device, dtype=dtype)
        xs = [F.embedding(b.to(device), wte) for b in tokens.split(batch_size)]  # this block's inputs, per batch
        gate = [F.embedding(b.to(device), wte) for b in gate_tokens.split(batch_size)] if gate_tokens is not None else []
        gate_q = [g.clone() for g in gate]  # the held-out windows through the quantized blocks; `gate`: the originals
        n_tokens = tokens.numel()
        del wte
        keys = list(f.keys())
        bar = tqdm(total=config.n_layer * len(groups), desc="Quantizing", unit="step", disable=not progress)
        for i, block in enumerate(model.transformer.h):
            prefix = f"transformer.h.{i}."
            stored = _load_block(f, block, prefix, [k for k in keys if k.startswith(prefix)], device, dtype, source)
            gate = [block(g, *_rope_for(cos, sin, mask, g), None, None) for g in gate]  # the base model's block
            tails = [_TailCache(block.attn, "attn.")]
            if n_tokens * block.mlp.proj.in_features * dtype.itemsize <= MLP_CACHE_BYTES:
                tails.append(_TailCache(block.mlp, "mlp."))
            done: set[str] = set()
            for group in groups:
                layers = {name: block.get_submodule(name) for name in group}
                recording = [t for t in tails if t.usable(group, done)]  # true-sequential: attn.proj, mlp.proj
                for t in recording:
                    t.record()
                hessians = _HessianCollector(layers, device)
                handle = layers[group[-1]].register_forward_hook(_stop)
                try:
                    for b, x in enumerate(xs):
                        for t in tails:
                            t.batch = b
                        try:
                            block(x, cos, sin, mask, None, None)
                        except _StopForward:
                            pass
                        hessians.next_forward()
                finally:
                    hessians.remove()
                    handle.remove()
                names = list(layers)
                for k, (name, layer) in enumerate(layers.items()):
                    gptq = hessians.gptqs[name]
                    last = all(hessians.gptqs[n] is not gptq for n in names[k + 1 :])  # its Hessian serves no more
                    # GPTQ sees the weight as saved, not its calibration-dtype copy (fp32 file, bf16 calibration)
                    result = gptq.quantize(stored.pop(name + ".weight", layer.weight), **settings, release=last)
                    emit(prefix + name, {k: v.cpu() for k, v in result.pack().items()})
                    layer.weight.data = result.weight.to(dtype)  # later steps and blocks see the quantized layer
                    bar.set_postfix_str(f"block {i} {name} loss {result.loss:.3g}")
                hessians.free()
                release_freed_memory()  # the Hessians and GPTQ's temporaries: give glibc's holes back
                done.update(group)
                for t in recording:
                    t.start()
                bar.update()
            for b, x in enumerate(xs):  # the quantized block's outputs are the next block's inputs
                for t in tails:
                    t.batch = b
                xs[b] = block(x, cos, sin, mask, None, None)
            for t in tails:
                t.stop()
            gate_q = [block(g, *_rope_for(cos, sin, mask, g), None, None) for g in gate_q]
            block.to("meta")  # free the block's weights
        bar.close()
        if gate_tokens is None:
            return None
        return _gate(f, config, gate, gate_q, gate_tokens, device, dtype)


def _rope_for(cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor], x: torch.Tensor) -> tuple:
    """cos, sin and mask for windows of x's length (the gate's may be shorter than the calibration's)."""
    t = x.shape[1]
    return cos[:t], sin[:t], (mask[..., :t, :t] if mask is not None else None)


def _gate(f, config: Config, base: list, quant: list, tokens: torch.Tensor, device, dtype) -> dict:
    """Perplexity of both held-out streams: the final norm and the head, streamed in from the source file."""
    from litquant.model import make_norm

    with torch.device("meta"):
        ln_f = make_norm(config)
    head = {"weight": f.get_tensor("lm_head.weight").to(device=device, dtype=dtype)}
    if config.lm_head_bias:
        head["bias"] = f.get_tensor("lm_head.bias").to(device=device, dtype=dtype)
    ln_f.load_state_dict({k: f.get_tensor(f"transformer.ln_f.{k}").to(device=device, dtype=dtype)
                          for k in ln_f.state_dict()}, assign=True)
    targets = tokens.to(device)[:, 1:].split(len(base[0])) if base else []
    out = {}
    for name, xs in (("base", base), ("quantized", quant)):
        nll, n = 0.0, 0
        for x, t in zip(xs, targets):
            logits = F.linear(ln_f(x[:, :-1]), head["weight"], head.get("bias")).float()
            nll += F.cross_entropy(logits.transpose(1, 2), t, reduction="sum").item()
            n += t.numel()
        out[name] = math.exp(nll / max(n, 1))
    out["tokens"] = n
    return out


def _stop(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    raise _StopForward


def _linear_names(module: nn.Module, prefix: str) -> list[str]:
    return [prefix + n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


class _HessianCollector:
    """Forward hooks feeding each Linear's inputs to its own GPTQ, except that Linears handed the very same input
    tensor in one forward (the MLP's fc_1 and fc_2) share one GPTQ: one Hessian computed instead of two."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device) -> None:
        from litquant.quantization.gptq import GPTQ

        self.gptqs: dict[str, GPTQ] = {}
        self._seen: list[tuple[torch.Tensor, GPTQ]] = []  # inputs of the current forward, and where they went
        self._new = lambda layer: GPTQ(layer.in_features, device)  # an in_features² Hessian: made once per layer
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            for seen, gptq in self._seen:
                if seen is x:
                    self.gptqs.setdefault(name, gptq)
                    return
            gptq = self.gptqs.get(name)
            if gptq is None:
                gptq = self.gptqs[name] = self._new(module)
            gptq.add_batch(x)
            self._seen.append((x, gptq))

        return hook

    def next_forward(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def free(self) -> None:
        for gptq in self.gptqs.values():
            gptq.free()


class _TailCache:
    """A block's attention and MLP both end with their `proj` Linear. Once every other Linear of such a module is
    quantized, the inputs of its proj are final: recorded while proj is calibrated (`record`), they let every later
    forward of the block replace the whole module by `proj(recorded input)` (`start`): the MLP steps and the
    block's output pass skip qkv, RoPE and SDPA, the output pass also the MLP's up-projections. Costs one copy of
    proj's inputs over the calibration batches, for the length of one block."""

    def __init__(self, module: nn.Module, prefix: str) -> None:
        self.module, self.batch, self.active = module, 0, False
        self.linears = set(_linear_names(module, prefix))
        self.proj = prefix + "proj"
        self.inputs: dict[int, torch.Tensor] = {}
        self._handle = None

    def usable(self, group: tuple[str, ...], done: set[str]) -> bool:
        """True when `group` calibrates proj and every other Linear of the module is already quantized."""
        return self.proj in group and self.linears - {self.proj} <= done

    def record(self) -> None:
        def hook(module: nn.Module, args: tuple) -> None:
            self.inputs[self.batch] = args[0]

        self._handle = self.module.proj.register_forward_pre_hook(hook)

    def start(self) -> None:
        self._handle.remove()
        self._handle = None
        self.module.forward = lambda *args, **kwargs: self.module.proj(self.inputs[self.batch])  # shadows the class's
        self.active = True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        if self.active:
            del self.module.forward
        self.active = False
        self.inputs.clear()


def _load_block(f, block: nn.Module, prefix: str, keys: list[str], device: torch.device, dtype: torch.dtype,
                source: Path) -> dict[str, torch.Tensor]:
    """Stream one block's tensors from the open safetensors file onto the device (replacing the meta ones), in
    the calibration dtype. Returns, on the device, the float tensors whose stored dtype differs from it, as
    stored, so that GPTQ quantizes the real weights (keyed by name within the block)."""
    state, stored = {}, {}
    for k in keys:
        t = f.get_tensor(k)
        name = k[len(prefix):]
        if t.is_floating_point() and t.dtype != dtype and name.endswith(".weight"):
            stored[name] = t.to(device)
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    try:
        block.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{source}: block {prefix[:-1]} does not match model_config.yaml ({detail})") from None
    return stored


def _output_plan(f, config: Config, quantized: list[str], bits: int, group_size: int):
    """The output file's tensors (meta): the source's, less the quantized weights, plus their AutoGPTQ tensors."""
    from litquant.hf.files import meta_tensor
    from litquant.quantization.gptq_format import packed_shapes

    skip = {m + ".weight" for m in quantized}
    dtypes = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
    for key in f.keys():
        if key not in skip:
            yield key, meta_tensor(f.get_slice(key))
    for m in quantized:
        out_features, in_features = f.get_slice(m + ".weight").get_shape()
        for attr, shape in packed_shapes(in_features, out_features, bits, group_size).items():
            yield f"{m}.{attr}", torch.empty(shape, dtype=dtypes[attr], device="meta")


def _check_shapes(config: Config, bits: int) -> None:
    """Fail before any work when a Linear cannot be packed at this bit width."""
    from litquant.quantization.gptq_format import check_packable

    block = build_model(config, "meta").transformer.h[0]
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            try:
                check_packable(m.in_features, m.out_features, bits)
            except UserError as e:
                raise UserError(f"{name}: {e}") from None


if __name__ == "__main__":
    run_job(main)
