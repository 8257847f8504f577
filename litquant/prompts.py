"""Chat prompt styles: how a fine-tuned chat model expects a conversation to be written.

`PromptStyle.from_name("llama2-chat")` or `model_name_to_prompt_style("Llama-2-7b-chat-hf")` gives a style;
`style.apply(prompt, history, system)` is the string to encode, `style.stop_tokens(tokenizer)` what ends an answer.
Templates and BOS/EOS as text: docs/ARCHITECTURE.md, "Data and prompts".
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Optional, Sequence

from litquant.errors import UserError

if TYPE_CHECKING:
    from litquant.tokenizer import Tokenizer

History = Sequence[tuple[str, str]]  # earlier (user message, model answer) pairs, oldest first


class PromptStyle:
    """Base style. `apply` builds the prompt; `stop_tokens` lists extra stop sequences besides the
    tokenizer's `stop_ids` (which generation always honours)."""

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        raise NotImplementedError

    def stop_tokens(self, tokenizer: "Tokenizer") -> list[list[int]]:
        return []

    @staticmethod
    def from_name(name: str) -> "PromptStyle":
        style = prompt_styles.get(name)
        if style is None:
            raise UserError(f"unknown prompt style {name!r}; valid names: {', '.join(sorted(prompt_styles))}")
        return style()


def _special(tokenizer: "Tokenizer", *tokens: str) -> list[list[int]]:
    """Single-token stop sequences for the given token strings that the vocabulary has."""
    ids = (tokenizer.token_to_id(t) for t in tokens)
    return [[i] for i in ids if i is not None and i not in tokenizer.stop_ids]


class Default(PromptStyle):
    """Raw text for base models: the prompt as is (earlier turns and system text are simply concatenated)."""

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        return (system or "") + "".join(u + a for u, a in history) + prompt


class Codegen(Default):
    """The bundled code model: plain continuation of the given source text."""


class Alpaca(PromptStyle):
    """Stanford Alpaca instruction format (its train.py PROMPT_DICT: the prompt ends at "### Response:",
    the answer follows directly); `input` fills the "### Input:" section. A system text replaces the fixed
    preamble; earlier turns are written as instruction blocks followed by the answer as generated."""

    preamble = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
    )
    preamble_input = (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
    )

    def apply(
        self, prompt: str, history: History = (), system: Optional[str] = None, *, input: str = ""
    ) -> str:
        head = (system + "\n\n") if system else (self.preamble_input if input else self.preamble)
        past = "".join(f"### Instruction:\n{u}\n\n### Response:{a}\n\n" for u, a in history)
        section = f"### Input:\n{input}\n\n" if input else ""
        return f"{head}{past}### Instruction:\n{prompt}\n\n{section}### Response:"


class Llama2Chat(PromptStyle):
    """meta-llama/Llama-2-*-chat: each user turn "<s>[INST] ... [/INST]", answers " ... </s>",
    the system text inside the first turn between <<SYS>> markers. Contents are stripped, as the template does."""

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        users = [u for u, _ in history] + [prompt]
        answers = [a for _, a in history]
        if system is not None:  # the template tests `system_message != false`: an empty string still counts
            users[0] = f"<<SYS>>\n{system}\n<</SYS>>\n\n{users[0]}"
        out = ""
        for i, u in enumerate(users):
            out += f"<s>[INST] {u.strip()} [/INST]"
            if i < len(answers):
                out += f" {answers[i].strip()} </s>"
        return out


