"""Hugging Face bitsandbytes models (config.json `quant_method: bitsandbytes`, as transformers' save_pretrained writes
them) <-> litquant's pre-quantized bnb file `lit_model_bnb.<mode>.safetensors`. The quantized bits move as they are,
never dequantized: 4-bit codes, absmax and double-quantization constants, int8 rows and their scales.

Per quantized Linear `<m>`:

    HF 4-bit   <m>.weight uint8 (ceil(n/2), 1)   .weight.absmax   .weight.quant_map (the 16 levels)
               [.weight.nested_absmax  .weight.nested_quant_map]   .weight.quant_state.bitsandbytes__nf4|fp4 (JSON
               bytes: quant_type, blocksize, dtype, shape[, nested_blocksize, nested_dtype, nested_offset])
    HF 8-bit   <m>.weight int8 (out, in)   <m>.SCB fp32 (out,)   <m>.weight_format uint8 () = 0 ("row")
    litquant   weight, absmax[, nested_absmax, nested_code, offset]   /   weight, absmax

q/k/v are split, fused or interleaved on rows (docs/ARCHITECTURE.md): a 4-bit row holds whole 64-blocks when
in_features % 64 == 0, and with double quantization each group of 256 blocks must come from one source group (its
nested absmax and offset), which the pieces' sizes decide; layers fused from separately quantized q/k/v keep one
offset per 256 blocks. `import_bnb` is the import, `BnbExport` the export (through litquant/hf/export.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional

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
    iter_lit_to_hf,
    layer_order,
    lit_name_of,
    name_template,
    qkv_sizes,
    weight_map,
)
from litquant.io import DTYPES, safetensors_metadata, write_safetensors
from litquant.quantization import bnb_format
from litquant.quantization.bnb import FOUR_BIT, BnbMode, prequantized_metadata
from litquant.quantization.bnb_linear import BLOCKSIZE, INT8_THRESHOLD, NESTED_BLOCKSIZE
from litquant.quantization.modes import get_mode

QUANT_STATE = "weight.quant_state.bitsandbytes__"
STATS_4BIT = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")
STATS_8BIT = ("SCB", "weight_format")
_PIECE = 1 << 40  # nested-group keys: piece * _PIECE + the piece's own group of 256 blocks

Rows = dict[str, torch.Tensor]


# ---- quantization_config -------------------------------------------------------------------------------------


def hf_bnb_mode(q: Mapping, source: str) -> BnbMode:
    """The litquant mode of an HF `quantization_config` (quant_method bitsandbytes)."""
    four = bool(q.get("load_in_4bit", q.get("_load_in_4bit", False)))
    eight = bool(q.get("load_in_8bit", q.get("_load_in_8bit", False)))
    if four == eight:
        raise UserError(f"{source}: quantization_config needs exactly one of load_in_4bit and load_in_8bit")
    if eight:
        if q.get("llm_int8_has_fp16_weight"):
            raise UserError(f"{source}: llm_int8_has_fp16_weight=true keeps fp16 weights, not int8 ones")
        threshold = float(q.get("llm_int8_threshold", INT8_THRESHOLD))
        if threshold != INT8_THRESHOLD:
            raise UserError(
                f"{source}: llm_int8_threshold {threshold}: litquant's bnb.int8 runs LLM.int8 at {INT8_THRESHOLD}"
            )
        return get_mode("bnb.int8")
    storage = q.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise UserError(f"{source}: bnb_4bit_quant_storage {storage!r} is not supported (only 'uint8')")
    quant_type = q.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in ("nf4", "fp4"):
        raise UserError(f"{source}: bnb_4bit_quant_type {quant_type!r} is not one of nf4, fp4")
    return get_mode(f"bnb.{quant_type}{'-dq' if q.get('bnb_4bit_use_double_quant') else ''}")


def bnb_quantization_config(mode: BnbMode, skip: list[str], dtype: torch.dtype) -> dict:
    """config.json's quantization_config for `mode`, with the keys transformers writes; `skip`: the HF names of
    the Linears left in full precision."""
    four = mode.four_bit
    quant_type, dq = FOUR_BIT[mode.kind] if four else ("fp4", False)
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": _dtype_name(dtype),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": dq,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": INT8_THRESHOLD,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- one layer: HF tensors <-> litquant tensors -----------------------------------------------------------------


def quant_state_json(t: torch.Tensor, where: str) -> dict:
    """The JSON object of a `weight.quant_state.bitsandbytes__*` tensor."""
    try:
        state = json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        state = None
    if not isinstance(state, dict):
        raise UserError(f"{where}: the quant_state tensor does not hold a JSON object")
    return state


def _json_tensor(state: dict) -> torch.Tensor:
    """`state` as bitsandbytes packs it (pack_dict_to_tensor: json.dumps, utf-8 bytes, uint8)."""
    return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)


def check_quant_state(state: dict, mode: BnbMode, shape: tuple[int, int], where: str) -> float:
    """A 4-bit quant_state must describe this layer as litquant runs it; returns its nested offset (0 without)."""
    quant_type, dq = FOUR_BIT[mode.kind]
    if state.get("quant_type") != quant_type:
        raise UserError(f"{where}: quant_state says {state.get('quant_type')!r}, the config {quant_type!r}")
    if state.get("blocksize") != BLOCKSIZE:
        raise UserError(
            f"{where}: blocksize {state.get('blocksize')!r} (litquant runs blocksize {BLOCKSIZE})"
        )
    if state.get("shape") != list(shape):
        raise UserError(f"{where}: quant_state shape {state.get('shape')} but the config needs {list(shape)}")
    if ("nested_offset" in state) != dq:
        raise UserError(f"{where}: the config says double quantization {dq}, the quant_state the opposite")
    if not dq:
        return 0.0
    if state.get("nested_blocksize") != NESTED_BLOCKSIZE or state.get("nested_dtype") != "float32":
        raise UserError(
            f"{where}: nested blocksize {state.get('nested_blocksize')!r} / dtype {state.get('nested_dtype')!r} "
            f"(litquant runs {NESTED_BLOCKSIZE} / float32)"
        )
    if not isinstance(state["nested_offset"], (int, float)) or isinstance(state["nested_offset"], bool):
        raise UserError(f"{where}: nested_offset {state['nested_offset']!r} is not a number")
    return float(state["nested_offset"])


def layer_spec(mode: BnbMode, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    """Meta tensors of a litquant layer's stored state in `mode` (the layer class's own empty state)."""
    layer = mode.make_linear(in_features, out_features, False, torch.float32, "meta")
    return layer._empty_state("meta")


def hf_layer_names(module: str, mode: BnbMode) -> list[str]:
    """The HF tensor names one quantized layer may store (bias aside)."""
    if not mode.four_bit:
        return [f"{module}.{a}" for a in ("weight", *STATS_8BIT)]
    quant_type = FOUR_BIT[mode.kind][0]
    return [f"{module}.{a}" for a in ("weight", *STATS_4BIT, QUANT_STATE + quant_type)]


def lit_from_hf(t: Mapping[str, torch.Tensor], mode: BnbMode, offset: float) -> dict[str, torch.Tensor]:
    """One HF layer's tensors (attr -> tensor, checked) -> litquant's, the same bits. `offset`: its nested offset."""
    if not mode.four_bit:
        return {"weight": t["weight"], "absmax": t["SCB"]}
    out = {"weight": t["weight"].reshape(-1, 1), "absmax": t["weight.absmax"]}
    if FOUR_BIT[mode.kind][1]:  # as QuantState.from_dict: torch.tensor(float(nested_offset)), fp32
        out.update(
            nested_absmax=t["weight.nested_absmax"],
            nested_code=t["weight.nested_quant_map"],
            offset=torch.tensor(offset, dtype=torch.float32),
        )
    return out


def hf_from_lit(
    t: Mapping[str, torch.Tensor], mode: BnbMode, shape: tuple[int, int], dtype: torch.dtype, where: str
) -> dict[str, torch.Tensor]:
    """One litquant layer's tensors -> the HF attrs and tensors bitsandbytes saves (QuantState.as_dict(packed=True),
    Linear8bitLt's SCB and weight_format)."""
    if not mode.four_bit:
        return {
            "weight": t["weight"],
            "SCB": t["absmax"],
            "weight_format": torch.tensor(0, dtype=torch.uint8),
        }
    quant_type, dq = FOUR_BIT[mode.kind]
    out = {
        "weight": t["weight"],
        "weight.absmax": t["absmax"],
        "weight.quant_map": bnb_format.code(quant_type).clone(),
    }
    state = {
        "quant_type": quant_type,
        "blocksize": BLOCKSIZE,
        "dtype": _dtype_name(dtype),
        "shape": list(shape),
    }
    if dq:
        offsets = t["offset"].reshape(-1)
        if not bool((offsets == offsets[0]).all()):
            raise UserError(
                f"{where}: its double-quantization offsets differ, bitsandbytes stores one per layer"
            )
        out.update({"weight.nested_absmax": t["nested_absmax"], "weight.nested_quant_map": t["nested_code"]})
        state.update(
            nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offsets[0].item()
        )
    out[QUANT_STATE + quant_type] = _json_tensor(state)
    return out


