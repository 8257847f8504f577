"""Prompt styles against the chat templates the models publish (rendered by transformers' own chat
templating), the Alpaca strings of Stanford Alpaca's train.py, name lookup, and stop sequences."""

from __future__ import annotations

import pydoc_data.topics

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from litquant.config import name_to_config
from litquant.errors import UserError
from litquant.prompts import (
    Alpaca,
    ChatML,
    Codegen,
    Default,
    Falcon,
    Llama2Chat,
    Llama3Instruct,
    MistralInstruct,
    Phi2,
    PromptStyle,
    SmolLM2,
    TinyLlama,
    model_name_to_prompt_style,
    prompt_styles,
)
from litquant.tokenizer import Tokenizer, train_bpe_tokenizer

# ---- The published templates (tokenizer_config.json "chat_template" of each model), verbatim. ----

# meta-llama/Llama-2-7b-chat-hf
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.1 (no system role)
MISTRAL_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# TinyLlama/TinyLlama-1.1B-Chat-v1.0 (the Zephyr template; note the real newlines between the tags)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with a default system turn), as its GGUF file carries it
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Stanford Alpaca train.py PROMPT_DICT
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def render(template: str, messages: list[dict], bos: str, eos: str) -> str:
    """The reference: transformers' chat templating of a published template."""
    vocab = {bos: 0, eos: 1, "[UNK]": 2}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token="[UNK]")
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def to_messages(prompt: str, history, system):
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for u, a in history:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": prompt}]


# Conversations: whitespace at the ends and inside (templates strip some contents, not others), multi-line text.
CONVERSATIONS = [
    ("What is 2 + 2?", [], None),
    ("  Explain recursion.\n", [], "You are a helpful assistant."),
    (
        "And in Python?",
        [(" What is a list? ", "An ordered, mutable sequence.\n"), ("Tuples?", "  Immutable ones.")],
        "Be brief.\nUse examples.",
    ),
    ("Last question", [("first", "first answer")], None),
]
IDS = ["single", "system", "history+system", "history"]


@pytest.mark.parametrize("prompt,history,system", CONVERSATIONS, ids=IDS)
def test_llama2_chat_matches_published_template(prompt, history, system):
    expected = render(LLAMA2_CHAT_TEMPLATE, to_messages(prompt, history, system), "<s>", "</s>")
    assert Llama2Chat().apply(prompt, history=history, system=system) == expected


@pytest.mark.parametrize("prompt,history,system", CONVERSATIONS, ids=IDS)
def test_llama3_instruct_matches_published_template(prompt, history, system):
    expected = render(
        LLAMA3_INSTRUCT_TEMPLATE, to_messages(prompt, history, system), "<|begin_of_text|>", "<|end_of_text|>"
    )
    assert Llama3Instruct().apply(prompt, history=history, system=system) == expected


@pytest.mark.parametrize("prompt,history,system", CONVERSATIONS, ids=IDS)
def test_mistral_instruct_matches_published_template(prompt, history, system):
    messages = to_messages(prompt, history, None)
    if system is not None:
        # Mistral-Instruct has no system role: the system text leads the first user message after a blank line
        messages[0] = {"role": "user", "content": system + "\n\n" + messages[0]["content"]}
    expected = render(MISTRAL_INSTRUCT_TEMPLATE, messages, "<s>", "</s>")
    assert MistralInstruct().apply(prompt, history=history, system=system) == expected


@pytest.mark.parametrize("prompt,history,system", CONVERSATIONS, ids=IDS)
def test_tinyllama_matches_published_zephyr_template(prompt, history, system):
    expected = render(ZEPHYR_TEMPLATE, to_messages(prompt, history, system), "<s>", "</s>")
    assert TinyLlama().apply(prompt, history=history, system=system) == expected


@pytest.mark.parametrize("prompt,history,system", CONVERSATIONS, ids=IDS)
def test_smollm2_matches_published_template(prompt, history, system):
    expected = render(SMOLLM2_TEMPLATE, to_messages(prompt, history, system), "<|im_start|>", "<|im_end|>")
    assert SmolLM2().apply(prompt, history=history, system=system) == expected
    # plain ChatML writes no system turn of its own
    plain = ChatML().apply(prompt, history=history, system=system)
    assert plain == expected if system is not None else expected.endswith(plain) and "system" not in plain