class Llama3Instruct(PromptStyle):
    """meta-llama/Meta-Llama-3-*-Instruct: header-delimited turns ending in <|eot_id|>, then an open
    assistant header."""

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        def turn(role: str, text: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n{text.strip()}<|eot_id|>"

        out = "<|begin_of_text|>"
        if system is not None:
            out += turn("system", system)
        for u, a in history:
            out += turn("user", u) + turn("assistant", a)
        return out + turn("user", prompt) + "<|start_header_id|>assistant<|end_header_id|>\n\n"

    def stop_tokens(self, tokenizer: "Tokenizer") -> list[list[int]]:
        # the instruct model ends a turn with <|eot_id|>; older checkpoints list only <|end_of_text|> as eos
        return _special(tokenizer, "<|eot_id|>", "<|end_of_text|>")


class MistralInstruct(PromptStyle):
    """mistralai/Mistral-7B-Instruct-v0.1/v0.2: "<s>[INST] ... [/INST]answer</s> [INST] ... [/INST]".
    The model has no system role; a system text goes in front of the first user message, separated by a
    blank line (what Mistral's later templates do)."""

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        users = [u for u, _ in history] + [prompt]
        if system is not None:
            users[0] = f"{system}\n\n{users[0]}"
        out = "<s>"
        for i, (u, a) in enumerate(history):
            out += f"[INST] {users[i]} [/INST]{a}</s> "
        return out + f"[INST] {users[-1]} [/INST]"


class Falcon(PromptStyle):
    """tiiuae/falcon-*-instruct: plain "User: ...\\nAssistant:" turns."""

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        head = f"{system}\n" if system else ""
        past = "".join(f"User: {u}\nAssistant: {a}\n" for u, a in history)
        return f"{head}{past}User: {prompt}\nAssistant:"

    def stop_tokens(self, tokenizer: "Tokenizer") -> list[list[int]]:
        # the model goes on to write the next "User:" turn itself
        return [
            tokenizer.encode("\nUser:", bos=False).tolist(),
            tokenizer.encode("User:", bos=False).tolist(),
        ]


class Phi2(PromptStyle):
    """microsoft/phi-2 QA format: "Instruct: ...\\nOutput:"."""

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        head = f"{system}\n" if system else ""
        past = "".join(f"Instruct: {u}\nOutput: {a}\n" for u, a in history)
        return f"{head}{past}Instruct: {prompt}\nOutput:"

    def stop_tokens(self, tokenizer: "Tokenizer") -> list[list[int]]:
        return [
            tokenizer.encode("\nInstruct:", bos=False).tolist(),
            tokenizer.encode("Instruct:", bos=False).tolist(),
        ]


class TinyLlama(PromptStyle):
    """TinyLlama/TinyLlama-1.1B-Chat (Zephyr format): "<|role|>\\ntext</s>\\n" turns, then "<|assistant|>\\n"."""

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        out = f"<|system|>\n{system}</s>\n" if system is not None else ""
        for u, a in history:
            out += f"<|user|>\n{u}</s>\n<|assistant|>\n{a}</s>\n"
        return out + f"<|user|>\n{prompt}</s>\n<|assistant|>\n"


class ChatML(PromptStyle):
    """ChatML (SmolLM2, Qwen2 and others): "<|im_start|>role\ntext<|im_end|>\n" turns, then an open assistant
    turn. `default_system` is the system turn a model's template writes when the conversation has none."""

    default_system: Optional[str] = None

    def apply(self, prompt: str, history: History = (), system: Optional[str] = None) -> str:
        system = self.default_system if system is None else system
        turns = [("system", system)] if system is not None else []
        turns += [t for u, a in history for t in (("user", u), ("assistant", a))] + [("user", prompt)]
        return "".join(f"<|im_start|>{r}\n{t}<|im_end|>\n" for r, t in turns) + "<|im_start|>assistant\n"

    def stop_tokens(self, tokenizer: "Tokenizer") -> list[list[int]]:
        return _special(tokenizer, "<|im_end|>")


class SmolLM2(ChatML):
    """HuggingFaceTB/SmolLM2-*-Instruct: ChatML with its template's default system turn."""

    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


prompt_styles: dict[str, type[PromptStyle]] = {
    "default": Default,
    "alpaca": Alpaca,
    "llama2-chat": Llama2Chat,
    "llama3-instruct": Llama3Instruct,
    "mistral-instruct": MistralInstruct,
    "falcon": Falcon,
    "phi-2": Phi2,
    "tinyllama": TinyLlama,
    "zephyr": TinyLlama,
    "codegen": Codegen,
    "chatml": ChatML,
    "smollm2": SmolLM2,
}

# First match wins; searched (case-insensitive) in the config name, e.g. "Llama-2-7b-chat-hf".
_name_patterns: list[tuple[str, type[PromptStyle]]] = [
    (r"Llama-2.*-chat", Llama2Chat),
    (r"Llama-3.*Instruct", Llama3Instruct),
    (r"Mistral.*Instruct", MistralInstruct),
    (r"falcon.*instruct", Falcon),
    (r"phi-2", Phi2),
    (r"TinyLlama.*Chat", TinyLlama),
    (r"^litquant-tiny", Codegen),
    (r"SmolLM2.*Instruct", SmolLM2),
]


def model_name_to_prompt_style(model_name: str) -> PromptStyle:
    """The style a model's config name implies; Default (raw text) for base models."""
    for pattern, style in _name_patterns:
        if re.search(pattern, model_name, flags=re.IGNORECASE):
            return style()
    return Default()
