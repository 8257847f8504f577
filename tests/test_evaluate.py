"""`litquant evaluate`: perplexity against a direct computation, across precisions and modes, datasets, errors."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SAMPLE_TEXT, make_checkpoint, run_cli

from litquant.errors import UserError
from litquant.evaluation import load_text, text_tokens
from litquant.jobs.evaluate import main
from litquant.tokenizer import Tokenizer

WINDOW = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    # block_size 64, std 0.05 random weights: logits far enough from uniform for quantization to show
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "tiny-llama-test")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(SAMPLE_TEXT[:3000])
    return path


def _reference_ppl(ckpt: Path, text: str, window: int, stride: int, max_tokens: int) -> tuple[float, int]:
    """Score each target token once, in the first window (of the documented window list) that has it as a target.
    (Windows that do not overlap leave their first token unscored: it has no context inside its window.)"""
    from litquant.checkpoint import load_model

    model = load_model(ckpt, progress=False)
    ids = Tokenizer(ckpt).encode(text)[:max_tokens]
    n = ids.numel()
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    logprob = {}  # target position -> log p(token | its window's prefix)
    with torch.no_grad():
        for s in starts:
            lp = F.log_softmax(model(ids[s : s + window][None]).float()[0], dim=-1)  # (window, V)
            for j in range(window - 1):
                p = s + 1 + j
                logprob.setdefault(p, lp[j, ids[p]].item())
    nll = -sum(logprob.values()) / len(logprob)
    return math.exp(nll), len(logprob)


@pytest.mark.parametrize("stride,max_tokens", [(WINDOW, 4 * WINDOW), (WINDOW // 2, 5 * WINDOW + 7)])
def test_perplexity_equals_direct_computation(ckpt, text_file, tmp_path, stride, max_tokens):
    out = tmp_path / "ppl.json"
    res = main(
        ckpt,
        data_path=text_file,
        window=WINDOW,
        stride=stride,
        max_tokens=max_tokens,
        accelerator="cpu",
        precision="32-true",
        out_file=out,
    )
    ref, count = _reference_ppl(ckpt, text_file.read_text(), WINDOW, stride, max_tokens)
    # no overlap: every window but its first token; overlap (and a last window aligned to the end): all but token 0
    assert (
        res["tokens_scored"]
        == count
        == (max_tokens - max_tokens // WINDOW if stride == WINDOW else max_tokens - 1)
    )
    assert math.isclose(res["perplexity"], ref, rel_tol=1e-5)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["window"] == WINDOW and saved["stride"] == stride and saved["quantize"] is None


def test_precisions_and_quantized_modes(ckpt, text_file):
    from litquant.precision import quantize_modes

    common = dict(data_path=text_file, window=WINDOW, max_tokens=8 * WINDOW, accelerator="cpu")
    fp32 = main(ckpt, precision="32-true", **common)["perplexity"]
    bf16 = main(ckpt, precision="bf16-true", **common)["perplexity"]
    assert abs(bf16 / fp32 - 1) < 0.02
    registered = quantize_modes()
    if "bnb.nf4" not in registered or "bnb.int8" not in registered:
        pytest.skip("bnb modes are not registered")
    nf4 = main(ckpt, precision="32-true", quantize="bnb.nf4", **common)["perplexity"]
    int8 = main(ckpt, precision="32-true", quantize="bnb.int8", **common)["perplexity"]
    for q in (nf4, int8):
        assert math.isfinite(q) and 0.97 < q / fp32 < 1.25
    assert nf4 != fp32
    assert abs(int8 - fp32) < abs(nf4 - fp32)  # 8 bits lose less than 4


def test_json_records_give_the_same_perplexity_as_the_text_they_hold(ckpt, tmp_path):
    docs = [SAMPLE_TEXT[i : i + 700] for i in range(0, 2800, 700)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps([{"content": d} for d in docs]))
    plain = tmp_path / "data.txt"
    plain.write_text("\n\n".join(docs))
    kw = dict(window=WINDOW, accelerator="cpu", max_tokens=6 * WINDOW)
    a = main(ckpt, data_path=jsonl, **kw)
    b = main(ckpt, data_path=as_list, text_key="content", **kw)
    c = main(ckpt, data_path=plain, **kw)
    assert a["perplexity"] == b["perplexity"] == c["perplexity"]
    assert a["dataset"] == str(jsonl)


def test_lora_adapter_matches_hand_merged_weights(ckpt, text_file, tmp_path):
    lora = pytest.importorskip("litquant.lora")
    from litquant.checkpoint import load_model, save_checkpoint
    from litquant.io import open_safetensors

    cfg = lora.LoRAConfig(r=4, alpha=8.0, dropout=0.0, query=True, key=True, value=True, mlp=True)
    model = lora.add_lora(load_model(ckpt, progress=False), cfg)
    torch.manual_seed(0)
    tensors = {k: torch.randn_like(v) * 0.05 for k, v in lora.lora_state_dict(model).items()}
    adapter = tmp_path / "lit_model.lora.safetensors"
    lora.save_lora(tensors, adapter, cfg)
    # the same update, merged by hand: W + B @ A * alpha / r
    with open_safetensors(ckpt / "lit_model.safetensors") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for key in {k.rpartition(".")[0] for k in tensors}:
        state[f"{key}.weight"] = (
            state[f"{key}.weight"] + tensors[f"{key}.lora_B"] @ tensors[f"{key}.lora_A"] * 2.0
        )
    merged = tmp_path / "merged"
    import shutil

    shutil.copytree(ckpt, merged, ignore=shutil.ignore_patterns("lit_model*"))
    save_checkpoint(state, load_model(ckpt, progress=False).config, merged)
    kw = dict(
        data_path=text_file, window=WINDOW, max_tokens=4 * WINDOW, accelerator="cpu", precision="32-true"
    )
    with_adapter = main(ckpt, lora_path=adapter, **kw)
    base = main(ckpt, **kw)
    assert math.isclose(with_adapter["perplexity"], main(merged, **kw)["perplexity"], rel_tol=1e-4)
    assert not math.isclose(with_adapter["perplexity"], base["perplexity"], rel_tol=1e-3)
    assert with_adapter["lora_path"] == str(adapter)


def test_cli_default_dataset_prints_and_writes(ckpt, tmp_path):
    out = tmp_path / "out.json"
    p = run_cli(
        "evaluate",
        "--checkpoint_dir",
        str(ckpt),
        "--max_tokens",
        "200",
        "--window",
        "48",
        "--stride",
        "24",
        "--accelerator",
        "cpu",
        "--out_file",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    assert data["dataset"].startswith("bundled held-out split")
    assert f"Perplexity: {data['perplexity']:.4f}" in p.stdout
    assert data["tokens_scored"] == 199 and data["window"] == 48 and data["stride"] == 24
    # the same numbers in-process (what benchmark uses)
    again = main(ckpt, max_tokens=200, window=48, stride=24, accelerator="cpu")
    assert again["perplexity"] == data["perplexity"]


def test_bad_input(ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n ")
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"body": "x"}\n')
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    cases = [
        (dict(data_path=tmp_path / "missing.txt"), "dataset file not found"),
        (dict(data_path=empty), "is empty"),
        (dict(data_path=blank), "is empty"),
        (dict(data_path=no_field), r"has no field 'text' \(fields: body\); pass --text_key"),
        (dict(data_path=broken), "cannot read it as JSON"),
        (dict(window=65), "exceeds the model's context of 64 tokens"),
        (dict(window=1), "--window must be at least 2"),
        (dict(window=16, stride=17), "--stride must be between 1 and --window"),
        (dict(max_tokens=1), "--max_tokens must be at least 2"),
        (dict(quantize="bnb.nf9"), "unknown --quantize 'bnb.nf9'"),
        (dict(lora_path=tmp_path / "nope"), "does not exist|not found"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            main(ckpt, accelerator="cpu", **kwargs)
    tok = Tokenizer(ckpt)
    tok.use_bos = False
    with pytest.raises(UserError, match="perplexity needs at least 2"):
        text_tokens(tok, "a")
    # through the CLI: one line, exit 1, no traceback
    p = run_cli("evaluate", "--checkpoint_dir", str(ckpt), "--data_path", str(empty))
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [f"error: dataset {empty} is empty"]


def test_load_text_default_is_the_heldout_split():
    from litquant.data.corpus import heldout_text

    text, source = load_text(None)
    assert text == heldout_text() and "held-out" in source


BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints" / "litquant-tiny"


@pytest.mark.skipif(
    not (BUNDLED / "lit_model.safetensors").is_file(), reason="the bundled model is not there"
)
def test_bundled_model_quantization_costs_little_perplexity():
    """On the trained bundled model: 8 bits ~ lossless, 4 bits a little worse, NF4 better than FP4 (QLoRA)."""
    from litquant.precision import quantize_modes

    if not {"bnb.nf4", "bnb.fp4", "bnb.int8"} <= set(quantize_modes()):
        pytest.skip("bnb modes are not registered")
    ppl = {
        q: main(BUNDLED, precision="32-true", quantize=q, max_tokens=1024, accelerator="cpu")["perplexity"]
        for q in (None, "bnb.int8", "bnb.nf4", "bnb.fp4")
    }
    fp32 = ppl[None]
    assert all(math.isfinite(v) for v in ppl.values())
    assert abs(ppl["bnb.int8"] / fp32 - 1) < 0.005
    assert fp32 < ppl["bnb.nf4"] < ppl["bnb.fp4"] < 1.05 * fp32
