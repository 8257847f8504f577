"""Batched generation: the same greedy tokens as one sequence at a time in every mode, rows that finish or are
cancelled freed, LLM.int8 deciding outliers per sequence, stop strings, the Python API and the generate job."""

import json
import shutil

import pytest
import torch
from conftest import REPO, run_cli

from litquant.api import LLM
from litquant.errors import UserError
from litquant.generation import BatchDecoder, SamplingParams, Sequence, generate, run

BUNDLED = REPO / "checkpoints" / "litquant-tiny"
PROMPTS = [
    "def fib(",
    "import os\nimport sys\n\ndef main(",
    "class Foo:\n    def __init__(self",
    "x = [",
    "# compute the sum of a list\ndef total(xs):\n    ",
    "for i in range(",
    "import os\nimport re\n\ndef f(",
]


@pytest.fixture(scope="module")
def bundled_with_gptq(tmp_path_factory):
    from litquant.jobs.quantize import gptq

    d = tmp_path_factory.mktemp("gptq") / "litquant-tiny"
    shutil.copytree(BUNDLED, d)
    gptq(d, n_samples=8, seq_len=64, eval_tokens=0)
    return d


def _seq(llm, prompt, n=24, **kw):
    ids = llm.tokenizer.encode(prompt).tolist()
    params = SamplingParams(n, temperature=0.0, stop_ids=frozenset(llm.tokenizer.stop_ids), **kw)
    return Sequence(ids, params, decoder=llm.tokenizer.stream_decoder(ids[-1:]))


@pytest.mark.parametrize(
    "mode", [None, "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8", "gptq.int4"]
)
def test_batched_greedy_equals_one_at_a_time(bundled_with_gptq, mode):
    """Sequences of different lengths joining and leaving a batch of 3 decode the tokens they decode alone. In fp32:
    in bf16 the kernels' rounding depends on the batch (blocking by row count), so near-ties may differ."""
    _check_batched(bundled_with_gptq, mode, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", [None, "bnb.nf4", "bnb.int8", "gptq.int4"])
def test_batched_greedy_equals_one_at_a_time_on_cuda(bundled_with_gptq, mode):
    _check_batched(bundled_with_gptq, mode, "cuda")


def _check_batched(checkpoint, mode, accelerator):
    llm = LLM.load(checkpoint, quantize=mode, precision="32-true", accelerator=accelerator, progress=False)
    with llm.plugin.forward_context():
        alone = []
        for i, p in enumerate(PROMPTS):
            s = _seq(llm, p, n=16 + 4 * i)  # different lengths: rows finish at different steps
            list(run(BatchDecoder(llm.model, 1), [s]))
            alone.append(s.tokens)
        decoder = BatchDecoder(llm.model, 3)
        batch = [_seq(llm, p, n=16 + 4 * i) for i, p in enumerate(PROMPTS)]
        list(run(decoder, batch))
    assert [s.tokens for s in batch] == alone
    assert not decoder.active and all(s.finish_reason == "length" for s in batch)
    assert decoder.decode_steps < sum(len(t) for t in alone)  # decode steps were shared


def test_llm_int8_outliers_are_per_sequence():
    """A sequence's LLM.int8 result does not depend on another sequence's outlier columns (bitsandbytes pools them
    over the whole batch), on the few-row kernel path and the many-row one."""
    from litquant.quantization.bnb_linear import Linear8bit

    torch.manual_seed(0)
    layer = Linear8bit(64, 48, bias=False, device="cpu")
    layer.quantize_(torch.randn(48, 64))
    for tokens in (1, 5):  # (2, 1, 64): fused kernel; (2, 5, 64): more than 4 rows
        x = torch.randn(2, tokens, 64)
        x[0, 0, 7] = 30.0  # an outlier column in sequence 0 only
        both = layer(x)
        assert torch.equal(both[1], layer(x[1:2])[0])
        assert torch.equal(both[0], layer(x[0:1])[0])
        pooled = layer(x.reshape(1, -1, 64)).reshape(2, tokens, 48)  # one sequence: the column is shared
        assert not torch.equal(pooled[1], both[1])


def test_cancel_and_finish_free_rows_and_others_go_on():
    llm = LLM.load(precision="32-true", progress=False)
    ref = [_seq(llm, p, n=30) for p in PROMPTS[:3]]
    with llm.plugin.forward_context():
        list(run(BatchDecoder(llm.model, 3), ref))
        decoder = BatchDecoder(llm.model, 2)
        seqs = [_seq(llm, p, n=30) for p in PROMPTS[:3]]
        decoder.add(seqs[:2])
        for _ in range(5):
            decoder.step()
        seqs[0].cancelled = True  # row 0 goes; the third sequence takes a row
        decoder.step()
        assert seqs[0].finish_reason == "cancelled" and len(decoder.active) == 1 and decoder.free == 1
        decoder.add([seqs[2]])
        while decoder.active:
            decoder.step()
    assert seqs[1].tokens == ref[1].tokens and seqs[2].tokens == ref[2].tokens
    assert len(seqs[0].tokens) == 6


def test_stop_strings_are_held_back_and_left_out():
    llm = LLM.load(precision="32-true", progress=False)
    free = llm.generate(PROMPTS[0], max_new_tokens=40, temperature=0)
    stop = free[12:16]
    assert stop and stop in free
    cut = llm.generate(PROMPTS[0], max_new_tokens=40, temperature=0, stop=[stop, "never printed"])
    assert cut == free[: free.index(stop)]
    pieces = list(llm.stream(PROMPTS[0], max_new_tokens=40, temperature=0, stop=stop))
    assert "".join(pieces) == cut and len(pieces) > 1
    # the whole text, streamed piece by piece, is the text decoded at once
    seq = _seq(llm, PROMPTS[1], n=40)
    with llm.plugin.forward_context():
        deltas = [s.delta for s in run(BatchDecoder(llm.model, 1), [seq])]
    assert "".join(deltas) == llm.tokenizer.decode(seq.tokens) == seq.text


def test_api_generate_is_batched_and_seeded():
    llm = LLM.load(precision="32-true", progress=False)
    greedy = llm.generate(PROMPTS[:4], max_new_tokens=12, temperature=0, batch_size=2)
    assert greedy == [llm.generate(p, max_new_tokens=12, temperature=0) for p in PROMPTS[:4]]
    # seeded sampling: prompt i draws from seed + i, whatever the batch
    a = llm.generate(PROMPTS[:3], max_new_tokens=12, temperature=1.0, seed=7, batch_size=3)
    b = llm.generate(PROMPTS[:3], max_new_tokens=12, temperature=1.0, seed=7, batch_size=1)
    assert a == b and llm.generate(PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=8) == a[1]
    with pytest.raises(UserError, match="exceeds the model's context"):
        llm.generate("x", max_new_tokens=10_000)
    with pytest.raises(UserError, match="empty"):
        llm.generate("")
    reply = llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=5, temperature=0)
    assert reply == "".join(llm.chat("hi", max_new_tokens=5, temperature=0, stream=True))


