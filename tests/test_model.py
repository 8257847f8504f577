import math

import pytest
import torch
import torch.nn.functional as F

from litquant.config import Config, n_params
from litquant.errors import UserError
from litquant.generation import generate
from litquant.model import GPT, build_mask_cache, build_rope_cache
from litquant.sampling import sample


def _model(name="tiny-llama-test", seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(Config.from_name(name, **overrides))
    model.init_weights(std=0.1)
    return model.eval()


FAMILIES = {
    "llama-gqa": dict(name="tiny-llama-test"),
    "neox-parallel": dict(name="tiny-pythia-test"),
    "mistral-window": dict(name="tiny-llama-test", sliding_window_size=5),
    "falcon-mqa-shared-norm": dict(
        name="tiny-pythia-test",
        n_query_groups=1,
        shared_attention_norm=True,
        bias=False,
        rotary_percentage=1.0,
    ),
    "phi-partial-rope": dict(
        name="tiny-pythia-test",
        rotary_percentage=0.4,
        shared_attention_norm=True,
        lm_head_bias=True,
        gelu_approximate="tanh",
    ),
    "llama31-rope": dict(
        name="tiny-llama-test",
        rope_adjustments=dict(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
        ),
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_full_forward(family):
    """Prefill + one token at a time through the KV cache == recomputing the whole sequence."""
    kw = dict(FAMILIES[family])
    model = _model(kw.pop("name"), **kw)
    x = torch.randint(0, 256, (2, 24))
    full = model(x)
    model.set_kv_cache(batch_size=2, max_seq_length=32)
    parts = [model(x[:, :10], torch.arange(10), 10)]
    for i in range(10, 24):
        parts.append(model(x[:, i : i + 1], torch.tensor([i]), i + 1))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama-gqa", "mistral-window", "neox-parallel"])
def test_greedy_generation_with_cache_equals_recompute(family):
    kw = dict(FAMILIES[family])
    model = _model(kw.pop("name"), **kw)
    prompt = torch.randint(0, 256, (7,))
    model.set_kv_cache(batch_size=1, max_seq_length=40)
    cached = generate(model, prompt, 30, temperature=0.0).tokens

    seq = prompt.clone()
    with torch.inference_mode():
        for _ in range(30):
            nxt = model(seq.view(1, -1))[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1)])
    assert torch.equal(cached, seq)


def test_sliding_window_mask_semantics():
    mask = build_mask_cache(6, 3, torch.device("cpu"))
    for i in range(6):
        for j in range(6):
            assert bool(mask[i, j]) == (j <= i and i - j < 3)
    # a window covering the whole sequence changes nothing
    a = _model("tiny-llama-test")
    b = _model("tiny-llama-test", sliding_window_size=64)
    x = torch.randint(0, 256, (1, 20))
    torch.testing.assert_close(a(x), b(x))
    # a short window does change the output past the window
    c = _model("tiny-llama-test", sliding_window_size=4)
    out_a, out_c = a(x), c(x)
    torch.testing.assert_close(out_a[:, :4], out_c[:, :4])
    assert not torch.allclose(out_a[:, 10:], out_c[:, 10:])


def test_rope_cache_formula():
    cos, sin = build_rope_cache(5, 8, 10000, torch.device("cpu"))
    for pos in range(5):
        for i in range(4):
            theta = pos / 10000 ** (2 * i / 8)
            assert math.isclose(cos[pos, i].item(), math.cos(theta), abs_tol=1e-6)
            assert math.isclose(sin[pos, i + 4].item(), math.sin(theta), abs_tol=1e-6)


def test_llama31_rope_scaling_matches_reference_formula():
    adj = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    cos, sin = build_rope_cache(2, 128, 500000, torch.device("cpu"), adj)
    inv = 1.0 / (500000 ** (torch.arange(0, 128, 2).double() / 128))
    expected = []
    for f in inv.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            expected.append(f)
        elif wavelen > 8192 / 1.0:
            expected.append(f / 8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append((1 - smooth) * f / 8.0 + smooth * f)
    got = torch.atan2(sin[1, :64].double(), cos[1, :64].double())  # the angle at position 1 = the frequency
    want = torch.tensor(expected).double()
    want = torch.atan2(torch.sin(want), torch.cos(want))
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("Llama-2-7b-hf", 6_738_415_616),
        ("Meta-Llama-3-8B", 8_030_261_248),
        ("Mistral-7B-v0.1", 7_241_732_096),
        ("falcon-7b", 7_217_189_760),
        ("pythia-70m", 70_426_624),
        ("phi-2", 2_779_683_840),
        ("TinyLlama-1.1B-Chat-v1.0", 1_100_048_384),
    ],
)
def test_named_configs_have_published_parameter_counts(name, expected):
    """Counts published for each model (HF model cards / `num_parameters()` of the reference implementation)."""
    config = Config.from_name(name)
    assert n_params(config) == expected
    with torch.device("meta"):
        assert sum(p.numel() for p in GPT(config).parameters()) == expected


