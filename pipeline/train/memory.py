"""Memory estimates behind the training engine's "auto" choices (ZeRO stage, activation checkpointing)."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerBase

from pipeline.errors import ConfigError
from pipeline.models import preset_config


def model_config(spec: str, tokenizer: PreTrainedTokenizerBase | None = None):
    """The transformers config of a model dir or preset, without its weights."""
    if spec.startswith("preset:"):
        if tokenizer is None:
            raise ConfigError(f"{spec}: a preset takes its vocabulary from the tokenizer; pass tokenizer=")
        return preset_config(spec.split(":", 1)[1], len(tokenizer))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(spec, local_files_only=True)



def count_parameters(spec: str, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """Parameters of a model dir or preset, counted on the meta device (no memory, no weights read)."""
    from pipeline.models.encoders import is_causal_config

    config = model_config(spec, tokenizer)
    encoder = not spec.startswith("preset:") and not is_causal_config(config.to_dict())
    with torch.device("meta"):  # an encoder as the classifier it is trained as, not as a causal LM
        model = (AutoModelForSequenceClassification if encoder else AutoModelForCausalLM).from_config(config)
    return sum(p.numel() for p in model.parameters())



def activation_bytes(config, micro_batch_size: int, seq_len: int, bytes_per_value: int) -> int:
    """Activations a decoder keeps for backward over one micro-batch without checkpointing: about
    s*b*h*(34 + 5*a*s/h) 16-bit values a layer (Korthikanti et al., 2022), scaled to the training dtype."""
    h, a, n = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    per_layer = seq_len * micro_batch_size * h * (34 + 5 * a * seq_len / h)
    return int(n * per_layer * bytes_per_value / 2)
