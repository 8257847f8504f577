"""AutoGPTQ-format HF models <-> litquant GPTQ checkpoints. Each quantized Linear is `<module>.{qweight, qzeros,
scales, g_idx[, bias]}` (litquant/quantization/gptq_format.py); renaming is a plain rename, and q/k/v are split,
fused or interleaved on the unpacked rows, exactly (docs/ARCHITECTURE.md). `import_gptq` is the import;
`GPTQExport` the export (through `litquant/hf/export.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

import torch

from litquant.config import CONFIG_FILE, Config
from litquant.errors import UserError
from litquant.hf.config import hf_import_config, hf_model_type, parse_dtype
from litquant.hf.export import QuantizedExport
from litquant.hf.files import hf_weight_files, iter_hf_files, nbytes
from litquant.hf.weights import (
    deinterleave_qkv,
    expected_shapes,
    fused_hf_qkv,
    hf_pieces,
    import_map,
    iter_hf_to_lit,
    layer_order,
    lit_name_of,
    qkv_sizes,
    weight_map,
)
from litquant.io import DTYPES, atomic_write_text, write_safetensors

GPTQ_ATTRS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def _gptq_rows(t: Mapping[str, torch.Tensor], bits: int, v2: bool = False) -> dict[str, torch.Tensor]:
    """One quantized Linear's tensors -> rows: {codes [out, in], zeros [out, groups] (true zero points),
    scales [out, groups], g_idx [in], bias [out] (if any)}. `v2`: qzeros store the zero itself, not zero - 1."""
    from litquant.quantization.gptq_format import unpack

    codes, zeros, scales, g_idx = unpack(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    if v2:
        zeros = zeros - 1
    rows = {"codes": codes, "zeros": zeros.t(), "scales": scales.t(), "g_idx": g_idx}
    if t.get("bias") is not None:
        rows["bias"] = t["bias"]
    return rows


def _gptq_pack_rows(rows: Mapping[str, torch.Tensor], bits: int, source: str) -> dict[str, torch.Tensor]:
    from litquant.quantization.gptq_format import pack

    if rows["zeros"].numel() and int(rows["zeros"].min()) < 1:
        raise UserError(
            f"{source}: a zero point of 0 cannot be stored in the GPTQ v1 format (qzeros = zero - 1)"
        )
    out = pack(rows["codes"], rows["zeros"].t(), rows["scales"].t(), rows["g_idx"], bits)
    if "bias" in rows:
        out["bias"] = rows["bias"].contiguous()
    return out


def _gptq_map_rows(rows: Mapping[str, torch.Tensor], fn) -> dict[str, torch.Tensor]:
    """Apply a row transform (split piece, interleave, ...) to every per-output tensor; g_idx is per input."""
    return {k: (v if k == "g_idx" else fn(v)) for k, v in rows.items()}


def iter_gptq_lit_to_hf(
    modules: Iterable[tuple[str, dict[str, torch.Tensor]]], config: Config, bits: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """(litquant module name, its GPTQ tensors) -> HF GPTQ tensors (names per family, qkv split/interleaved)."""
    to_hf = {lit: hf for hf, lit in weight_map(config).items()}
    for name, t in modules:
        pieces = hf_pieces(name + ".weight", config, to_hf)
        if pieces is None:
            raise UserError(
                f"quantized layer {name!r} has no Hugging Face {hf_model_type(config)} equivalent"
            )
        if pieces[0][1] is None:  # a rename: the packed tensors are kept as they are
            hf_module = pieces[0][0].removesuffix(".weight")
            for attr, v in t.items():
                yield f"{hf_module}.{attr}", v
            continue
        # q/k/v: the fp weight's row transform on the unpacked rows, each piece repacked
        rows = _gptq_rows(t, bits)
        for hf_name, fn in pieces:
            for attr, v in _gptq_pack_rows(_gptq_map_rows(rows, fn), bits, name).items():
                yield f"{hf_name.removesuffix('.weight')}.{attr}", v


def gptq_plan_hf(
    module: str, slices: Mapping, config: Config, bits: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Meta tensors of what `iter_gptq_lit_to_hf` makes of one stored litquant GPTQ layer."""
    to_hf = {lit: hf for hf, lit in weight_map(config).items()}
    in_features = slices[f"{module}.g_idx"].get_shape()[0]
    groups, out_features = slices[f"{module}.scales"].get_shape()
    bias = DTYPES[slices[f"{module}.bias"].get_dtype()] if f"{module}.bias" in slices else None
    pieces = hf_pieces(module + ".weight", config, to_hf)
    if pieces is None:
        raise UserError(f"quantized layer {module!r} has no Hugging Face {hf_model_type(config)} equivalent")
    for hf_name, fn in pieces:  # a piece's outputs: its row transform applied to a meta row
        out = out_features if fn is None else fn(torch.empty(out_features, device="meta")).shape[0]
        yield from _gptq_plan(hf_name.removesuffix(".weight"), in_features, out, groups, bits, bias)


