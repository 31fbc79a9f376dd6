"""A frozen teacher: where it goes (one GPU, or spread over several), how it loads, and its LM head, the one
code path for exact teacher logits whether they come from a feature store or from the teacher online."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import OPTForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.errors import ConfigError, StoreError
from pipeline.models import load_model, preset_config


def teacher_placement(param_bytes: int, gpu_bytes: int | None, n_gpus: int, world_size: int,
                      have_accelerate: bool) -> str:
    """'cpu', 'gpu' (one replica per rank) or 'device_map' (one process spreading the teacher over all GPUs)."""
    if gpu_bytes is None or n_gpus == 0:
        return "cpu"
    # Activations of a batch and the allocator's slack need room beside the weights.
    if param_bytes <= 0.85 * gpu_bytes:
        return "gpu"
    need = f"the teacher's weights take {param_bytes / 2**30:.1f} GiB, one GPU has {gpu_bytes / 2**30:.1f} GiB"
    if not have_accelerate:
        raise StoreError(f"{need}; install accelerate to spread it over GPUs with device_map='auto'")
    if world_size > 1:
        raise StoreError(f"{need}; run a single process (not torchrun) so device_map='auto' can spread one copy "
                         f"over all {n_gpus} GPUs")
    if param_bytes > 0.85 * gpu_bytes * n_gpus:
        raise StoreError(f"{need}, and all {n_gpus} GPUs together are too small for it")
    return "device_map"



def checkpoint_param_bytes(model_dir: Path, dtype: torch.dtype) -> int | None:
    """Parameter bytes at `dtype` of a saved safetensors checkpoint, read from file headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            n += sum(int(np.prod(h.get_slice(k).get_shape())) for k in h.keys())
    return n * torch.finfo(dtype).bits // 8



def load_frozen_teacher(spec: str, *, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, device: torch.device,
                        world_size: int = 1, seed: int = 0) -> tuple[PreTrainedModel, torch.device]:
    """The teacher in eval mode without gradients, and the device its inputs go to. One replica per rank when it
    fits a GPU; spread over all GPUs of one process (device_map) only when it must be."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    placement = "cpu"
    if gpus:
        if spec.startswith("preset:"):
            name = spec.split(":", 1)[1]
            with torch.device("meta"):
                n = sum(p.numel() for p in OPTForCausalLM(preset_config(name, len(tokenizer))).parameters())
            param_bytes = n * torch.finfo(dtype).bits // 8
        else:
            param_bytes = checkpoint_param_bytes(Path(spec), dtype) or 0
        placement = teacher_placement(param_bytes, torch.cuda.mem_get_info(device)[1], gpus, world_size,
                                      importlib.util.find_spec("accelerate") is not None)
    if placement == "device_map":
        if spec.startswith("preset:"):
            raise StoreError(f"{spec} does not fit one GPU; save it as a model directory to load it sharded")
        model = load_model(spec, tokenizer=tokenizer, dtype=dtype, device_map="auto")
        input_device = model.get_input_embeddings().weight.device
    else:
        model = load_model(spec, tokenizer=tokenizer, dtype=dtype, seed=seed).to(device)
        input_device = device
    model.eval().requires_grad_(False)
    return model, input_device



@dataclass
class LMHead:
    """A causal LM's output layer: `logits = final_hidden @ weight.T (+ bias)`."""

    weight: torch.Tensor  # [V, d]
    bias: torch.Tensor | None = None  # [V]

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "LMHead":
        return LMHead(self.weight.to(device, dtype),
                      None if self.bias is None else self.bias.to(device, dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[..., V]` of final hidden states `[..., d]` (cast to the head's dtype)."""
        out = hidden.to(self.weight.dtype) @ self.weight.T
        return out if self.bias is None else out + self.bias



def lm_head_of(model: PreTrainedModel) -> LMHead:
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"{type(model).__name__} has no LM head")
    return LMHead(head.weight, getattr(head, "bias", None))
