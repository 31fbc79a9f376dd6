"""Instruction-following evaluation of any Hugging Face causal-LM directory (DESIGN section 3)."""
from eval.config import EvalConfig
from eval.runner import evaluate

__all__ = ["EvalConfig", "evaluate"]