def test_single_sequence_generate_keeps_its_timings():
    llm = LLM.load(precision="32-true", progress=False)
    prompt = llm.tokenizer.encode(PROMPTS[0])
    with llm.plugin.forward_context():
        res = generate(llm.model, prompt, 10, temperature=0.0)
    assert res.new_tokens.numel() == 10 and res.decode_steps == 9 and res.prefill_s > 0 and res.decode_s > 0
    seq = _seq(llm, PROMPTS[0], n=10)
    with llm.plugin.forward_context():
        list(run(BatchDecoder(llm.model, 4), [seq]))
    assert res.new_tokens.tolist() == seq.tokens


def test_generate_job_takes_several_prompts(tmp_path):
    args = [
        "--checkpoint_dir",
        str(BUNDLED),
        "--max_new_tokens",
        "10",
        "--temperature",
        "0",
        "--precision",
        "32-true",
    ]
    one = [run_cli("generate", *args, "--prompt", p) for p in PROMPTS[:3]]
    assert all(r.returncode == 0 for r in one), one[0].stderr
    many = run_cli(
        "generate",
        *args,
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--prompt",
        PROMPTS[2],
        "--batch_size",
        "2",
    )
    assert many.returncode == 0, many.stderr
    assert many.stdout == "".join(r.stdout for r in one)
    assert "All 3 sequences, 2 at a time" in many.stderr
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    from_file = run_cli("generate", *args, "--prompts_file", str(jsonl))
    assert from_file.returncode == 0 and from_file.stdout == many.stdout
    bad = run_cli("generate", *args, "--prompts_file", str(tmp_path / "nope.txt"))
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
