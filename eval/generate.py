"""Batched generation for evaluation: left-padded prompts, the KV cache, MiniLLM's sampling protocol.

Sampling noise is keyed by (seed, sample index, step), never by the batch: each row draws its next token by
inverting its own CDF at a uniform number hashed from those three integers. A sample's generation therefore does
not depend on the batch size, on which other prompts share its batch, or on how many ranks split the set (up to
the floating-point effect that padding can have on logits). Batches are planned over the whole set before it is
split across ranks, so a 2-rank run computes exactly the batches a 1-rank run does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from pipeline.errors import ConfigError, DataError

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    max_prompt_length: int = 256
    prompt_truncation: str = "right"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    no_repeat_ngram_size: int = 6
    min_new_tokens: int = 0  # not part of the protocol; lets a benchmark make every row do equal work


@dataclass(frozen=True)
class EncodedPrompt:
    index: int
    ids: tuple[int, ...]
    truncated: int  # prompt tokens dropped to fit max_prompt_length


def _mix64(x: int) -> int:
    # splitmix64's finalizer: a cheap bijective scramble, so nearby integers give unrelated outputs.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def keyed_uniform(seed: int, index: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, sample index, step)."""
    h = _mix64(_mix64(_mix64(seed & _MASK64) ^ (index & _MASK64)) ^ (step & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


class KeyedSampler(LogitsProcessor):
    """Samples each row's next token with its own keyed noise; returns the scores with that token set to +inf.

    Used with greedy `generate`, so transformers' own sampler (one shared RNG for the whole batch) never runs.
    """

    def __init__(self, seed: int, indices: Sequence[int], prompt_width: int):
        self.seed = seed
        self.indices = list(indices)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_width
        u = torch.tensor([keyed_uniform(self.seed, i, step) for i in self.indices], dtype=torch.float64,
                         device=scores.device)
        # float64 CDF: 50k fp32 probabilities summed in fp32 drift by ~1e-5, enough to move a draw.
        cdf = torch.softmax(scores, dim=-1, dtype=torch.float64).cumsum_(-1)
        target = u.unsqueeze(1) * cdf[:, -1:]
        # right=True skips zero-probability tokens (banned n-grams), which share their predecessor's CDF value.
        tokens = torch.searchsorted(cdf, target, right=True).clamp_(max=scores.shape[-1] - 1)
        # Marking the drawn token in place (no new vocabulary-sized tensor: on this CPU each fresh one costs
        # page faults) makes it the argmax that greedy decoding picks.
        return scores.scatter_(1, tokens, float("inf"))


class SuppressBeyondVocab(LogitsProcessor):
    """Forbids ids the tokenizer cannot decode (models pad their embedding table, e.g. OPT to 50272 rows)."""

    def __init__(self, n_tokens: int):
        self.n_tokens = n_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[-1] > self.n_tokens:
            scores = scores.clone()
            scores[:, self.n_tokens:] = float("-inf")
        return scores


def encode_prompts(tokenizer: Any, prompts: Sequence[tuple[int, str]], max_prompt_length: int,
                   truncation: str = "right", add_special_tokens: bool = True) -> list[EncodedPrompt]:
    """Tokenize (index, prompt) pairs with the model's own special tokens, fitting each into max_prompt_length.

    right (the default): keep the first max_prompt_length tokens, as MiniLLM's evaluation does (its
    `data[:max_prompt_length]`), so scores compare with published tables;
    left: keep the leading special tokens (e.g. OPT's BOS) and the end of the prompt, so "### Response:" survives.
    """
    special = set(tokenizer.all_special_ids)
    encoded = []
    for index, text in prompts:
        ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        dropped = max(0, len(ids) - max_prompt_length)
        if dropped:
            if truncation == "right":
                ids = ids[:max_prompt_length]
            else:
                head = 0
                while head < len(ids) and ids[head] in special and head < max_prompt_length // 2:
                    head += 1
                ids = ids[:head] + ids[len(ids) - (max_prompt_length - head):]
        if not ids:
            raise DataError(f"sample {index}: prompt tokenizes to nothing")
        encoded.append(EncodedPrompt(index=index, ids=tuple(ids), truncated=dropped))
    return encoded


def plan_batches(encoded: Sequence[EncodedPrompt], batch_size: int) -> list[list[EncodedPrompt]]:
    """Longest prompts first (less padding, and memory trouble shows on the first batch); ties by index."""
    order = sorted(encoded, key=lambda e: (-len(e.ids), e.index))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _eos_ids(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos_token: generation could not stop")
    return [tokenizer.eos_token_id]


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, batch: Sequence[EncodedPrompt], settings: GenerationSettings,
                   seed: int | None) -> list[dict[str, Any]]:
    """Generate for one batch; seed None means greedy. Returns one record per prompt, in batch order."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(tokenizer)
    device = next(model.parameters()).device
    width = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):  # left padding: every prompt ends where generation starts
        input_ids[row, width - len(e.ids):] = torch.tensor(e.ids)
        attention_mask[row, width - len(e.ids):] = 1

    processors = LogitsProcessorList([SuppressBeyondVocab(len(tokenizer))])
    if seed is not None:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
        processors.append(KeyedSampler(seed, [e.index for e in batch], width))

    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,  # KeyedSampler does the sampling; see the module docstring
        num_beams=1,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        repetition_penalty=1.0,
        min_new_tokens=settings.min_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    # transformers fills unset fields from model.generation_config (a hub model's sampling defaults, min_length,
    # suppressed tokens...); the protocol fixes every setting, so nothing may leak in from there.
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
        logits_processor=processors,
    )
    new_tokens = out[:, width:].tolist()
    records = []
    for e, tokens in zip(batch, new_tokens):
        stop = next((i for i, t in enumerate(tokens) if t in eos_ids), len(tokens))
        text = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
        records.append({
            "index": e.index,
            "generation": text,
            "new_tokens": stop,
            "prompt_tokens": len(e.ids),
            "prompt_truncated": e.truncated,
        })
    return records


def generate_all(model: Any, tokenizer: Any, batches: Sequence[Sequence[EncodedPrompt]], settings: GenerationSettings,
                 seed: int | None, rank: int = 0, world_size: int = 1, progress: str = "") -> list[dict[str, Any]]:
    """Generate this rank's share of `batches` (batch i goes to rank i mod world_size); `progress` labels a bar."""
    mine = [b for i, b in enumerate(batches) if i % world_size == rank]
    if progress:
        from tqdm import tqdm

        mine = tqdm(mine, desc=progress, leave=False)
    records: list[dict[str, Any]] = []
    for batch in mine:
        records.extend(generate_batch(model, tokenizer, batch, settings, seed))
    return records
