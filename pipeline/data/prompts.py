"""The Alpaca prompt template, exactly as MiniLLM's published evaluation sets render it (DESIGN section 3).

Training data and evaluation prompts go through this one function, so a student is scored on the prompt
format it was trained on. `--template chat` renders the same instruction with the model's own chat template
instead (an instruction-tuned teacher's native format); published tables use the Alpaca template.
"""
from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError

TEMPLATES = ("alpaca", "chat")
_MARK = "\ue000geokd-content\ue000"

_HEAD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
_HEAD_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


def render_prompt(instruction: str, input_text: str | None = None) -> str:
    """Alpaca prompt ending in '### Response:\\n'; the input block appears only when the input is non-empty."""
    # Text is kept byte for byte (the published prompts keep trailing spaces); only emptiness ignores whitespace.
    instruction = instruction or ""
    input_text = input_text or ""
    if input_text.strip():
        return f"{_HEAD_WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"{_HEAD_NO_INPUT}### Instruction:\n{instruction}\n\n### Response:\n"


def user_message(instruction: str, input_text: str | None = None) -> str:
    """The instruction and its input as one user turn (the input after a blank line, when there is one)."""
    instruction, input_text = instruction or "", input_text or ""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def chat_prompt(tokenizer: Any, instruction: str, input_text: str | None = None) -> str:
    """The model's chat template around one user turn, ending where the assistant's answer starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--template chat: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                          f"template; use --template alpaca")
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message(instruction, input_text)}],
                                         add_generation_prompt=True, tokenize=False)


def chat_suffix(tokenizer: Any) -> str:
    """What the chat template puts after the user's text (end of turn + assistant header): a truncated prompt
    keeps it, as an Alpaca prompt keeps its '### Response:' line."""
    return chat_prompt(tokenizer, _MARK).split(_MARK, 1)[1]


def check_template(name: str) -> None:
    if name not in TEMPLATES:
        raise ConfigError(f"--template {name!r}: choose one of {', '.join(TEMPLATES)}")
