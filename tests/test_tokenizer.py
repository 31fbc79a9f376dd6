"""Built-in tokenizers, their fingerprints, and the teacher/student tokenizer check."""
from __future__ import annotations

import pytest

from pipeline.data import tokenizer as tkz
from pipeline.data.tokenizer import check_same_tokenizer, load_tokenizer, tokenizer_fingerprint

TEXTS = [
    "Below is an instruction.\n\n### Response:\nThe capital of France is Paris.",
    "  two leading spaces, tabs\tand unicode: é, 中文, emoji 🙂  ",
    "<pad> and </s> written in plain text",
]


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("builtin-gpt2")


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("builtin-tiny")


def test_builtin_gpt2_is_gpt2_bpe_with_opt_specials(gpt2):
    # GPT-2's published ids for these words: the vocabulary really is GPT-2's.
    assert gpt2("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert len(gpt2) == 50257 + 2
    assert gpt2.eos_token == gpt2.bos_token == "</s>" and gpt2.pad_token == "<pad>"
    assert len({gpt2.eos_token_id, gpt2.pad_token_id}) == 2
    ids = gpt2("Hello world")["input_ids"]
    assert ids[0] == gpt2.bos_token_id and ids[1:] == [15496, 995]  # OPT prepends </s>


@pytest.mark.parametrize("name", ["gpt2", "tiny"])
def test_decode_round_trip(name, request):
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", ["gpt2", "tiny"])
def test_special_token_spellings_in_text_stay_text(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    ids = tok(TEXTS[2])["input_ids"]
    assert tok.pad_token_id not in ids and ids.count(tok.eos_token_id) == 1  # only the prepended </s>
    assert tkz.encode_text(tok, TEXTS[2]) == ids[1:]
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path))(TEXTS[2])["input_ids"] == ids


@pytest.mark.parametrize("name", ["gpt2", "tiny"])
def test_save_reload_keeps_fingerprint_and_ids(name, request, tmp_path):
    tok = request.getfixturevalue(name)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    check_same_tokenizer(tok, again)


def test_fingerprint_ignores_call_time_truncation(tiny):
    before = tokenizer_fingerprint(tiny)
    tiny(TEXTS[0], truncation=True, max_length=4)
    assert tokenizer_fingerprint(tiny) == before


def test_fingerprint_sees_a_changed_special_token(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    other = load_tokenizer(str(tmp_path))
    other.pad_token = other.eos_token
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tiny)
    with pytest.raises(ValueError, match="pad_token differs"):
        check_same_tokenizer(tiny, other)


def test_check_same_tokenizer_refuses_different_vocabularies(gpt2, tiny):
    with pytest.raises(ValueError, match=r"vocabulary sizes differ \(teacher 50259, student \d+\)"):
        check_same_tokenizer(gpt2, tiny)


def test_tiny_training_is_deterministic_and_small():
    corpus = tkz._tiny_corpus()
    a = tkz.train_tiny_tokenizer(corpus)
    b = tkz.train_tiny_tokenizer(corpus)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    assert 1000 < len(a) <= tkz.TINY_VOCAB_SIZE
    # Small vocabulary but still compact on its own data: well under 2 tokens per word.
    text = corpus[0]
    assert len(a(text)["input_ids"]) < 2 * len(text.split())


def test_tiny_is_cached_and_not_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOKD_CACHE_DIR", str(tmp_path))
    first = load_tokenizer("builtin-tiny")
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1

    def no_training(*a, **k):
        raise AssertionError("builtin-tiny was retrained although it is cached")

    monkeypatch.setattr(tkz, "train_tiny_tokenizer", no_training)
    second = load_tokenizer("builtin-tiny")
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)


def test_bad_spec_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="builtin-gpt2, builtin-tiny"):
        load_tokenizer("no-such-tokenizer-dir")
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))  # a directory with no tokenizer in it


def test_missing_pad_falls_back_to_eos(tmp_path):
    from transformers import PreTrainedTokenizerFast

    backend = tkz.train_tiny_tokenizer(TEXTS * 3, vocab_size=300).backend_tokenizer
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == tok.eos_token == "</s>"
