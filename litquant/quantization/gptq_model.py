"""GPTQ over a whole model, block by block, true-sequentially (litquant.quantization.gptq quantizes one Linear).

Each block's tensors stream in from `lit_model.safetensors`, calibration batches run through it with forward hooks
feeding each Linear's Hessian, its Linears are quantized in AutoGPTQ's order, its packed tensors are written out
at once, and its outputs (through the quantized layers) become the next block's inputs; then the block goes back to
meta. So memory stays about one block plus the activations (README: "GPTQ memory"). docs/ARCHITECTURE.md has more.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from litquant.checkpoint import Checkpoint, build_model
from litquant.config import Config
from litquant.errors import UserError
from litquant.io import DTYPES, SafetensorsWriter, open_safetensors
from litquant.model import build_mask_cache
from litquant.utils import best_time, release_freed_memory

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


@dataclass(frozen=True)
class GPTQSettings:
    """How to quantize (the job's flags of the same names)."""

    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    static_groups: bool = False
    true_sequential: bool = True
    block_size: int = 128

    def check(self, config: Config) -> None:
        from litquant.quantization.gptq_format import SUPPORTED_BITS

        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise UserError(
                f"--group_size must be a positive integer or -1 (per channel), got {self.group_size}"
            )
        if not 0.0 <= self.damp_percent <= 1.0:
            raise UserError(f"--damp_percent must be in [0, 1], got {self.damp_percent}")
        if self.block_size < 1:
            raise UserError(f"--block_size must be at least 1, got {self.block_size}")
        if config.mlp_class_name not in SEQUENTIAL_GROUPS:
            raise UserError(f"GPTQ does not know the Linear order of a {config.mlp_class_name} block")
        check_shapes(config, self.bits)

    def quantize_config(self) -> dict:
        """The AutoGPTQ quantize_config.json of these settings."""
        from litquant.quantization.gptq_plugin import quantize_config

        return quantize_config(
            self.bits,
            self.group_size,
            self.act_order,
            self.sym,
            self.damp_percent,
            self.true_sequential,
            self.static_groups,
        )

    def gptq_kwargs(self) -> dict:
        """GPTQ.quantize's arguments."""
        d = asdict(self)
        d.pop("true_sequential")
        return d


def quantize_model(
    checkpoint: Checkpoint,
    settings: GPTQSettings,
    tokens: torch.Tensor,
    out: Path,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    gate_tokens: Optional[torch.Tensor] = None,
) -> tuple[list[str], Optional[dict]]:
    """GPTQ of every block of `checkpoint` with the calibration windows `tokens`, written to `out` as it is made:
    every tensor that is not a quantized weight as saved, then each block's packed layers as soon as the block is
    done (nothing accumulates). -> (the quantized Linears, the quality gate of `gate_tokens` or None)."""
    config = checkpoint.config
    source = checkpoint.file()
    quantized = [
        f"transformer.h.{i}.{name}"
        for i in range(config.n_layer)
        for group in SEQUENTIAL_GROUPS[config.mlp_class_name]
        for name in group
    ]
    metadata = {"format": "pt", "litquant": "1", "quantize_config": json.dumps(settings.quantize_config())}
    with (
        open_safetensors(source) as f,
        SafetensorsWriter(
            out, output_plan(f, quantized, settings.bits, settings.group_size), metadata=metadata
        ) as writer,
    ):
        skip = {m + ".weight" for m in quantized}
        for key in f.keys():
            if key not in skip:
                writer.write(key, f.get_tensor(key))

        def emit(module: str, packed: dict[str, torch.Tensor]) -> None:
            for attr, t in packed.items():
                writer.write(f"{module}.{attr}", t)

        gate = quantize_blocks(
            source, config, tokens, settings, device, dtype, batch_size, emit=emit, gate_tokens=gate_tokens
        )
    return quantized, gate


def default_n_samples(
    config: Config, seq_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[int, str]:
    """Calibration windows when --n_samples is not given: the GPTQ paper's 128 on a GPU; on a CPU as many as about
    CPU_CALIBRATION_S seconds of calibration allow, between 8 and 128. The cost per token (block forwards, ~2.5
    per block, in the calibration dtype; Hessians on the path GPTQ.add_batch takes for that dtype) is timed here on
    the model's own layers."""
    from litquant.quantization.gptq import GPTQ

    if device.type == "cuda":
        return 128, "the GPTQ paper's 128 windows"
    block = build_model(config, "meta").transformer.h[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.in_features * m.out_features for m in linears)
    hessian = sum(m.in_features**2 for m in linears if m is not getattr(block.mlp, "fc_2", None))
    wide = max(linears, key=lambda m: m.in_features * m.out_features)
    widest_in = max(m.in_features for m in linears)
    rows = min(seq_len * 4, 1024)
    x = torch.randn(rows, wide.in_features, dtype=dtype)
    w = torch.randn(wide.out_features, wide.in_features, dtype=dtype)
    xh, gptq = torch.randn(rows, widest_in, dtype=dtype), GPTQ(widest_in)  # the Hessian path the job takes
    timings = [best_time(lambda: F.linear(x, w), 1), best_time(lambda: gptq.add_batch(xh), 1)]
    fwd_rate = 2 * rows * wide.in_features * wide.out_features / timings[0]
    hess_rate = 2 * rows * widest_in**2 / timings[1]  # full-matrix equivalent
    per_token = config.n_layer * (2.5 * 2 * weights / fwd_rate + 2 * hessian / hess_rate)  # seconds
    n = max(8, min(128, int(CPU_CALIBRATION_S / per_token / seq_len)))
    return (
        n,
        f"default for this model on this CPU, about {n * seq_len * per_token / 60:.0f} min of calibration at "
        f"the {fwd_rate / 1e9:.0f} GFLOP/s measured",
    )


@torch.no_grad()
def quantize_blocks(
    source: Path,
    config: Config,
    tokens: torch.Tensor,
    settings: GPTQSettings,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    progress: bool = True,
    emit: Callable[[str, dict], None] = None,
    gate_tokens: Optional[torch.Tensor] = None,
):
    """GPTQ over every block of the model in `source`. Each quantized layer's AutoGPTQ tensors {qweight, qzeros,
    scales, g_idx} (CPU; biases stay as in `source`) go to `emit(name, tensors)` as the layer is done.
    With `gate_tokens` (windows of the calibration length) returns the
    quality gate {"base", "quantized", "tokens"}: their perplexity through the blocks as they were and as
    quantized, both streams carried block by block beside the calibration (no second model is loaded)."""

    model = build_model(config, "meta")
    T = tokens.shape[1]
    cos, sin = model._rope(device)
    cos, sin = cos[:T], sin[:T]
    w = config.sliding_window_size
    mask = build_mask_cache(T, w, device) if (w is not None and T > w) else None  # as GPT.forward builds it
    groups = SEQUENTIAL_GROUPS[config.mlp_class_name]
    if not settings.true_sequential:
        groups = (tuple(name for g in groups for name in g),)
    gptq_kwargs = settings.gptq_kwargs()

    with open_safetensors(source) as f:
        wte = f.get_tensor("transformer.wte.weight").to(device=device, dtype=dtype)
        xs = [
            F.embedding(b.to(device), wte) for b in tokens.split(batch_size)
        ]  # this block's inputs, per batch
        gate = (
            [F.embedding(b.to(device), wte) for b in gate_tokens.split(batch_size)]
            if gate_tokens is not None
            else []
        )
        gate_q = [
            g.clone() for g in gate
        ]  # the held-out windows through the quantized blocks; `gate`: the originals
        n_tokens = tokens.numel()
        del wte
        keys = list(f.keys())
        bar = tqdm(total=config.n_layer * len(groups), desc="Quantizing", unit="step", disable=not progress)
        for i, block in enumerate(model.transformer.h):
            prefix = f"transformer.h.{i}."
            stored = _load_block(
                f, block, prefix, [k for k in keys if k.startswith(prefix)], device, dtype, source
            )
            gate = [block(g, *_rope_for(cos, sin, mask, g), None) for g in gate]  # the base model's block
            # a norm whose output only its module reads is skipped too once that module is replaced
            shared_norm = config.parallel_residual and block.norm_2 is None
            tails = [_TailCache(block.attn, "attn.", None if shared_norm else block.norm_1)]
            if n_tokens * block.mlp.proj.in_features * dtype.itemsize <= MLP_CACHE_BYTES:
                tails.append(_TailCache(block.mlp, "mlp.", block.norm_2))
            done: set[str] = set()
            for group in groups:
                layers = {name: block.get_submodule(name) for name in group}
                recording = [
                    t for t in tails if t.usable(group, done)
                ]  # true-sequential: attn.proj, mlp.proj
                for t in recording:
                    t.record()
                hessians = _HessianCollector(layers, device)
                # stop the forward as the group's last Linear is about to run: its output is not needed
                handle = layers[group[-1]].register_forward_pre_hook(_stop)
                try:
                    for b, x in enumerate(xs):
                        for t in tails:
                            t.batch = b
                        try:
                            block(x, cos, sin, mask, None)
                        except _StopForward:
                            pass
                        hessians.next_forward()
                        if b == 0 and len(group) > 1 and hessians.shared():  # e.g. fc_1 and fc_2: one input
                            handle.remove()
                            handle = layers[group[0]].register_forward_pre_hook(_stop)
                finally:
                    hessians.remove()
                    handle.remove()
                names = list(layers)
                for k, (name, layer) in enumerate(layers.items()):
                    gptq = hessians.gptqs[name]
                    # its Hessian serves no more
                    last = all(hessians.gptqs[n] is not gptq for n in names[k + 1 :])
                    # GPTQ sees the weight as saved, not its calibration-dtype copy (fp32 file, bf16 calibration)
                    result = gptq.quantize(
                        stored.pop(name + ".weight", layer.weight), **gptq_kwargs, release=last
                    )
                    emit(prefix + name, {k: v.cpu() for k, v in result.pack().items()})
                    # later steps and blocks see the quantized layer
                    layer.weight.data = result.weight.to(dtype)
                    bar.set_postfix_str(f"block {i} {name} loss {result.loss:.3g}")
                hessians.free()
                done.update(group)
                for t in recording:
                    t.start()
                bar.update()
            for b, x in enumerate(xs):  # the quantized block's outputs are the next block's inputs
                for t in tails:
                    t.batch = b
                xs[b] = block(x, cos, sin, mask, None)
            for t in tails:
                t.stop()
            gate_q = [block(g, *_rope_for(cos, sin, mask, g), None) for g in gate_q]
            block.to("meta")  # free the block's weights
            release_freed_memory()  # the Hessians, GPTQ's temporaries and the block: give glibc's holes back
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
    ln_f.load_state_dict(
        {k: f.get_tensor(f"transformer.ln_f.{k}").to(device=device, dtype=dtype) for k in ln_f.state_dict()},
        assign=True,
    )
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


def _stop(module: nn.Module, args: tuple) -> None:
    raise _StopForward


def _linear_names(module: nn.Module, prefix: str) -> list[str]:
    return [prefix + n for n, m in module.named_modules() if isinstance(m, nn.Linear)]


class _HessianCollector:
    """Forward pre-hooks feeding each Linear's inputs to its own GPTQ, except that Linears handed the very same input
    tensor in one forward (the MLP's fc_1 and fc_2) share one GPTQ: one Hessian computed instead of two."""

    def __init__(self, layers: dict[str, nn.Module], device: torch.device) -> None:
        from litquant.quantization.gptq import GPTQ

        self.gptqs: dict[str, GPTQ] = {}
        self._seen: list[tuple[torch.Tensor, GPTQ]] = []  # inputs of the current forward, and where they went
        # an in_features² Hessian: made once per layer
        self._new = lambda layer: GPTQ(layer.in_features, device)
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
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

    def shared(self) -> bool:
        """Did every Linear get the same input (one GPTQ for all)? Then the first one's input is all we need."""
        return len(self.gptqs) == len(self._handles) and len({id(g) for g in self.gptqs.values()}) == 1

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
    forward of the block replace the whole module by `proj(recorded input)` (`start`), computed once per batch and
    then kept in its place: the MLP steps and the block's output pass skip qkv, RoPE, SDPA and the attention's
    proj, the output pass also the MLP's up-projections; `norm`, the norm whose output only this module reads, is
    skipped as well. Costs one copy of proj's inputs (then outputs) over the calibration batches, for the length
    of one block."""

    def __init__(self, module: nn.Module, prefix: str, norm: Optional[nn.Module] = None) -> None:
        self.module, self.norm, self.batch, self.active = module, norm, 0, False
        self.linears = set(_linear_names(module, prefix))
        self.proj = prefix + "proj"
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._handle = None

    def usable(self, group: tuple[str, ...], done: set[str]) -> bool:
        """True when `group` calibrates proj and every other Linear of the module is already quantized."""
        return self.proj in group and self.linears - {self.proj} <= done

    def record(self) -> None:
        def hook(module: nn.Module, args: tuple) -> None:
            self.inputs[self.batch] = args[0]

        self._handle = self.module.proj.register_forward_pre_hook(hook)

    def _output(self) -> torch.Tensor:
        b = self.batch
        if b not in self.outputs:  # proj is quantized now: its output is final too
            self.outputs[b] = self.module.proj(self.inputs.pop(b))
        return self.outputs[b]

    def start(self) -> None:
        self._handle.remove()
        self._handle = None
        self.module.forward = lambda *args, **kwargs: self._output()  # shadows the class's
        if self.norm is not None:
            self.norm.forward = lambda x: x  # what it would compute goes nowhere now
        self.active = True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        if self.active:
            del self.module.forward
            if self.norm is not None:
                del self.norm.forward
        self.active = False
        self.inputs.clear()
        self.outputs.clear()


def _load_block(
    f, block: nn.Module, prefix: str, keys: list[str], device: torch.device, dtype: torch.dtype, source: Path
) -> dict[str, torch.Tensor]:
    """Stream one block's tensors from the open safetensors file onto the device (replacing the meta ones), in
    the calibration dtype. Returns, on the device, the float tensors whose stored dtype differs from it, as
    stored, so that GPTQ quantizes the real weights (keyed by name within the block)."""
    state, stored = {}, {}
    for k in keys:
        t = f.get_tensor(k)
        name = k[len(prefix) :]
        if t.is_floating_point() and t.dtype != dtype and name.endswith(".weight"):
            stored[name] = t.to(device)
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    try:
        block.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(
            f"{source}: block {prefix[:-1]} does not match model_config.yaml ({detail})"
        ) from None
    return stored


def output_plan(f, quantized: list[str], bits: int, group_size: int):
    """The output file's tensors (meta): the source's, less the quantized weights, plus their AutoGPTQ tensors."""
    from litquant.quantization.gptq_format import packed_shapes

    skip = {m + ".weight" for m in quantized}
    dtypes = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
    for key in f.keys():
        if key not in skip:
            sl = f.get_slice(key)
            yield key, torch.empty(sl.get_shape(), dtype=DTYPES[sl.get_dtype()], device="meta")
    for m in quantized:
        out_features, in_features = f.get_slice(m + ".weight").get_shape()
        for attr, shape in packed_shapes(in_features, out_features, bits, group_size).items():
            yield f"{m}.{attr}", torch.empty(shape, dtype=dtypes[attr], device="meta")


def check_shapes(config: Config, bits: int) -> None:
    """Fail before any work when a Linear cannot be packed at this bit width."""
    from litquant.quantization.gptq_format import check_packable

    block = build_model(config, "meta").transformer.h[0]
    for name, m in block.named_modules():
        if isinstance(m, nn.Linear):
            try:
                check_packable(m.in_features, m.out_features, bits)
            except UserError as e:
                raise UserError(f"{name}: {e}") from None
