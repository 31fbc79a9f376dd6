"""Model presets, save/load, layer maps and hidden-state capture."""
from __future__ import annotations

import pytest
import torch
from transformers import OPTForCausalLM

from pipeline.models import (FINAL, capture_hidden_states, layer_map, load_model, model_fingerprint,
                             preset_config, record_hidden_states)
from pipeline.data.tokenizer import check_same_tokenizer, load_tokenizer, tokenizer_fingerprint


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin-tiny")


@pytest.fixture(scope="module")
def batch(tok):
    texts = ["The capital of Peru is Lima, and Lima is a large city.", "Sort: 3, 1"]
    enc = tok(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch really has padding
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def teacher(tok):
    return load_model("preset:tiny-teacher", tokenizer=tok).eval()


def test_presets_take_vocab_and_specials_from_tokenizer(tok, teacher):
    cfg = teacher.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (tok.pad_token_id, tok.eos_token_id,
                                                                       tok.bos_token_id)
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 128
    student = load_model("preset:tiny-student", tokenizer=tok)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 64


def test_preset_weights_follow_the_seed_and_leave_global_rng_alone(tok, teacher):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    same = load_model("preset:tiny-teacher", tokenizer=tok, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    other = load_model("preset:tiny-teacher", tokenizer=tok, seed=1)
    assert model_fingerprint(same) == model_fingerprint(teacher)
    assert model_fingerprint(other) != model_fingerprint(teacher)


@pytest.mark.parametrize("name,published_millions", [
    ("opt-125m", 125.2), ("opt-350m", 331.2), ("opt-1.3b", 1315.8), ("opt-13b", 12853.5),
])
def test_real_opt_shapes_have_published_sizes(name, published_millions):
    # OPT's released checkpoints have a 50272-row embedding; built on the meta device, so no memory is used.
    with torch.device("meta"):
        model = OPTForCausalLM(preset_config(name, 50272))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - published_millions) < 0.1
    decoder = model.model.decoder
    if name == "opt-350m":
        assert decoder.project_out is not None and decoder.final_layer_norm is None
    else:
        assert decoder.project_out is None and decoder.final_layer_norm is not None


def test_bad_model_specs(tok, tmp_path):
    with pytest.raises(ValueError, match="choose one of tiny-teacher, tiny-student, opt-125m"):
        load_model("preset:gpt-5", tokenizer=tok)
    with pytest.raises(ValueError, match="pass tokenizer="):
        load_model("preset:tiny-student")
    with pytest.raises(ValueError, match="not a model directory"):
        load_model(str(tmp_path))


def test_saved_pair_reloads_with_equal_logits(tiny_pair, tok, teacher, batch):
    ids, mask = batch
    again = load_model(str(tiny_pair.teacher), tokenizer=tok).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits,
                           teacher(input_ids=ids, attention_mask=mask).logits)
    assert model_fingerprint(again) == model_fingerprint(teacher)
    assert model_fingerprint(tiny_pair.teacher) == model_fingerprint(tiny_pair.teacher)
    assert model_fingerprint(tiny_pair.teacher) != model_fingerprint(tiny_pair.student)
    # The pair shares one tokenizer, saved beside each model.
    t_tok, s_tok = load_tokenizer(str(tiny_pair.teacher)), load_tokenizer(str(tiny_pair.student))
    check_same_tokenizer(t_tok, s_tok)
    assert tokenizer_fingerprint(t_tok) == tokenizer_fingerprint(tok)


def test_model_dir_refuses_a_larger_tokenizer(tiny_pair):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        load_model(str(tiny_pair.student), tokenizer=load_tokenizer("builtin-gpt2"))


def test_layer_map_uniform_and_explicit():
    assert layer_map(2, 4) == [(1, 2), (2, 4)]
    assert layer_map(12, 24, n_pairs=3) == [(4, 8), (8, 16), (12, 24)]
    assert layer_map(2, 4, n_pairs=1) == [(2, 4)]
    assert layer_map(2, 4, pairs=[[0, 0], (2, 3)]) == [(0, 0), (2, 3)]
    with pytest.raises(ValueError, match="teacher layer 5 out of range 0..4"):
        layer_map(2, 4, pairs=[(1, 5)])
    with pytest.raises(ValueError, match="n_pairs=3"):
        layer_map(2, 4, n_pairs=3)


