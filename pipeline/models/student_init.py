"""A student made of a subset of the teacher's layers: the usual small student of the same family (same tokenizer,
embeddings, final norm and head; every other layer dropped), for OPT, Llama, Gemma (whose per-layer attention kinds
are cut with the layers), any model whose decoder keeps its layers in one `layers` list, and BERT-family encoders
(their `encoder.layer` list; a fine-tuned classifier keeps its pooler and classification head, as PKD's students)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.io import atomic_dir, read_json, write_json_atomic
from pipeline.models import decoder_of, load_model, model_fingerprint, model_shape
from pipeline.models.encoders import is_causal_config, encoder_layers, is_encoder

STUDENT_FILE = "student.json"


def parse_layer_list(text: str, n_layers: int) -> list[int]:
    """'0,6,12' (0-based decoder layer indices, strictly increasing) checked against the teacher's depth."""
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: give 0-based decoder layer indices like 0,6,12,18,24,29") from None
    if not layers:
        raise ConfigError("--layers: keep at least one decoder layer")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"--layers {text}: {bad} out of range 0..{n_layers - 1} (the teacher has {n_layers} layers)")
    if layers != sorted(set(layers)):
        raise ConfigError(f"--layers {text}: indices must be strictly increasing (each layer kept once, in order)")
    return layers


def keep_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """`model` itself, its decoder cut down to `layers` (0-based), in order; the config says the new depth. In
    place, so a large teacher is never held twice."""
    if is_encoder(model):
        encoder = model.base_model.encoder
        encoder.layer = kept = nn.ModuleList([encoder.layer[i] for i in layers])
    else:
        decoder = decoder_of(model)
        decoder.layers = kept = nn.ModuleList([decoder.layers[i] for i in layers])
    for new_index, layer in enumerate(kept):
        # Attention modules know their position for the KV cache (Llama's layer_idx); renumber them.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    return model


def make_student(teacher_dir: str | Path, layers_text: str, out: str | Path) -> dict[str, Any]:
    """Write a student model directory (weights, config, tokenizer, student.json) at `out`; return student.json."""
    from transformers import AutoTokenizer

    teacher_dir, out = Path(teacher_dir), Path(out)
    if out.exists():
        raise ConfigError(f"--out {out} exists; make-student never overwrites a folder: choose another --out")
    # The layers are checked against the teacher's config first: a typo costs a second, not a big teacher's load.
    encoder = (teacher_dir / "config.json").is_file() and not is_causal_config(read_json(teacher_dir / "config.json"))
    layers = parse_layer_list(layers_text, model_shape(str(teacher_dir), "teacher", classifier=encoder)[1])
    if encoder:  # as it is: a fine-tuned classifier keeps its head, a base encoder stays one
        import transformers

        arch = (read_json(teacher_dir / "config.json").get("architectures") or ["AutoModel"])[0]
        teacher = getattr(transformers, arch, transformers.AutoModel).from_pretrained(teacher_dir,
                                                                                     local_files_only=True)
        n = len(encoder_layers(teacher))
    else:
        teacher = load_model(str(teacher_dir), dtype=torch.float32)
        n = len(decoder_of(teacher).layers)
    student = keep_layers(teacher, layers)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, local_files_only=True)
    info = {"kind": "geokd-student-from-teacher", "teacher": str(teacher_dir.resolve()),
            "teacher_fingerprint": model_fingerprint(teacher_dir), "teacher_layers": n, "kept_layers": layers,
            "parameters": sum(p.numel() for p in student.parameters()),
            # Hidden state i of the student (1-based, as in --layer_map) is the teacher's hidden state kept[i-1]+1.
            "hidden_state_of_teacher": {str(i + 1): t + 1 for i, t in enumerate(layers)}}
    with atomic_dir(out) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / STUDENT_FILE, info)
    return info
