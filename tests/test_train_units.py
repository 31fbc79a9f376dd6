"""Fast, in-process checks of the training stage's parts: DeepSpeed config filling, data order, schedule,
objective (KD from exact and top-k logits, feature losses under activation checkpointing), option checks."""
from __future__ import annotations


import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.train.ds_config import EngineSettings, load_ds_config, precision_of, resolve_ds_config, zero_stage
from pipeline.geometry import logit_kd
from pipeline.train.objective import Objective, StudentWithHeads, topk_kd
from pipeline.train.config import TrainConfig, parse_layer_map
from pipeline.train.data import StepBatchSampler, eval_batches
from pipeline.train.targets import TeacherTargets
from pipeline.models.teacher import LMHead
from helpers import ROOT

SETTINGS = EngineSettings(micro_batch_size=2, grad_accum=3, world_size=4, grad_clip=1.0, lr=3e-4, betas=(0.9, 0.95),
                          eps=1e-8, weight_decay=0.01, precision="auto", hidden_size=64)


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_resolves_without_auto_left(path):
    raw = load_ds_config(path)
    cfg = resolve_ds_config(raw, SETTINGS, origin=str(path))

    def auto_paths(node: object, prefix: tuple = ()) -> list[tuple]:
        if isinstance(node, dict):
            return [p for k, v in node.items() for p in auto_paths(v, prefix + (k,))]
        return [prefix] if node == "auto" else []

    for keys in auto_paths(raw):  # every "auto" became a value where its block was kept (resolve refuses a
        block = cfg                # leftover "auto"; a precision block that was not chosen is dropped whole)
        for k in keys[:-1]:
            block = block.get(k) if isinstance(block, dict) else None
        if block is not None:
            assert block.get(keys[-1]) is not None, (path.name, keys)
    assert cfg["train_batch_size"] == 2 * 3 * 4
    assert cfg["gradient_accumulation_steps"] == 3 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["optimizer"]["params"]["lr"] == 3e-4 and cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert cfg["gradient_clipping"] == 1.0
    # Offloaded optimizer states need DeepSpeed's CPU Adam; everything else uses torch's AdamW (no JIT build).
    offload = "offload_optimizer" in cfg["zero_optimization"]
    assert cfg["optimizer"]["params"]["torch_adam"] is (not offload)
    expected_stage = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "cpu": 2, "auto": 2}  # SETTINGS: 4 ranks
    stem = path.stem.split("_")[0]
    assert zero_stage(cfg) == expected_stage[stem]
    if path.stem.endswith(("_bf16", "_fp16", "_fp32")):
        assert precision_of(cfg) == path.stem.rsplit("_", 1)[1]
    elif path.stem != "cpu" and not torch.cuda.is_available():
        assert precision_of(cfg) == "fp32"  # "auto" on a CPU


def test_auto_zero_stage_follows_the_run_and_says_why():
    raw = load_ds_config(ROOT / "ds_configs/auto.json")
    one = EngineSettings(**{**SETTINGS.__dict__, "world_size": 1, "n_params": 10**8})
    notes: list[str] = []
    cfg = resolve_ds_config(raw, one, notes=notes)
    assert zero_stage(cfg) == 0 and notes == ["ZeRO stage auto -> 0: one rank: ZeRO partitions across ranks, so it "
                                              "would only add bookkeeping"]
    many = EngineSettings(**{**SETTINGS.__dict__, "world_size": 8, "n_params": 10**9, "device_bytes": 80 * 2**30})
    assert zero_stage(resolve_ds_config(raw, many)) == 2  # 4 + 12/8 bytes a parameter: 5.1 GB of 80
    huge = EngineSettings(**{**many.__dict__, "n_params": 13 * 10**9})
    notes = []
    assert zero_stage(resolve_ds_config(raw, huge, notes=notes)) == 3  # 71 GB would not fit 60% of 80
    assert "parameters partitioned too" in notes[0]
    # torch's AdamW runs fused (one kernel for every tensor) wherever torch has it; explicit false is kept.
    assert cfg["optimizer"]["params"]["fused"] is True
    raw["optimizer"]["params"]["fused"] = False
    assert resolve_ds_config(raw, one)["optimizer"]["params"]["fused"] is False