def test_capture_matches_hf_hidden_states_and_keeps_only_requested(teacher, batch):
    ids, mask = batch
    with torch.no_grad():
        got = capture_hidden_states(teacher, ids, mask, [0, 2, 4], final=True)
        teacher.config.tie_last_hidden_states = False  # make HF report the raw last-layer output too
        try:
            ref = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        finally:
            del teacher.config.tie_last_hidden_states
    assert list(got) == [0, 2, 4, FINAL]
    for i in (0, 2, 4):
        assert torch.equal(got[i], ref.hidden_states[i])
    # "final" is after the last layer norm, so it differs from layer 4 and reproduces the logits exactly.
    assert not torch.allclose(got[FINAL], got[4])
    assert torch.allclose(got[FINAL] @ teacher.lm_head.weight.T, ref.logits, atol=1e-5)


def test_capture_stops_after_the_deepest_requested_layer(teacher, batch):
    ids, mask = batch
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, layer in enumerate(teacher.model.decoder.layers, start=1)]
    head = teacher.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    try:
        with torch.no_grad():
            got = capture_hidden_states(teacher, ids, mask, [2, 1])
    finally:
        for h in handles + [head]:
            h.remove()
    assert calls == [1, 2] and list(got) == [2, 1]
    with pytest.raises(ValueError, match="choose 0..4"):
        capture_hidden_states(teacher, ids, mask, [5])


def test_final_is_after_project_out_in_opt350m_layout(tok, batch):
    # A miniature of OPT-350M's layout: post-LN layers, no final layer norm, project_in/out around the decoder.
    cfg = preset_config("opt-350m", len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id)
    cfg.update(dict(hidden_size=64, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=2,
                    ffn_dim=128, dropout=0.0))
    torch.manual_seed(0)
    model = OPTForCausalLM(cfg).eval()
    ids, mask = batch
    with torch.no_grad():
        got = capture_hidden_states(model, ids, mask, [2], final=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert got[2].shape[-1] == 64 and got[FINAL].shape[-1] == 32
    assert torch.allclose(got[FINAL] @ model.lm_head.weight.T, logits, atol=1e-5)


def test_record_hidden_states_during_a_training_forward(tok, batch):
    student = load_model("preset:tiny-student", tokenizer=tok, seed=3)
    ids, mask = batch
    with record_hidden_states(student, [1]) as feats:
        out = student(input_ids=ids, attention_mask=mask, labels=ids)
    assert list(feats) == [1] and feats[1].requires_grad
    (out.loss + feats[1].pow(2).mean()).backward()
    assert student.model.decoder.layers[0].fc1.weight.grad is not None
    feats.clear()  # hooks are gone after the block
    student(input_ids=ids, attention_mask=mask)
    assert feats == {}


def test_hub_names_fail_clearly_offline(monkeypatch):
    from pipeline.data.tokenizer import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        load_model("someorg/not-a-cached-model")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        load_tokenizer("someorg/not-a-cached-model")


def test_a_gemma_student_keeps_each_layer_s_attention_kind_and_its_kv_cache_decodes_right(tok, tmp_path):
    """Gemma 3 mixes sliding-window and full attention per layer (config.layer_types): a layer-cut student must
    keep each kept layer's kind, or it computes another function on prompts longer than the window."""
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from pipeline.models.student_init import make_student

    kinds = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=kinds, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    ids = torch.randint(5, len(tok), (1, 12))  # three times the window
    make_student(tmp_path / "teacher", "0,1,2", tmp_path / "prefix")
    make_student(tmp_path / "teacher", "1,2,5", tmp_path / "cut")
    prefix = AutoModelForCausalLM.from_pretrained(tmp_path / "prefix").eval()
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    assert cut.config.layer_types == [kinds[1], kinds[2], kinds[5]]
    assert [layer.self_attn.is_sliding for layer in cut.model.layers] == [True, False, False]
    with torch.no_grad():
        torch.testing.assert_close(capture_hidden_states(prefix, ids, None, [3])[3],
                                   capture_hidden_states(teacher, ids, None, [3])[3], rtol=0, atol=0)
        cached = cut.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = cut.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