def test_alpaca_matches_stanford_strings():
    instruction, inp = "Summarize the text.", "Lists are mutable; tuples are not."
    assert Alpaca().apply(instruction) == ALPACA_NO_INPUT.format(instruction=instruction)
    assert Alpaca().apply(instruction, input=inp) == ALPACA_INPUT.format(instruction=instruction, input=inp)
    # an earlier turn: the previous prompt followed by the answer as generated, then the new instruction block
    two = Alpaca().apply("Now shorter.", history=[(instruction, " A short summary.")])
    assert two.startswith(ALPACA_NO_INPUT.format(instruction=instruction) + " A short summary.\n\n")
    assert two.endswith("### Instruction:\nNow shorter.\n\n### Response:")
    assert Alpaca().apply("x", system="You are terse.").startswith("You are terse.\n\n### Instruction:\nx")


def test_plain_styles():
    assert Default().apply("def fib(n):") == "def fib(n):"
    assert Codegen().apply("import os\n") == "import os\n"
    # raw continuation of a base model: the transcript is just the texts in order
    assert Default().apply("c", history=[("a", "b")], system="s") == "sabc"
    assert Falcon().apply("Hi?") == "User: Hi?\nAssistant:"
    assert (
        Falcon().apply("Hi?", history=[("Yo", "Hello.")])
        == "User: Yo\nAssistant: Hello.\nUser: Hi?\nAssistant:"
    )
    assert Phi2().apply("Add 2 and 3.") == "Instruct: Add 2 and 3.\nOutput:"


# ---------------------------------------------------------------------------- lookup


def test_from_name():
    for name, cls in prompt_styles.items():
        style = PromptStyle.from_name(name)
        assert type(style) is cls
    with pytest.raises(UserError) as e:
        PromptStyle.from_name("chatml-ish")
    msg = str(e.value)
    assert "chatml-ish" in msg and all(name in msg for name in prompt_styles) and "\n" not in msg


EXPECTED_STYLE = {
    "Llama-2-7b-chat-hf": Llama2Chat,
    "Llama-2-70b-chat-hf": Llama2Chat,
    "Llama-2-7b-hf": Default,
    "Meta-Llama-3-8B-Instruct": Llama3Instruct,
    "Llama-3.1-8B-Instruct": Llama3Instruct,
    "Meta-Llama-3-8B": Default,
    "Llama-3.1-8B": Default,
    "Mistral-7B-Instruct-v0.1": MistralInstruct,
    "Mistral-7B-Instruct-v0.2": MistralInstruct,
    "Mistral-7B-v0.1": Default,
    "falcon-7b-instruct": Falcon,
    "falcon-40b-instruct": Falcon,
    "falcon-7b": Default,
    "phi-2": Phi2,
    "TinyLlama-1.1B-Chat-v1.0": TinyLlama,
    "TinyLlama-1.1B-intermediate-step-1431k-3T": Default,
    "pythia-70m": Default,
    "litquant-tiny": Codegen,
    "SmolLM2-135M-Instruct": SmolLM2,
    "SmolLM2-135M": Default,
    "tiny-llama-test": Default,
    "some-unknown-model": Default,
}


@pytest.mark.parametrize("name,cls", EXPECTED_STYLE.items())
def test_model_name_to_prompt_style(name, cls):
    assert type(model_name_to_prompt_style(name)) is cls


def test_every_chat_config_gets_a_chat_style():
    # a chat/instruct model added to the config table without a style would silently get raw prompts
    for name in name_to_config:
        if "chat" in name.lower() or "instruct" in name.lower():
            assert type(model_name_to_prompt_style(name)) not in (Default, Codegen), name


# ---------------------------------------------------------------------------- with a real tokenizer


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("l3")
    texts = list(pydoc_data.topics.topics.values())[:4]
    specials = (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
    )
    return train_bpe_tokenizer(texts, 400, out, special_tokens=specials)


def test_llama3_prompt_tokens_and_stop(llama3_like):
    tok = llama3_like
    eot = tok.token_to_id("<|eot_id|>")
    prompt = Llama3Instruct().apply("hello", system="be kind")
    ids = tok.encode(prompt).tolist()
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # BOS is in the text: not added twice
    assert ids.count(eot) == 2 and ids.count(tok.token_to_id("<|start_header_id|>")) == 3
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    # <|end_of_text|> is already the eos id, so only <|eot_id|> is an extra stop
    assert Llama3Instruct().stop_tokens(tok) == [[eot]]
    assert Llama2Chat().stop_tokens(tok) == []


def test_falcon_stop_sequence_matches_generated_text(llama3_like):
    tok = llama3_like
    stops = Falcon().stop_tokens(tok)
    # the model writing the next turn itself: the ids of that text end with one of the stop sequences
    generated = tok.encode("Sure, here it is.\nUser:", bos=False).tolist()
    assert any(s and generated[-len(s) :] == s for s in stops)
    generated = tok.encode("Phi says hi.\nInstruct:", bos=False).tolist()
    assert any(s and generated[-len(s) :] == s for s in Phi2().stop_tokens(tok))
