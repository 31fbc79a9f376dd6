"""Teacher and student models: loading, named OPT presets, fingerprints, layer maps, and cheap hidden-state
capture. A frozen teacher's placement and its LM head: pipeline/models/teacher.py.

Hidden states are named as in docs/contracts.md: 0 = token embeddings (plus positions, after OPT's project_in),
i = output of decoder layer i (1-based), "final" = what the LM head reads (after the final layer norm and, in
OPT-350M, project_out), so `logits = final @ lm_head.weight.T`. Note that transformers 5.x replaces the last entry
of `output_hidden_states` by that final state; here layer n always means the raw output of the last decoder layer.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.errors import ConfigError
from pipeline.io import read_json, sha256_file, sha256_json
from pipeline.models.encoders import check_classifier_dir, encoder_forward, is_encoder
from pipeline.runtime import hub_offline, is_hub_name

FINAL = "final"

# Real OPT shapes (from the published configs); the tiny ones run a forward pass in milliseconds on a CPU.
PRESETS: dict[str, dict] = {
    "tiny-teacher": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=512, dropout=0.0),
    "tiny-student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=256, dropout=0.0),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072),
    # OPT-350M is the odd one: post-layer-norm, no final layer norm, and a 512-wide embedding with project_in/out.
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480),
}


def preset_config(name: str, vocab_size: int, *, pad_token_id: int = 1, bos_token_id: int = 2,
                  eos_token_id: int = 2) -> OPTConfig:
    """The OPTConfig of a named preset with the given vocabulary and special token ids."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    shape = dict(PRESETS[name])
    shape.setdefault("word_embed_proj_dim", shape["hidden_size"])
    shape.setdefault("dropout", 0.1)
    return OPTConfig(
        vocab_size=vocab_size, max_position_embeddings=2048, attention_dropout=0.0, activation_function="relu",
        enable_bias=True, layer_norm_elementwise_affine=True, tie_word_embeddings=True,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **shape,
    )


def load_model(spec: str, *, tokenizer: PreTrainedTokenizerBase | None = None, dtype: torch.dtype = torch.float32,
               seed: int = 0, device_map: str | None = None) -> PreTrainedModel:
    """A causal LM from a local HF model directory, a hub name (org/name, online machines), or `preset:NAME` with
    random weights drawn from `seed`.

    Presets take their vocabulary size and special token ids from `tokenizer` (required for them). A directory
    loads with local files only; with a tokenizer given, its vocabulary must fit the model's embedding.
    `device_map` (a directory or hub model only) spreads it over the GPUs (accelerate), for a teacher too big for one.
    """
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if tokenizer is None:
            raise ConfigError(f"{spec}: a preset takes its vocabulary from the tokenizer; pass tokenizer=")
        config = preset_config(name, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                               else tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        # A private RNG stream: the same seed gives the same weights, and the caller's RNG state is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = OPTForCausalLM(config)
        return model.to(dtype)
    path = Path(spec)
    if not (path / "config.json").is_file() and not is_hub_name(spec):
        raise ConfigError(
            f"model {spec!r}: not a model directory with config.json, not a preset "
            f"(preset:{', preset:'.join(PRESETS)}), and not a hub name (org/name)"
        )
    if (path / "config.json").is_file():
        check_causal_lm_dir(path)
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ConfigError(f"model {path}: no weights (*.safetensors or *.bin) beside its config.json")
    local = (path / "config.json").is_file() or hub_offline()
    try:
        placement = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=local, dtype=dtype, **placement)
    except (OSError, ValueError) as e:
        hint = " (HF_HUB_OFFLINE is set: only the local hub cache is searched)" if hub_offline() else ""
        raise ConfigError(f"cannot load a causal LM from {spec}{hint}: {e}") from e
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"{path}: the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
            f"({len(tokenizer)}); they do not belong together"
        )
    return model


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def quick_model_fingerprint(path: Path) -> str:
    """Hash of config.json and the weight files' names, sizes, heads and tails (eval's identity of a model dir).

    Reading whole multi-GB checkpoints on every rerun would cost minutes; a retrained or replaced checkpoint
    changes its header and first/last bytes. `model_fingerprint` hashes everything, for the stores' manifests.
    """
    import hashlib

    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(8 << 20))
            fh.seek(max(0, size - (8 << 20)))
            h.update(fh.read())
    return h.hexdigest()


