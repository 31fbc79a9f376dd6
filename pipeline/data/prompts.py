"""The Alpaca prompt template, exactly as MiniLLM's published evaluation sets render it (DESIGN section 3).

Training data and evaluation prompts go through this one function, so a student is scored on the prompt
format it was trained on.
"""
from __future__ import annotations

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