def test_ds_config_explicit_value_that_contradicts_training_config_names_the_key(tmp_path):
    raw = load_ds_config(ROOT / "ds_configs/zero2.json")
    raw["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(ConfigError, match="my.json: train_micro_batch_size_per_gpu = 8 contradicts"):
        resolve_ds_config(raw, SETTINGS, origin="my.json")
    raw = load_ds_config(ROOT / "ds_configs/zero2_bf16.json")
    with pytest.raises(ConfigError, match="pins precision bf16.*asks for fp16"):
        resolve_ds_config(raw, EngineSettings(**{**SETTINGS.__dict__, "precision": "fp16"}), origin="x.json")
    raw = load_ds_config(ROOT / "ds_configs/zero2.json")
    raw["scheduler"] = {"type": "WarmupLR", "params": {}}
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config(raw, SETTINGS)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2},\n "optimizer": }')
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON \(line 2"):
        load_ds_config(bad)


def test_precision_option_fills_auto():
    raw = load_ds_config(ROOT / "ds_configs/zero3.json")
    cfg = resolve_ds_config(raw, EngineSettings(**{**SETTINGS.__dict__, "precision": "bf16"}))
    assert precision_of(cfg) == "bf16" and "fp16" not in cfg
    cfg = resolve_ds_config(raw, EngineSettings(**{**SETTINGS.__dict__, "precision": "fp16"}))
    assert precision_of(cfg) == "fp16" and cfg["fp16"]["loss_scale"] == 0


def _micro_batches(n, micro, accum, world, seed, epoch=0, start=0):
    """Per step: the micro-batches of every rank, in the order the ranks x accumulation slots are averaged."""
    per_rank = [list(StepBatchSampler(n, micro_batch_size=micro, grad_accum=accum, world_size=world, rank=r,
                                      seed=seed, epoch=epoch, start_step=start)) for r in range(world)]
    steps = len(per_rank[0]) // accum
    return [sorted(tuple(per_rank[r][s * accum + a]) for r in range(world) for a in range(accum))
            for s in range(steps)]


def test_data_order_is_the_same_for_any_rank_count_at_the_same_global_batch():
    one = _micro_batches(50, micro=2, accum=4, world=1, seed=3)
    two = _micro_batches(50, micro=2, accum=2, world=2, seed=3)
    four = _micro_batches(50, micro=2, accum=1, world=4, seed=3)
    assert one == two == four
    assert len(one) == 50 // 8  # the incomplete last global batch is dropped
    flat = [p for step in one for mb in step for p in mb]
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch
    # Another epoch is another permutation; the same (seed, epoch) is the same one.
    assert _micro_batches(50, 2, 4, 1, seed=3, epoch=1) != one
    assert _micro_batches(50, 2, 4, 1, seed=3, epoch=1) == _micro_batches(50, 2, 2, 2, seed=3, epoch=1)


def test_data_position_restarts_the_same_sequence():
    full = list(StepBatchSampler(40, micro_batch_size=2, grad_accum=2, world_size=2, rank=1, seed=0, epoch=2))
    tail = list(StepBatchSampler(40, micro_batch_size=2, grad_accum=2, world_size=2, rank=1, seed=0, epoch=2,
                                 start_step=3))
    assert tail == full[3 * 2:]
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        StepBatchSampler(7, micro_batch_size=2, grad_accum=2, world_size=2, rank=0, seed=0)


def test_eval_batches_cover_every_sample_once_with_equal_batch_counts():
    per_rank = [eval_batches(11, micro_batch_size=2, world_size=3, rank=r) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # ZeRO-3 forwards are collective
    counted = sorted(p for batches in per_rank for positions, counts in batches if counts for p in positions)
    assert counted == list(range(11))
    assert sorted(p for b in eval_batches(11, 4, 1, 0, limit=5) for p in b[0]) == list(range(5))


def test_warmup_cosine_schedule():
    from pipeline.train.setup import warmup_cosine

    f = [warmup_cosine(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # the first step already learns
    assert f[4] == pytest.approx(1.0) and f[-1] > 0.1 and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert warmup_cosine(20, warmup=4, total=20, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(12, warmup=4, total=20, min_ratio=0.0) == pytest.approx(0.5)
    assert warmup_cosine(0, warmup=0, total=10, min_ratio=0.0) == 1.0


def test_topk_kd_with_the_whole_vocabulary_is_exact_kd():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g) * 2
    log_pt = torch.log_softmax(t, -1)
    vals, ids = log_pt.topk(11, dim=-1)
    for temp in (1.0, 2.0):
        assert topk_kd(s, vals, ids, temp).item() == pytest.approx(logit_kd(s, t, None, temp).item(), rel=1e-5)
    # With fewer tokens it is KL to the renormalized top-k distribution: zero when the student matches it there.
    vals, ids = log_pt.topk(3, dim=-1)
    s_match = torch.full((6, 11), -1e4).scatter(-1, ids, vals)
    assert topk_kd(s_match, vals, ids).item() == pytest.approx(0.0, abs=1e-5)


def _tiny_student(seed=0):
    from pipeline.models import preset_config
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    cfg = preset_config("tiny-student", vocab_size=97)
    cfg.dropout = 0.0
    return OPTForCausalLM(cfg)


@pytest.mark.parametrize("loss", ["procrustes", "proj_mse"])
def test_feature_loss_gradients_are_the_same_with_activation_checkpointing(loss):
    """The student's layer outputs are taken from the forward (hooks removed before backward), so recomputing
    checkpointed layers neither duplicates them nor cuts the feature loss's gradient."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    teacher = TeacherTargets(layers={2: torch.randn(2, 9, 24, generator=g), 4: torch.randn(2, 9, 24, generator=g)},
                             final=torch.randn(2, 9, 24, generator=g), head=LMHead(torch.randn(97, 24, generator=g)))
    obj = Objective("distill", 0.5, 1.0, loss, ((1, 2), (2, 4)), (0.5, 0.5), "final")
    grads, values = [], []
    for checkpointing in (False, True):
        torch.manual_seed(5)
        model = StudentWithHeads(_tiny_student(), obj, {2: 24, 4: 24}).train()
        if checkpointing:
            model.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        terms = model(ids, mask, labels, teacher)
        terms["loss"].backward()
        values.append({k: float(v.detach()) for k, v in terms.items()})
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert set(values[0]) == {"loss", "ce", "kd", f"{loss}/s1_t2", f"{loss}/s2_t4", "rows_left_out/s1_t2",
                              "rows_left_out/s2_t4"}
    assert grads[0].keys() == grads[1].keys()
    layer0 = "student.model.decoder.layers.0.fc1.weight"
    assert grads[0][layer0].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)
    # The feature term alone reaches the first layer (its gradient is not cut by checkpointing).
    model = StudentWithHeads(_tiny_student(), Objective("distill", 0.0, 1.0, loss, ((1, 2),), (1.0,), "none"),
                             {2: 24}).train()
    model.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    terms = model(ids, mask, labels, teacher)
    (terms[f"{loss}/s1_t2"]).backward()
    assert model.student.model.decoder.layers[0].fc1.weight.grad.abs().sum() > 0


def test_total_loss_is_the_documented_mix():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :2] = -100
    teacher = TeacherTargets(layers={2: torch.randn(2, 7, 24, generator=g), 4: torch.randn(2, 7, 24, generator=g)},
                             final=torch.randn(2, 7, 24, generator=g), head=LMHead(torch.randn(97, 24, generator=g)))
    a, b = 0.3, 2.0
    model = StudentWithHeads(_tiny_student(), Objective("distill", a, b, "fg", ((1, 2), (2, 4)), (0.25, 0.75),
                                                        "final"))
    t = {k: float(v.detach()) for k, v in model(ids, mask, labels, teacher).items()}
    features = 0.25 * t["fg/s1_t2"] + 0.75 * t["fg/s2_t4"]
    assert t["loss"] == pytest.approx((1 - a) * t["ce"] + a * t["kd"] + b * features, rel=1e-6)
    sft = StudentWithHeads(model.student, Objective("sft", 0, 0, "none", (), (), "none"))
    out = sft(ids, mask, labels)
    assert set(out) == {"loss", "ce"} and float(out["loss"].detach()) == pytest.approx(t["ce"], rel=1e-6)


def test_options_are_checked_with_the_option_named(tmp_path):
    base = dict(data="d", student="preset:tiny-student", out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="--data is required"):
        TrainConfig(student="s", out="o").check()
    with pytest.raises(ConfigError, match="--loss 'mse'"):
        TrainConfig(**base, mode="distill", features="f", loss="mse").check()
    with pytest.raises(ConfigError, match="needs --features .* or --teacher"):
        TrainConfig(**base, mode="distill").check()
    with pytest.raises(ConfigError, match="--layer_weights has 3 values for 2 layer pairs"):
        TrainConfig(**base, mode="distill", features="f", layer_map=["1:2", "2:4"],
                                 layer_weights=[1.0, 1.0, 1.0]).check()
    with pytest.raises(ConfigError, match="--layer_map 'x:2'"):
        parse_layer_map(["x:2"])
    assert parse_layer_map(["1:2", "2,4"]) == [(1, 2), (2, 4)]
    TrainConfig(**base, mode="distill", teacher="t").check()


def test_a_previous_run_is_never_overwritten(tmp_path):
    from pipeline.train.setup import check_output_folder

    out = tmp_path / "run"
    check_output_folder(out, resume=False)  # a new folder is fine
    (out / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="pass --resume"):
        check_output_folder(out, resume=False)
    check_output_folder(out, resume=True)
    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="finished"):
        check_output_folder(out, resume=True)


def test_activation_checkpointing_auto_turns_on_only_when_activations_do_not_fit():
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.train.memory import count_parameters
    from pipeline.train.setup import activation_checkpointing_choice

    tok = load_tokenizer("builtin-tiny")
    cfg = TrainConfig(data="d", student="preset:opt-125m", out="o", micro_batch_size=8)
    cfg.check()
    n = count_parameters(cfg.student, tok)
    assert 80e6 < n < 130e6  # OPT-125M's shape with a small vocabulary
    choose = lambda device_bytes, c=cfg: activation_checkpointing_choice(  # noqa: E731
        c, tok, n, 0, 1, 512, device_bytes, torch.bfloat16)
    assert choose(None)[0] is False and "no accelerator" in choose(None)[1]
    on_h100, why = choose(80 * 2**30)
    assert on_h100 is False and "fit" in why
    on_small, why = choose(4 * 2**30)  # 8 x 512 tokens of 12 layers: ~4 GiB of activations
    assert on_small is True and "exceed" in why
    forced = TrainConfig(data="d", student="preset:opt-125m", out="o", activation_checkpointing="on")
    forced.check()
    assert forced.activation_checkpointing == "true" and choose(None, forced)[0] is True
    with pytest.raises(ConfigError, match="--activation_checkpointing 'maybe'"):
        TrainConfig(data="d", student="s", out="o", activation_checkpointing="maybe").check()


@pytest.mark.parametrize("source", ["final", "topk"])
def test_kd_sharing_the_students_log_softmax_equals_the_separate_computation(source):
    from pipeline.train.objective import kd_loss

    g = torch.Generator().manual_seed(4)
    n, v, d = 9, 97, 24
    logits = torch.randn(n, v, generator=g, requires_grad=True)
    predict = torch.ones(1, n, dtype=torch.bool)
    final = torch.randn(1, n + 1, d, generator=g)
    values, idx = torch.randn(n, v, generator=g).log_softmax(-1).topk(7, dim=-1)
    pad = lambda x: torch.cat([x[None], torch.zeros(1, 1, x.shape[-1], dtype=x.dtype)], dim=1)  # noqa: E731
    teacher = TeacherTargets(final=final, head=LMHead(torch.randn(v, d, generator=g)), topk_values=pad(values),
                             topk_indices=pad(idx))
    separate = kd_loss(logits, predict, teacher, source, 1.0)
    (g_sep,) = torch.autograd.grad(separate, logits)
    shared = kd_loss(logits, predict, teacher, source, 1.0, torch.log_softmax(logits, -1))
    (g_sh,) = torch.autograd.grad(shared, logits)
    assert float(shared.detach()) == pytest.approx(float(separate.detach()), rel=1e-6)
    torch.testing.assert_close(g_sh, g_sep, rtol=1e-5, atol=1e-8)


def test_kd_auto_distils_exact_logits_for_small_vocabularies_and_top_k_for_large_ones(capsys):
    """When a store holds both the final state and top-k log-probabilities, `--kd auto` decides by the teacher's
    vocabulary and says why; a store with one of them, or an online teacher, gets what there is."""
    from types import SimpleNamespace

    from pipeline.train.objective import EXACT_KD_MAX_VOCAB, build_objective

    cfg = TrainConfig(student="s", out="o", data="d", mode="distill", features="f", alpha=0.5, kd="auto")

    def store(vocab: int, layers: list, topk: bool) -> SimpleNamespace:
        return SimpleNamespace(layers=layers, has_topk=topk, manifest={"teacher": {"vocab_size": vocab}})

    assert build_objective(cfg, 2, 4, store(49_152, ["final", 2, 4], True)).kd == "final"
    assert "exact KD: the vocabulary (49,152)" in capsys.readouterr().out
    assert build_objective(cfg, 2, 4, store(262_144, ["final", 2, 4], True)).kd == "topk"
    assert f"top-k KD: the vocabulary (262,144) is above {EXACT_KD_MAX_VOCAB:,}" in capsys.readouterr().out
    assert build_objective(cfg, 2, 4, store(262_144, ["final", 2, 4], False)).kd == "final"
    assert build_objective(cfg, 2, 4, store(49_152, [2, 4], True)).kd == "topk"
    assert build_objective(cfg, 2, 4, None).kd == "final"
    assert capsys.readouterr().out == ""