# ---- rows: how q/k/v move exactly -------------------------------------------------------------------------------


def _nested_keys(out_features: int, in_features: int, piece: int) -> torch.Tensor:
    """(out, in/64): for each 64-block, the group of 256 blocks it was double-quantized in, tagged by piece."""
    blocks = out_features * in_features // BLOCKSIZE
    keys = torch.arange(blocks, dtype=torch.int64) // NESTED_BLOCKSIZE + piece * _PIECE
    return keys.reshape(out_features, in_features // BLOCKSIZE)


def to_rows(t: Mapping[str, torch.Tensor], out_features: int, in_features: int, piece: int = 0) -> Rows:
    """A layer's litquant tensors as per-output-row tensors: int8 as stored; 4-bit codes and absmax per row and, with
    double quantization, each block's nested absmax, offset and group key ('nested_code' is the layer's)."""
    if t["weight"].dtype == torch.int8:
        return {"weight": t["weight"], "absmax": t["absmax"]}
    if in_features % BLOCKSIZE:
        raise UserError(f"in_features {in_features} is not a multiple of {BLOCKSIZE}: 4-bit rows cannot move")
    bpr = in_features // BLOCKSIZE
    rows = {
        "codes": t["weight"].reshape(out_features, in_features // 2),
        "absmax": t["absmax"].reshape(out_features, bpr),
    }
    if "offset" in t:
        keys = _nested_keys(out_features, in_features, piece)
        group = keys.reshape(-1) - piece * _PIECE
        offset = t["offset"]
        block_offset = offset.expand(group.numel()) if offset.dim() == 0 else offset[group]
        rows.update(
            key=keys,
            nabs=t["nested_absmax"][group].reshape(out_features, bpr),
            off=block_offset.reshape(out_features, bpr),
            nested_code=t["nested_code"],
        )
    return rows


def map_rows(rows: Rows, fn: Callable[[torch.Tensor], torch.Tensor]) -> Rows:
    """A row transform (a q/k/v piece, (de)interleaving) on every per-row tensor."""
    return {k: (v if k == "nested_code" else fn(v)) for k, v in rows.items()}


def cat_rows(parts: list[Rows], where: str) -> Rows:
    """Separately quantized layers stacked as one (q, k, v -> qkv)."""
    if "nested_code" in parts[0] and not all(
        torch.equal(p["nested_code"], parts[0]["nested_code"]) for p in parts
    ):
        raise UserError(f"{where}: q/k/v were double-quantized with different nested code tables")
    return {k: (v if k == "nested_code" else torch.cat([p[k] for p in parts])) for k, v in parts[0].items()}


def check_groups(keys: torch.Tensor, where: str) -> torch.Tensor:
    """Each group of 256 consecutive blocks must come from one source group; returns the first block of each."""
    flat = keys.reshape(-1)
    first = torch.arange(0, flat.numel(), NESTED_BLOCKSIZE)
    if not torch.equal(flat[first].repeat_interleave(NESTED_BLOCKSIZE)[: flat.numel()], flat):
        raise UserError(
            f"{where}: its double-quantization groups ({NESTED_BLOCKSIZE} blocks of {BLOCKSIZE} weights) straddle "
            "the q/k/v pieces, so the layer cannot be split or fused exactly"
        )
    return first


def from_rows(rows: Rows, where: str) -> dict[str, torch.Tensor]:
    """Rows back to a layer's litquant tensors; one offset if every group has the same, else one per group."""
    if "codes" not in rows:
        return {"weight": rows["weight"].contiguous(), "absmax": rows["absmax"].contiguous()}
    out = {
        "weight": rows["codes"].reshape(-1, 1).contiguous(),
        "absmax": rows["absmax"].reshape(-1).contiguous(),
    }
    if "key" in rows:
        first = check_groups(rows["key"], where)
        offsets = rows["off"].reshape(-1)[first]
        out.update(
            nested_absmax=rows["nabs"].reshape(-1)[first].contiguous(),
            nested_code=rows["nested_code"],
            offset=offsets[0].clone() if bool((offsets == offsets[0]).all()) else offsets.contiguous(),
        )
    return out


# ---- import -----------------------------------------------------------------------------------------------------


def hf_quantized_modules(headers: Mapping[str, torch.Tensor], mode: BnbMode) -> dict[str, set[str]]:
    """HF module -> the attrs it stores, for every layer that looks quantized (a uint8/int8 weight, or any bnb
    statistic), so a layer missing some of its tensors is named rather than taken for a plain one."""
    stats = (*STATS_4BIT, QUANT_STATE + "nf4", QUANT_STATE + "fp4") if mode.four_bit else STATS_8BIT
    qdtype = torch.uint8 if mode.four_bit else torch.int8
    found: dict[str, set[str]] = {}
    for name, t in headers.items():
        attr = next((a for a in stats if name.endswith("." + a)), None)
        if attr is None and name.endswith(".weight") and t.dtype == qdtype:
            attr = "weight"
        if attr is not None:
            found.setdefault(name[: -len(attr) - 1], set()).add(attr)
    return found


def _check_hf_layer(
    module: str, attrs: set[str], headers: Mapping, small: Mapping, mode: BnbMode, shape: tuple[int, int]
) -> float:
    """An HF quantized layer's tensors (headers; the small ones read) against the mode and the config's (out, in);
    returns its nested offset."""
    where = f"quantized layer {module!r}"
    names = [n.removeprefix(module + ".") for n in hf_layer_names(module, mode)]
    dq = mode.four_bit and FOUR_BIT[mode.kind][1]
    needed = [a for a in names if a != "weight_format" and (dq or "nested" not in a)]
    missing = [a for a in needed if a not in attrs]
    if missing:
        raise UserError(f"{where} has no {', '.join(missing)}")
    extra = sorted(attrs - set(needed) - {"weight_format"})
    if extra:
        raise UserError(f"{where}: unexpected {', '.join(extra)} for {mode.name}")
    expected = layer_spec(mode, *shape)
    w, want_w = headers[f"{module}.weight"], expected["weight"]
    # 4-bit codes: any shape of the right size ((n/2, 1) as bnb saves them, or flat)
    fits = w.numel() == want_w.numel() if mode.four_bit else w.shape == want_w.shape
    if w.dtype != want_w.dtype or not fits:
        raise UserError(
            f"{where}: weight is {_dtype_name(w.dtype)} {tuple(w.shape)}, a {mode.name} layer of "
            f"{shape[0]}x{shape[1]} needs {_dtype_name(expected['weight'].dtype)} {tuple(expected['weight'].shape)}"
        )
    stats = {"SCB": "absmax"} if not mode.four_bit else {"weight.absmax": "absmax"}
    if dq:
        stats.update({"weight.nested_absmax": "nested_absmax", "weight.nested_quant_map": "nested_code"})
    for attr, lit in stats.items():
        got, want = headers[f"{module}.{attr}"], expected[lit]
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            raise UserError(
                f"{where}: {attr} is {_dtype_name(got.dtype)} {tuple(got.shape)}, "
                f"{mode.name} needs {_dtype_name(want.dtype)} {tuple(want.shape)}"
            )
    if not mode.four_bit:
        fmt = small.get(f"{module}.weight_format")
        if fmt is not None and (fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != 0):
            raise UserError(f"{where}: weight_format {fmt.tolist()} (only 0, 'row', is supported)")
        return 0.0
    quant_type = FOUR_BIT[mode.kind][0]
    code = small[f"{module}.weight.quant_map"]
    if code.dtype != torch.float32 or not torch.equal(code.reshape(-1), bnb_format.code(quant_type)):
        raise UserError(f"{where}: quant_map is not bitsandbytes' {quant_type} table")
    state = quant_state_json(small[f"{module}.{QUANT_STATE}{quant_type}"], where)
    return check_quant_state(state, mode, shape, where)


class _Layer:
    """One litquant layer an import writes: its HF sources ({piece or None: HF module}), shape and offsets."""

    def __init__(self, name: str, out_features: int, in_features: int) -> None:
        self.name, self.out_features, self.in_features = name, out_features, in_features
        self.sources: dict[Optional[str], str] = {}
        self.offsets: dict[Optional[str], float] = {}

    def transform(self, config: Config) -> Optional[str]:
        """'fuse' (separate q/k/v), 'deinterleave' (HF's fused interleaved qkv) or None (a rename)."""
        if None not in self.sources:
            return "fuse"
        return "deinterleave" if self.name.endswith(".attn.qkv") and fused_hf_qkv(config) else None


def _rows_keys(layer: _Layer, config: Config) -> Optional[torch.Tensor]:
    """The nested-group keys of a transformed double-quantized layer (None: nothing moves)."""
    how = layer.transform(config)
    if how is None:
        return None
    if how == "deinterleave":
        return deinterleave_qkv(_nested_keys(layer.out_features, layer.in_features, 0), config)
    sizes = qkv_sizes(config)
    return torch.cat([_nested_keys(sizes[i], layer.in_features, i) for i in range(3)])


def _layers(
    found: Mapping[str, set[str]], headers: Mapping, small: Mapping, mode: BnbMode, config: Config
) -> dict[str, "_Layer"]:
    """The litquant layers an import writes, each HF layer checked and every row move known to be exact."""
    to_lit, shapes = import_map(config), expected_shapes(config)
    layers: dict[str, _Layer] = {}
    for m in sorted(found, key=layer_order):
        mapped = lit_name_of(m + ".weight", to_lit)
        if mapped is None or mapped[0] not in shapes:
            raise UserError(f"unexpected quantized layer {m!r} for this {hf_model_type(config)} config")
        lit, piece = mapped[0].removesuffix(".weight"), mapped[1]
        out_features, in_features = shapes[lit + ".weight"]
        layer = layers.setdefault(lit, _Layer(lit, out_features, in_features))
        rows = qkv_sizes(config)["qkv".index(piece)] if piece else out_features
        layer.sources[piece] = m
        layer.offsets[piece] = _check_hf_layer(m, found[m], headers, small, mode, (rows, in_features))
    for layer in layers.values():
        how = layer.transform(config)
        if how == "fuse" and len(layer.sources) < 3:
            quantized = " and ".join(layer.sources.values())
            raise UserError(f"{quantized} quantized but not all of its layer's q/k/v: litquant fuses them")
        if how and mode.four_bit and layer.in_features % BLOCKSIZE:
            raise UserError(
                f"{layer.name}: in_features {layer.in_features} % {BLOCKSIZE} != 0, q/k/v cannot move"
            )
        if how and mode.four_bit and FOUR_BIT[mode.kind][1]:
            check_groups(_rows_keys(layer, config), layer.name)
    return layers


def import_bnb(checkpoint_dir: Path, hf: dict, dtype: Optional[str], model_name: Optional[str]) -> None:
    """A bitsandbytes-quantized HF model -> `lit_model_bnb.<mode>.safetensors` (its quantized layers carried bit for
    bit, the other tensors converted as for a plain model) + `model_config.yaml`, in place. Everything is checked
    from the headers and the small tensors (quant_state JSON, code tables) before anything is written; then each
    layer is written once its tensors (and, for q/k/v, its siblings') have been read."""
    source = str(checkpoint_dir / "config.json")
    mode = hf_bnb_mode(hf["quantization_config"], source)
    torch_dtype = parse_dtype(dtype)
    config = hf_import_config(hf, checkpoint_dir, model_name)
    shapes = expected_shapes(config)
    files = hf_weight_files(checkpoint_dir)
    headers = dict(iter_hf_files(files, meta=True, progress=False))
    found = hf_quantized_modules(headers, mode)
    if not found:
        raise UserError(f"{source} says bitsandbytes but the weight files hold no {mode.name} layers")
    owner = {n: m for m in found for n in hf_layer_names(m, mode) if n in headers}  # tensor -> its HF layer
    small_names = {n for n in owner if n.endswith(("quant_map", "weight_format")) or QUANT_STATE in n}
    small = dict(iter_hf_files(files, only=small_names, progress=False))

    layers = _layers(found, headers, small, mode, config)
    plain = [n for n in headers if n not in owner]
    rest = {k: v for k, v in shapes.items() if k.removesuffix(".weight") not in layers}  # biases stay plain
    tie = hf.get("tie_word_embeddings") if "tie_word_embeddings" in hf else None

    def plan() -> Iterator[tuple[str, torch.Tensor]]:
        for layer in sorted(layers.values(), key=lambda x: layer_order(x.name)):
            spec = layer_spec(mode, layer.out_features, layer.in_features)
            if "offset" in spec and len(set(layer.offsets.values())) > 1:
                spec["offset"] = torch.empty(spec["nested_absmax"].shape, device="meta")
            yield from ((f"{layer.name}.{k}", v) for k, v in spec.items())
        yield from iter_hf_to_lit(((k, headers[k]) for k in plain), config, torch_dtype, tie, shapes=rest)

    def quantized_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        layer_of = {m: (layer, piece) for layer in layers.values() for piece, m in layer.sources.items()}
        stash: dict[str, dict[str, torch.Tensor]] = {}
        done: dict[str, dict[Optional[str], dict[str, torch.Tensor]]] = {}
        for name, tensor in iter_hf_files(files, only=set(owner)):
            m = owner[name]
            got = stash.setdefault(m, {})
            got[name.removeprefix(m + ".")] = tensor
            if len(got) < len(found[m]):
                continue
            layer, piece = layer_of[m]
            parts = done.setdefault(layer.name, {})
            parts[piece] = lit_from_hf(stash.pop(m), mode, layer.offsets[piece])
            if len(parts) < len(layer.sources):
                continue
            yield from (
                (f"{layer.name}.{k}", v) for k, v in _lit_layer(done.pop(layer.name), layer, config).items()
            )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from quantized_tensors()
        yield from iter_hf_to_lit(
            iter_hf_files(files, only=set(plain)), config, torch_dtype, tie, shapes=rest
        )

    out = checkpoint_dir / mode.prequantized
    quantize_lm_head = "lm_head" in layers
    metadata = prequantized_metadata(mode, quantize_lm_head, torch_dtype, files[0])
    metadata["source_format"] = "hf-bitsandbytes"
    write_safetensors(out, tensors(), plan(), metadata=metadata)
    config.save(checkpoint_dir)
    flags = " --quantize_lm_head true" if quantize_lm_head else ""
    print(
        f"Wrote {out} ({len(layers)} {mode.name} layers, carried bit for bit) and {CONFIG_FILE}; "
        f"run it with --quantize {mode.name}{flags}",
        flush=True,
    )


def _lit_layer(parts: dict[Optional[str], dict[str, torch.Tensor]], layer: _Layer, config: Config) -> dict:
    """A litquant layer from its HF layers' litquant tensors: as is, q/k/v fused, or rows deinterleaved."""
    how = layer.transform(config)
    if how is None:
        return parts[None]
    if how == "deinterleave":
        rows = to_rows(parts[None], layer.out_features, layer.in_features)
        return from_rows(map_rows(rows, lambda r: deinterleave_qkv(r, config)), layer.name)
    sizes = qkv_sizes(config)
    rows = [to_rows(parts[p], sizes[i], layer.in_features, i) for i, p in enumerate("qkv")]
    return from_rows(cat_rows(rows, layer.name), layer.name)


# ---- export -----------------------------------------------------------------------------------------------------


class BnbExport(QuantizedExport):
    """`convert_lit_checkpoint --quantize bnb.<mode>`: the pre-quantized file as a bitsandbytes HF model."""

    def __init__(self, checkpoint_dir: Path, mode: BnbMode) -> None:
        self.mode, self.weights = mode, Path(checkpoint_dir) / mode.prequantized
        meta = safetensors_metadata(self.weights)
        if meta.get("litquant_bnb") != "1" or meta.get("mode") != mode.storage:
            raise UserError(
                f"{self.weights} is not a bnb.{mode.storage} file (made by `litquant quantize bnb`)"
            )
        self.attrs = (*layer_spec(mode, BLOCKSIZE, BLOCKSIZE), "bias")  # what a stored layer owns
        self.dtype = torch.float32  # of the full-precision tensors: the quant_state's dtype
        self.shapes: dict[str, torch.Size] = {}

    def split(self, names: list[str]) -> tuple[list[str], list[str]]:
        modules = {n.removesuffix(".absmax") for n in names if n.endswith(".absmax")}
        plain = [n for n in names if n.rpartition(".")[0] not in modules]
        return sorted(modules, key=layer_order), plain

    def check(self, modules: list[str], slices: Mapping, config: Config) -> None:
        self.shapes = expected_shapes(config)
        to_hf = {lit: hf for hf, lit in weight_map(config).items()}
        for m in modules:
            pieces = hf_pieces(m + ".weight", config, to_hf) if m + ".weight" in self.shapes else None
            if pieces is None:
                raise UserError(f"{self.weights}: quantized layer {m!r} does not match the config")
            out_features, in_features = self.shapes[m + ".weight"]
            spec = layer_spec(self.mode, out_features, in_features)
            if (m + ".bias" in self.shapes) != (m + ".bias" in slices):
                raise UserError(f"{self.weights}: quantized layer {m!r} and the config disagree on its bias")
            for attr, want in spec.items():
                s = slices.get(f"{m}.{attr}")
                got = None if s is None else (DTYPES[s.get_dtype()], tuple(s.get_shape()))
                allowed = [(want.dtype, tuple(want.shape))]
                if attr == "offset":
                    allowed.append((torch.float32, tuple(spec["nested_absmax"].shape)))
                if got not in allowed:
                    raise UserError(
                        f"{self.weights}: {m}.{attr} is {got}, a {out_features}x{in_features} {self.mode.name} "
                        f"layer needs {allowed[0]}"
                    )
            if pieces[0][1] is not None and self.mode.four_bit:  # q/k/v split or interleaved on rows
                if in_features % BLOCKSIZE:
                    raise UserError(
                        f"{m}: in_features {in_features} % {BLOCKSIZE} != 0, q/k/v cannot be split"
                    )
                if "offset" in spec:
                    keys = _nested_keys(out_features, in_features, 0)
                    for _, fn in pieces:
                        check_groups(fn(keys), m)

    def size(self, module: str, slices: Mapping) -> int:
        return sum(nbytes(slices[f"{module}.{a}"]) for a in self.attrs if f"{module}.{a}" in slices)

    def plan(self, f, module: str, slices: Mapping, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self._hf_tensors(f, module, slices, config, meta=True):
            yield name, torch.empty(t.shape, dtype=t.dtype, device="meta")

    def tensors(self, f, module: str, slices: Mapping, config: Config) -> Iterator[tuple[str, torch.Tensor]]:
        return self._hf_tensors(f, module, slices, config, meta=False)

    def _hf_tensors(self, f, module: str, slices: Mapping, config: Config, meta: bool):
        """The HF tensors a stored layer becomes. meta=True is for the plan: a renamed layer reads only its offset
        (the quant_state JSON holds its digits), a split one is computed (one layer at a time) for its shapes."""
        to_hf = {lit: hf for hf, lit in weight_map(config).items()}
        out_features, in_features = self.shapes[module + ".weight"]
        pieces = hf_pieces(module + ".weight", config, to_hf)
        rename = pieces[0][1] is None
        names = [a for a in self.attrs if a != "bias" and f"{module}.{a}" in slices]
        t = {
            a: _empty(slices, f"{module}.{a}")
            if meta and rename and a != "offset"
            else f.get_tensor(f"{module}.{a}")
            for a in names
        }
        if rename:
            layers = [(pieces[0][0], t, out_features)]
        else:
            rows = to_rows(t, out_features, in_features)
            layers = [
                (hf, from_rows(map_rows(rows, fn), module), fn(rows["absmax"]).shape[0]) for hf, fn in pieces
            ]
        for hf_name, lt, rows_out in layers:
            hf_module = hf_name.removesuffix(".weight")
            hf_t = hf_from_lit(lt, self.mode, (rows_out, in_features), self.dtype, hf_module)
            yield from ((f"{hf_module}.{a}", v) for a, v in hf_t.items())
        if f"{module}.bias" in slices:
            bias = _empty(slices, f"{module}.bias") if meta else f.get_tensor(f"{module}.bias")
            yield from iter_lit_to_hf([(f"{module}.bias", bias)], config)

    def quantization_config(self, modules: list[str], config: Config, dtype: torch.dtype) -> dict:
        self.dtype = dtype
        return bnb_quantization_config(self.mode, _skipped(modules, config), dtype)


def _empty(slices: Mapping, name: str) -> torch.Tensor:
    s = slices[name]
    return torch.empty(s.get_shape(), dtype=DTYPES[s.get_dtype()], device="meta")


def _skipped(modules: Iterable[str], config: Config) -> list[str]:
    """HF names of the Linears a file keeps in full precision (llm_int8_skip_modules), with the other names HF uses
    for the same module (transformers 5 calls GPT-NeoX's embed_out lm_head in memory, where skips are matched)."""
    to_hf = {lit: hf for hf, lit in weight_map(config).items()}
    aliases: dict[str, list[str]] = {}
    for alias, lit in import_map(config).items():
        if alias not in to_hf.values():
            aliases.setdefault(to_hf[lit], []).append(alias)
    quantized = set(modules)
    linears = [
        k.removesuffix(".weight")
        for k, v in expected_shapes(config).items()
        if k.endswith(".weight") and len(v) == 2 and k != "transformer.wte.weight"
    ]
    names = []
    for m in sorted(linears, key=layer_order):
        if m not in quantized:
            for hf, _ in hf_pieces(m + ".weight", config, to_hf):
                template, layer = name_template(hf)
                names += [
                    n.format(layer).removesuffix(".weight") for n in (template, *aliases.get(template, []))
                ]
    return names