def model_shape(spec: str, option: str, classifier: bool = False) -> tuple[int, int]:
    """(hidden size, layers) of a model dir or preset, from its config alone (no weights loaded); `classifier`:
    an encoder for a classification task, else a causal LM."""
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if classifier:
            raise ConfigError(f"--{option} {spec}: presets are OPT decoders; a classification task needs an encoder "
                              f"directory (./run.sh get-model minilm-l6 --out DIR)")
        if name not in PRESETS:
            raise ConfigError(f"--{option} {spec}: unknown preset; choose one of {', '.join(PRESETS)}")
        return int(PRESETS[name]["hidden_size"]), int(PRESETS[name]["num_hidden_layers"])
    cfg_path = Path(spec) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--{option} {spec}: not a model directory with config.json, and not preset:NAME")
    c = check_classifier_dir(spec, option) if classifier else (check_causal_lm_dir(spec), read_json(cfg_path))[1]
    return int(c["hidden_size"]), int(c["num_hidden_layers"])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def check_causal_lm_dir(path: str | Path, need_tokenizer: bool = False) -> None:
    """Refuse a model dir that is not a causal LM (a ViT, a BERT encoder) or, with `need_tokenizer`, that has no
    tokenizer files (transformers would build an empty tokenizer from the config alone)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {path}: not a Hugging Face model directory (no config.json)")
    config = read_json(path / "config.json")
    architectures = config.get("architectures") or []
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = [a for a in architectures if "CausalLM" in a or a.endswith("LMHeadModel")]
    if (architectures and not causal) or config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES \
            or config.get("is_encoder_decoder"):
        listed = ", ".join(architectures) or "no architectures listed"
        raise ConfigError(f"model {path}: a {config.get('model_type')!r} model ({listed}), not a causal LM: "
                          f"instruction data trains and scores causal LMs (an encoder classifier goes with data "
                          f"prepared with --task, and eval --data)")
    if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --tokenizer "
                          f"DIR")


def model_fingerprint(model_or_dir: PreTrainedModel | str | Path) -> str:
    """Hash of a model's config and weights: a directory hashes its files, a live model its tensors."""
    if isinstance(model_or_dir, (str, Path)):
        path = Path(model_or_dir)
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".bin")
                       and p.name != "generation_config.json" and not p.name.startswith("."))
        if not files:
            raise ConfigError(f"{path}: no model files to fingerprint")
        return sha256_json({p.name: sha256_file(p) for p in files})
    import hashlib

    config = model_or_dir.config.to_dict()
    # Bookkeeping that save_pretrained/from_pretrained add; the tensors' own dtypes are hashed below.
    for volatile in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"):
        config.pop(volatile, None)
    h = hashlib.sha256(sha256_json(config).encode())
    for name, tensor in sorted(model_or_dir.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Layers and hidden states
# ---------------------------------------------------------------------------------------------------------------
def num_decoder_layers(model: PreTrainedModel) -> int:
    return len(_decoder_layers(model))


def layer_map(student_layers: int, teacher_layers: int, pairs: Sequence[Sequence[int]] | None = None,
              n_pairs: int = 2) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state index pairs: `pairs` checked, or `n_pairs` spaced uniformly over depth.

    Uniform spacing puts the last pair at both models' last layers and the others at equal fractions of depth
    (student layer round(k*S/n) -> teacher layer round(k*T/n)), so 2 pairs of a 2-layer student and 4-layer
    teacher give [(1, 2), (2, 4)].
    """
    if pairs is not None:
        out = []
        for p in pairs:
            if len(p) != 2:
                raise ConfigError(f"layer pair {list(p)} must be (student_layer, teacher_layer)")
            s, t = int(p[0]), int(p[1])
            if not 0 <= s <= student_layers:
                raise ConfigError(f"student layer {s} out of range 0..{student_layers}")
            if not 0 <= t <= teacher_layers:
                raise ConfigError(f"teacher layer {t} out of range 0..{teacher_layers}")
            out.append((s, t))
        if not out:
            raise ConfigError("an explicit layer map needs at least one pair")
        return out
    if not 1 <= n_pairs <= student_layers:
        raise ConfigError(f"n_pairs={n_pairs}: must be between 1 and the student's {student_layers} layers")
    return [(round(k * student_layers / n_pairs), round(k * teacher_layers / n_pairs)) for k in range(1, n_pairs + 1)]


def mapped_teacher_layers(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """The teacher hidden states a layer map reads, sorted: the layers to cache."""
    return sorted({t for _, t in pairs})


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers (OPT: model.decoder, Llama: model)."""
    for path in ("model.decoder", "decoder", "model"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None and isinstance(getattr(obj, "layers", None), nn.ModuleList):
            return obj
    raise ConfigError(f"{type(model).__name__}: cannot find its decoder layers (expected an OPT-like model)")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_of(model).layers


class _StopForward(Exception):
    """Raised by a hook once every requested layer is captured, to skip the rest of the network."""


@contextlib.contextmanager
def record_hidden_states(model: nn.Module, layers: Sequence[int | str],
                         stop_early: bool = False) -> Iterator[dict[int | str, torch.Tensor]]:
    """Fill a dict with the requested hidden states during the forward passes run inside the block.

    Only the requested layers are kept (hooks on those decoder layers; "final" from the LM head's input). With
    `stop_early`, the forward is cut after the deepest requested layer: call the model inside `run_until_captured`.
    Under activation checkpointing a recomputed layer fires its hook again in backward and replaces the entry
    with an equal tensor, which is harmless once the loss is computed.
    """
    decoder_layers = _decoder_layers(model)
    n = len(decoder_layers)
    wanted = list(dict.fromkeys(layers))
    for layer in wanted:
        if layer != FINAL and not (isinstance(layer, int) and 0 <= layer <= n):
            raise ConfigError(f"hidden state {layer!r} does not exist: choose 0..{n} or {FINAL!r}")
    deepest = max((x for x in wanted if x != FINAL), default=-1)
    out: dict[int | str, torch.Tensor] = {}
    handles = []

    def keep(key, tensor):
        out[key] = tensor
        if stop_early and FINAL not in wanted and key == deepest:
            raise _StopForward

    def layer_hook(index):
        def hook(module, args, kwargs, output):
            keep(index, output[0] if isinstance(output, tuple) else output)
        return hook

    def input_hook(module, args, kwargs):
        keep(0, args[0] if args else kwargs["hidden_states"])

    try:
        if 0 in wanted:
            handles.append(decoder_layers[0].register_forward_pre_hook(input_hook, with_kwargs=True))
        for i in wanted:
            if i != FINAL and i >= 1:
                handles.append(decoder_layers[i - 1].register_forward_hook(layer_hook(i), with_kwargs=True))
        if FINAL in wanted:
            head = model.get_output_embeddings()
            if head is None:
                raise ValueError(f"{type(model).__name__} has no LM head, so it has no 'final' hidden state")
            handles.append(head.register_forward_pre_hook(lambda m, args: out.__setitem__(FINAL, args[0])))
        yield out
    finally:
        for h in handles:
            h.remove()


def capture_hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          layers: Sequence[int], final: bool = False, token_type_ids: torch.Tensor | None = None
                          ) -> dict[int | str, torch.Tensor]:
    """Run `model` and return only the requested hidden states `{layer: [B, T, d]}` (plus "final" if asked).

    Without `final`, the forward stops after the deepest requested layer and the LM head never runs, so capturing
    layers 2 and 4 of a 24-layer teacher costs 4 layers. With `final`, the full decoder runs but the
    vocabulary-sized logits are still skipped: "final" is the decoder's last_hidden_state.
    """
    wanted: list[int | str] = list(layers) + ([FINAL] if final else [])
    if not wanted:
        raise ValueError("capture_hidden_states: no layers requested")
    if is_encoder(model):  # its whole forward: a 6-layer encoder's, and the class logits come with it
        if final:
            raise ConfigError("'final' and top-k logits are a causal LM's; an encoder's store keeps its class logits")
        return dict(encoder_forward(model, input_ids, attention_mask, token_type_ids, list(layers))[0])
    decoder = decoder_of(model)
    ints = [x for x in wanted if x != FINAL]
    with record_hidden_states(model, ints, stop_early=not final) as out:
        try:
            result = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            result = None
    if final:
        out[FINAL] = result.last_hidden_state
    missing = [x for x in wanted if x not in out]
    if missing:  # e.g. LayerDrop skipped a layer in training mode
        raise RuntimeError(f"hidden states {missing} were not produced by the forward pass")
    return {k: out[k] for k in wanted}