def test_unknown_config_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown model name 'Llama-9'"):
        Config.from_name("Llama-9")
    assert Config.from_name("meta-llama/Llama-2-7b-hf").name == "Llama-2-7b-hf"


def test_top_k_top_p_sampling():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {2, 3}
    probs = F.softmax(logits, -1)[0]  # [0.032, 0.087, 0.237, 0.644]
    assert probs[3] < 0.7 < probs[3] + probs[2]
    draws = {int(sample(logits, 1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {2, 3}
    assert int(sample(logits, 0.0)) == 3


def test_sampling_draws_from_the_softmax_and_per_row_generators_are_independent():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(4000, 1)
    counts = torch.bincount(
        sample(logits, 1.0, generator=torch.Generator().manual_seed(1)).view(-1), minlength=4
    )
    torch.testing.assert_close(counts / 4000, F.softmax(logits[0], -1), atol=0.025, rtol=0)
    half = torch.bincount(
        sample(logits, 2.0, generator=torch.Generator().manual_seed(2)).view(-1), minlength=4
    )
    torch.testing.assert_close(half / 4000, F.softmax(logits[0] / 2, -1), atol=0.025, rtol=0)
    # row 1's draws are the same whatever row 0 is and whichever generator row 0 uses
    g = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
    a = [int(sample(logits[:2], 1.0, generator=g)[1]) for _ in range(20)]
    g = [None, torch.Generator().manual_seed(6)]
    b = [int(sample(torch.stack([logits[0].flip(0), logits[1]]), 1.0, generator=g)[1]) for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_generation_stops_at_stop_token_and_sequence():
    model = _model()
    prompt = torch.randint(0, 256, (5,))
    model.set_kv_cache(1, 64)
    free = generate(model, prompt, 20, temperature=0.0).new_tokens.tolist()
    stop_at = free[3]
    first = free.index(stop_at)
    out = generate(model, prompt, 20, temperature=0.0, stop_ids=[stop_at])
    assert out.stopped and out.new_tokens.tolist() == free[: first + 1]
    seq = free[4:6]
    out = generate(model, prompt, 20, temperature=0.0, stop_sequences=[seq])
    assert out.stopped and out.new_tokens.tolist()[-2:] == seq


@pytest.mark.parametrize("nh,ng", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_is_sdpa_for_one_query(nh, ng, dtype):
    """The CPU decode step's attention (fp32 matmuls over the cache) equals SDPA's, for MHA, GQA and MQA, with a
    per-sequence mask (batched positions: a different visible length per row)."""
    from litquant.model import decode_attention

    torch.manual_seed(0)
    B, L, hs = 3, 37, 16
    q, k, v = torch.randn(B, nh, 1, hs), torch.randn(B, ng, L, hs), torch.randn(B, ng, L, hs)
    visible = torch.arange(L)[None, :] < torch.tensor([37, 20, 1])[:, None]
    mask = visible[:, None, None, :]  # (B, 1, 1, L)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=0.25, enable_gqa=ng != nh
    )
    y = decode_attention(q, k, v, mask, 0.25)
    assert y.dtype == dtype and y.shape == (B, nh, 1, hs)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    # an unbatched (1, L) mask, as a single sequence's decode step passes it
    one = torch.nn.functional.scaled_dot_product_attention(
        q[:1].float(), k[:1].float(), v[:1].float(), attn_mask=mask[0, 0], scale=0.25, enable_gqa=ng != nh
    )
    torch.testing.assert_close(
        decode_attention(q[:1], k[:1], v[:1], mask[0, 0], 0.25).float(), one, rtol=tol, atol=tol
    )