def gptq_modules(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split tensor names into quantized module names (those with a qweight) and plain tensor names."""
    names = list(names)
    modules = {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}
    plain = [n for n in names if n.rpartition(".")[0] not in modules]
    return sorted(modules, key=layer_order), plain


def _gptq_plan(
    module: str, in_features: int, out_features: int, groups: int, bits: int, bias: Optional[torch.dtype]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Meta tensors of one quantized layer's AutoGPTQ tensors (a file's plan: the layout's shapes)."""
    shapes = {
        "qweight": ((in_features * bits + 31) // 32, out_features),
        "qzeros": (groups, out_features * bits // 32),
        "scales": (groups, out_features),
        "g_idx": (in_features,),
    }
    dtypes = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
    for attr, shape in shapes.items():
        yield f"{module}.{attr}", torch.empty(shape, dtype=dtypes[attr], device="meta")
    if bias is not None:
        yield f"{module}.bias", torch.empty(out_features, dtype=bias, device="meta")


def import_gptq(checkpoint_dir: Path, hf: dict, dtype: Optional[str], model_name: Optional[str]) -> None:
    """An AutoGPTQ-format HF model (config.json quantization_config.quant_method == "gptq") ->
    `lit_model_gptq.<bits>bit.safetensors` + `quantize_config.json` + `model_config.yaml`, in place. Streamed:
    a layer is converted and written as soon as its tensors (and, for q/k/v, its siblings') have been read."""
    from litquant.quantization.gptq_format import check_shapes, default_g_idx, num_groups
    from litquant.quantization.gptq_plugin import check_quantize_config, gptq_file, quantize_config

    source = str(checkpoint_dir / "config.json")
    # gptqmodel keeps the settings that do not change the layout (damp_percent, ...) under "meta"
    meta = hf["quantization_config"].get("meta")
    q = {**(meta if isinstance(meta, dict) else {}), **hf["quantization_config"]}
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise UserError(
            f"{source}: GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2')"
        )
    v2 = fmt == "gptq_v2"
    check_quantize_config({**q, "checkpoint_format": "gptq"}, source)
    bits, group_size = int(q["bits"]), int(q["group_size"])
    qc = quantize_config(
        bits,
        group_size,
        bool(q.get("desc_act", False)),
        bool(q.get("sym", False)),
        float(q.get("damp_percent", 0.01)),
        bool(q.get("true_sequential", True)),
        bool(q.get("static_groups", False)),
    )
    torch_dtype = parse_dtype(dtype)
    config = hf_import_config(hf, checkpoint_dir, model_name)
    to_lit = import_map(config)
    shapes = expected_shapes(config)

    files = hf_weight_files(checkpoint_dir)
    headers = dict(iter_hf_files(files, meta=True))  # names, dtypes and shapes: nothing read yet
    hf_modules, plain = gptq_modules(headers)
    if not hf_modules:
        raise UserError(f"{source} says GPTQ but the weight files hold no quantized layers (*.qweight)")
    expected_attrs = {m: {a for a in GPTQ_ATTRS if f"{m}.{a}" in headers} for m in hf_modules}

    def lit_module_of(hf_module: str) -> tuple[str, Optional[str]]:
        """(the litquant layer an HF quantized layer belongs to, its q/k/v piece if it is one)"""
        mapped = lit_name_of(hf_module + ".weight", to_lit)
        if mapped is None:
            raise UserError(f"unexpected quantized layer {hf_module!r} for a {hf_model_type(config)} model")
        return mapped[0].removesuffix(".weight"), mapped[1]

    quantized = {lit_module_of(m)[0] for m in hf_modules}
    for m in quantized:
        if m + ".weight" not in shapes:
            raise UserError(f"{source}: quantized layer {m!r} is not in this {hf_model_type(config)} config")
    rest = {k: v for k, v in shapes.items() if k.rpartition(".")[0] not in quantized}
    tie = hf.get("tie_word_embeddings") if "tie_word_embeddings" in hf else None

    def check_layer(hf_module: str, t: dict[str, torch.Tensor], fused_name: str, piece: Optional[str]):
        want = shapes[fused_name + ".weight"]
        if piece:  # (out, in) of this piece of the fused layer
            want = (qkv_sizes(config)["qkv".index(piece)], want[1])
        for a in ("qzeros", "scales"):
            if a not in t:
                raise UserError(f"quantized layer {hf_module!r} has no {a}")
        in_features = t["qweight"].shape[0] * 32 // bits
        if "g_idx" not in t:  # GPTQ-for-LLaMa era files: no act-order, groups in channel order
            t["g_idx"] = default_g_idx(in_features, group_size)
        t["g_idx"] = t["g_idx"].to(torch.int32)
        t["scales"] = t["scales"].to(torch.float16)
        check_shapes(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
        has_bias = fused_name + ".bias" in shapes
        if "bias" in t and not has_bias:
            if bool(t["bias"].any()):
                raise UserError(f"quantized layer {hf_module!r} has a bias but the config has none")
            del t["bias"]  # AutoGPTQ saved an all-zero bias for bias-free layers
        elif "bias" not in t and has_bias:
            raise UserError(f"quantized layer {hf_module!r} has no bias but the config needs one")
        if "bias" in t and torch_dtype is not None:
            t["bias"] = t["bias"].to(torch_dtype)
        if (t["scales"].shape[1], in_features) != tuple(want):
            raise UserError(
                f"quantized layer {hf_module!r} is {t['scales'].shape[1]}x{in_features} (out x in) "
                f"but the config needs {tuple(want)[0]}x{tuple(want)[1]}"
            )
        return t

    def quantized_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        """Each quantized layer once all its tensors have been read: checked, q/k/v fused, renamed."""
        wanted = {f"{m}.{a}" for m, attrs in expected_attrs.items() for a in attrs}
        stash: dict[str, dict[str, torch.Tensor]] = {}
        pending: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for name, tensor in iter_hf_files(files, only=wanted):
            hf_module, _, attr = name.rpartition(".")
            got = stash.setdefault(hf_module, {})
            got[attr] = tensor
            if len(got) < len(expected_attrs[hf_module]):
                continue
            t = stash.pop(hf_module)
            lit_module, piece = lit_module_of(hf_module)
            t = check_layer(hf_module, t, lit_module, piece)
            if piece:  # separate q/k/v: concatenate their rows once all three are here
                pending.setdefault(lit_module, {})[piece] = t
                if len(pending[lit_module]) < 3:
                    continue
                got3 = pending.pop(lit_module)
                parts = [_gptq_rows(got3[p], bits, v2) for p in "qkv"]
                if not all(torch.equal(p["g_idx"], parts[0]["g_idx"]) for p in parts):
                    raise UserError(
                        f"{hf_module.rsplit('.', 1)[0]}: q/k/v were quantized with different g_idx "
                        "(act-order permutations), so they cannot be fused into one qkv layer"
                    )
                rows = {
                    k: (parts[0][k] if k == "g_idx" else torch.cat([p[k] for p in parts])) for k in parts[0]
                }
                t = _gptq_pack_rows(rows, bits, hf_module)
            elif lit_module.endswith(".attn.qkv") and fused_hf_qkv(config):
                t = _gptq_pack_rows(
                    _gptq_map_rows(_gptq_rows(t, bits, v2), lambda r: deinterleave_qkv(r, config)),
                    bits,
                    hf_module,
                )
            elif v2:
                t = _gptq_pack_rows(_gptq_rows(t, bits, v2), bits, hf_module)
            for a, v in t.items():
                yield f"{lit_module}.{a}", v
        if pending:
            qkv, parts = next(iter(pending.items()))
            raise UserError(
                f"incomplete quantized attention: {qkv} lacks {', '.join(p for p in 'qkv' if p not in parts)}"
            )

    def plan() -> Iterator[tuple[str, torch.Tensor]]:
        for m in sorted(quantized, key=layer_order):
            out_features, in_features = shapes[m + ".weight"]
            hf_bias = [
                headers[f"{h}.bias"].dtype
                for h in hf_modules
                if f"{h}.bias" in headers and lit_module_of(h)[0] == m
            ]
            bias = (torch_dtype or hf_bias[0]) if m + ".bias" in shapes and hf_bias else None
            yield from _gptq_plan(
                m, in_features, out_features, num_groups(in_features, group_size), bits, bias
            )
        yield from iter_hf_to_lit(((k, headers[k]) for k in plain), config, torch_dtype, tie, shapes=rest)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from quantized_tensors()
        yield from iter_hf_to_lit(
            iter_hf_files(files, only=set(plain)), config, torch_dtype, tie, shapes=rest
        )

    out = checkpoint_dir / gptq_file(bits)
    write_safetensors(
        out, tensors(), plan(), metadata={"format": "pt", "litquant": "1", "quantize_config": json.dumps(qc)}
    )
    write_quantize_config(checkpoint_dir, qc)
    config.save(checkpoint_dir)
    print(
        f"Wrote {out} ({len(quantized)} GPTQ layers, {bits} bits, group_size {group_size}) and {CONFIG_FILE}; "
        f"run it with --quantize gptq.int{bits}",
        flush=True,
    )


def gptq_export_source(checkpoint_dir: Path, bits: int) -> tuple[Path, dict]:
    """The GPTQ file an export of `bits` reads, and its quantize config."""
    from litquant.quantization.gptq_plugin import gptq_file, read_quantize_config

    weights = checkpoint_dir / gptq_file(bits)
    if not weights.is_file():
        raise UserError(
            f"{checkpoint_dir} has no {weights.name}: make it with `litquant quantize gptq --bits {bits}`"
        )
    qc = read_quantize_config(weights)
    if qc["bits"] != bits:
        raise UserError(f"{weights} was quantized with {qc['bits']} bits, not {bits}")
    return weights, qc


def check_gptq_layers(
    modules: Iterable[str], slices: Mapping, config: Config, bits: int, source: Path
) -> None:
    """The stored quantized layers must match the config (from their headers; nothing read)."""
    shapes = expected_shapes(config)
    for m in modules:
        want = shapes.get(m + ".weight")
        qshape = slices[m + ".qweight"].get_shape()
        out_features = slices[m + ".scales"].get_shape()[1] if m + ".scales" in slices else None
        if want is None or (out_features, qshape[0] * 32 // bits) != tuple(want):
            raise UserError(f"{source}: quantized layer {m!r} does not match the config")


def gptq_layer_tensors(f, slices: Mapping, module: str, bits: int) -> dict[str, torch.Tensor]:
    """One stored quantized layer's tensors, read from the open file `f` and checked against each other."""
    from litquant.quantization.gptq_format import check_shapes

    t = {a: f.get_tensor(f"{module}.{a}") for a in GPTQ_ATTRS if f"{module}.{a}" in slices}
    check_shapes(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    return t


def write_quantize_config(directory: Path, qc: dict) -> None:
    """`quantize_config.json` (AutoGPTQ's file, also read by litquant) in `directory`."""
    from litquant.quantization.gptq_plugin import QUANTIZE_CONFIG_FILE

    atomic_write_text(directory / QUANTIZE_CONFIG_FILE, json.dumps(qc, indent=2) + "\n")


class GPTQExport(QuantizedExport):
    """`convert_lit_checkpoint --quantize gptq.int<bits>`: the GPTQ file as an AutoGPTQ-format model."""

    def __init__(self, checkpoint_dir: Path, bits: int) -> None:
        self.bits = bits
        self.weights, self.qc = gptq_export_source(checkpoint_dir, bits)

    def split(self, names: list[str]) -> tuple[list[str], list[str]]:
        return gptq_modules(names)

    def check(self, modules: list[str], slices: Mapping, config: Config) -> None:
        check_gptq_layers(modules, slices, config, self.bits, self.weights)

    def size(self, module: str, slices: Mapping) -> int:
        return sum(nbytes(slices[f"{module}.{a}"]) for a in GPTQ_ATTRS if f"{module}.{a}" in slices)

    def plan(self, f, module: str, slices: Mapping, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
        return gptq_plan_hf(module, slices, config, self.bits)

    def tensors(self, f, module: str, slices: Mapping, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
        layer = gptq_layer_tensors(f, slices, module, self.bits)
        return iter_gptq_lit_to_hf([(module, layer)], config, self.bits)

    def quantization_config(self, modules: list[str], config: Config, dtype: torch.dtype) -> dict:
        return self.qc

    def finish(self, output_dir: Path) -> None:
        write_quantize_config(output_dir, self.qc)
