"""Chat templates from tokenizer_config.json, rendered by litquant/chat_template.py, against transformers'
`apply_chat_template` on the published templates of four chat models (kept here as strings)."""

import json
import shutil

import pytest
from conftest import REPO

from litquant.chat_template import ChatTemplate, find_chat_template
from litquant.errors import UserError

transformers = pytest.importorskip("transformers")

# meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# mistralai/Mistral-7B-Instruct-v0.1, tokenizer_config.json
MISTRAL_INSTRUCT = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# HuggingFaceH4/zephyr-7b-beta, tokenizer_config.json: written over several lines, so trim_blocks/lstrip_blocks
# decide what it renders
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}"
    "\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

TEMPLATES = {
    "llama2-chat": (LLAMA2_CHAT, "<s>", "</s>"),
    "llama3-instruct": (LLAMA3_INSTRUCT, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral-instruct": (MISTRAL_INSTRUCT, "<s>", "</s>"),
    "zephyr": (ZEPHYR, "<s>", "</s>"),
}
SPECIALS = [
    "<s>",
    "</s>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is a tuple?"}],
    [{"role": "system", "content": "You answer in one line."}, {"role": "user", "content": "  Hi there "}],
    [
        {"role": "user", "content": "Reverse: a b"},
        {"role": "assistant", "content": "b a"},
        {"role": "user", "content": "Reverse: x y z\n"},
    ],
    [
        {"role": "user", "content": "Ünïcödé → ok?"},
        {"role": "assistant", "content": " yes "},
        {"role": "user", "content": "and tabs\there"},
    ],
]


def _checkpoint(tmp_path, name):
    """The bundled tokenizer with the chat models' special tokens added, and the template in tokenizer_config.json."""
    from tokenizers import Tokenizer as HFTokenizer

    template, bos, eos = TEMPLATES[name]
    d = tmp_path / name
    shutil.copytree(REPO / "checkpoints" / "litquant-tiny", d)
    tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens(SPECIALS)
    tok.save(str(d / "tokenizer.json"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(bos_token=bos, eos_token=eos, chat_template=template)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), bos_token=bos, eos_token=eos
    )
    return d, hf


def _hf_ids(hf, messages, template):
    out = hf.apply_chat_template(messages, chat_template=template, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendering_and_tokens_match_transformers(tmp_path, name):
    from litquant.api import LLM

    d, hf = _checkpoint(tmp_path, name)
    template = TEMPLATES[name][0]
    assert find_chat_template(d) == template
    ours = ChatTemplate.from_checkpoint(d)
    llm = LLM.load(d, progress=False)  # the API formats chats with the checkpoint's template
    compared = 0
    for messages in CONVERSATIONS:
        for gen in (True, False):
            try:
                want = hf.apply_chat_template(
                    messages, chat_template=template, tokenize=False, add_generation_prompt=gen
                )
            except Exception as e:  # the template refuses this conversation (e.g. Mistral: no system role)
                with pytest.raises(UserError, match=str(e)[:30].replace("(", r"\(").replace(")", r"\)")):
                    ours.render(messages, add_generation_prompt=gen)
                continue
            assert ours.render(messages, add_generation_prompt=gen) == want
            compared += 1
        if compared and messages[-1]["role"] == "user":
            try:
                want_ids = _hf_ids(hf, messages, template)
            except Exception:
                continue
            assert llm.encode_chat(messages) == want_ids  # the special tokens in the text are single ids
    assert compared >= 4


def test_named_templates_and_template_file(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "{{ messages[0]['content'] }}"},
                ]
            }
        )
    )
    assert ChatTemplate.from_checkpoint(d).render([{"role": "user", "content": "hey"}]) == "hey"
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert ChatTemplate.from_checkpoint(d).render([{"role": "user", "content": "hey"}]) == "J1"
    assert ChatTemplate.from_checkpoint(tmp_path) is None  # no tokenizer_config.json


def test_bad_templates_and_messages_are_user_errors():
    with pytest.raises(UserError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    t = ChatTemplate(MISTRAL_INSTRUCT, {"bos_token": "<s>", "eos_token": "</s>"})
    with pytest.raises(UserError, match="roles must alternate"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(UserError, match="non-empty list"):
        t.render([])
    with pytest.raises(UserError, match="string 'role' and 'content'"):
        t.render([{"role": "user", "content": 3}])


def test_checkpoints_without_a_template_fall_back_to_prompt_styles(tmp_path):
    from litquant.api import LLM
    from litquant.prompts import Llama2Chat

    llm = LLM.load(progress=False)  # the bundled model has no template
    assert llm.chat_template is None
    llm.prompt_style = Llama2Chat()
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    assert llm.format_chat(msgs) == Llama2Chat().apply("u2", history=[("u1", "a1")], system="S")
    # and the style writes what the real template renders
    want = ChatTemplate(LLAMA2_CHAT, {"bos_token": "<s>", "eos_token": "</s>"}).render(msgs)
    assert llm.format_chat(msgs) == want
    with pytest.raises(UserError, match="alternate"):
        llm.format_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
