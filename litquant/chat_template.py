"""A checkpoint's own chat template (`chat_template` in tokenizer_config.json, or chat_template.jinja), rendered
with jinja2 the way transformers' `apply_chat_template` renders it: same environment settings, the special
tokens as variables, `add_generation_prompt`. Checkpoints without one fall back to litquant/prompts.py."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

from litquant.errors import UserError, read_json

Messages = list[dict[str, Any]]
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def find_chat_template(checkpoint_dir: Union[str, Path]) -> Optional[str]:
    """The default chat template of a checkpoint directory, None when it has none."""
    d = Path(checkpoint_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        template = read_json(d / "chat_template.json", "chat template").get("chat_template")
    elif (d / "tokenizer_config.json").is_file():
        template = read_json(d / "tokenizer_config.json", "tokenizer").get("chat_template")
    else:
        return None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def special_tokens(checkpoint_dir: Union[str, Path]) -> dict[str, Any]:
    """bos_token, eos_token, ... as strings (tokenizer_config.json writes them as strings or {"content": ...})."""
    path = Path(checkpoint_dir) / "tokenizer_config.json"
    cfg = read_json(path, "tokenizer") if path.is_file() else {}
    out: dict[str, Any] = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    extra = cfg.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t for t in extra]
    return out


class ChatTemplate:
    """`ChatTemplate(template, {"bos_token": "<s>", ...}).render(messages)` -> the prompt string."""

    def __init__(self, template: str, tokens: Optional[dict[str, Any]] = None) -> None:
        from jinja2 import TemplateSyntaxError

        self.source, self.tokens = template, dict(tokens or {})
        try:
            self._template = _environment().from_string(template)
        except TemplateSyntaxError as e:
            raise UserError(f"the checkpoint's chat template does not parse: {e}") from None

    def render(self, messages: Messages, add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt for `messages` ([{"role": ..., "content": ...}, ...]); UserError for a conversation the
        template refuses (e.g. roles that do not alternate)."""
        from jinja2 import TemplateError

        check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **{**self.tokens, **variables},
            )
        except TemplateError as e:
            raise UserError(f"chat template: {e}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Union[str, Path]) -> Optional["ChatTemplate"]:
        template = find_chat_template(checkpoint_dir)
        return None if template is None else cls(template, special_tokens(checkpoint_dir))


def check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise UserError(f"messages[{i}] must be an object with string 'role' and 'content'")


def _environment():
    """The environment transformers renders chat templates in (sandboxed: the template comes from a download)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
