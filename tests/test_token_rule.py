"""The token rule: a real teacher's massive-activation rows must not decide the feature distances, and inputs
without such rows must be computed exactly as before the rule existed."""
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.geometry import (
    ALL_TOKENS, DEFAULT_TOKEN_RULE, FEATURE_LOSSES, TokenRule, cka_distance, feature_gram_distance,
    procrustes_distance, procrustes_floor,
)

DISTANCES = [procrustes_distance, feature_gram_distance, cka_distance]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spiked_teacher(n: int = 400, d: int = 64, spike: float = 100.0, seed: int = 0) -> torch.Tensor:
    """Gaussian rows, and row 0 `spike` times longer, as a real teacher's first token at layers 15-25."""
    t = torch.randn(n, d, generator=gen(seed), dtype=torch.float64)
    t[0] = t[0] / t[0].norm() * spike * t[1:].norm(dim=1).median()
    return t


@pytest.mark.parametrize("name", list(FEATURE_LOSSES))
def test_spike_free_inputs_give_exactly_the_all_token_value_and_gradient(name):
    g = gen(1)
    teacher = torch.randn(3, 50, 40, generator=g) * 2.0 + 0.5
    mask = torch.ones(3, 50, dtype=torch.bool)
    mask[1, 30:] = False
    student = torch.randn(3, 50, 24, generator=g)
    loss = FEATURE_LOSSES[name]
    params = loss.make_params(24, 40)
    out = []
    for rule in (DEFAULT_TOKEN_RULE, ALL_TOKENS):
        s = student.clone().requires_grad_(True)
        value = loss(s, teacher, mask, params, rule=rule)
        value.backward()
        out.append((value.detach(), s.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert DEFAULT_TOKEN_RULE.select(teacher, mask) == (mask, 0)


@pytest.mark.parametrize("dist", DISTANCES)
def test_a_row_100x_the_others_does_not_decide_the_distance(dist):
    teacher = spiked_teacher()
    noise = torch.randn(teacher.shape, generator=gen(2), dtype=torch.float64)
    # Student A matches the geometry of every ordinary token and misses the spike.
    good = teacher.clone()
    good[0] = good[1:].mean(0)
    good = good + 0.05 * noise
    # Student B matches the spike and nothing else.
    spike_only = 0.2 * noise
    spike_only[0] = teacher[0]
    # Over all tokens, the spike decides: B looks better than A.
    assert dist(spike_only, teacher, rule=ALL_TOKENS) < dist(good, teacher, rule=ALL_TOKENS)
    # Under the default rule, the spike row is left out: A is close, B is far.
    assert dist(good, teacher, squared=False) < 0.2
    assert dist(spike_only, teacher, squared=False) > 4 * dist(good, teacher, squared=False)
    # And the default value is exactly the distance over the other rows.
    assert torch.equal(dist(good, teacher), dist(good[1:], teacher[1:], rule=ALL_TOKENS))


def test_the_rule_is_decided_on_valid_teacher_rows_and_counts_what_it_leaves_out():
    t = torch.randn(2, 20, 16, generator=gen(3))
    t[0, 0] *= 50.0
    t[1, 0] *= 50.0
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    t[1, 17] *= 1000.0  # padding: not a valid row, must not count
    keep, dropped = DEFAULT_TOKEN_RULE.select(t, mask)
    assert dropped == 2
    assert not keep[0, 0] and not keep[1, 0] and not keep[1, 15:].any() and keep[0, 1:].all()
    assert ALL_TOKENS.select(t, mask) == (mask, 0)


def test_procrustes_floor_follows_the_rule():
    teacher = spiked_teacher(d=64)
    assert float(procrustes_floor(teacher, 8, rule=ALL_TOKENS)) < 0.05  # the spike alone: a narrow student "fits"
    assert float(procrustes_floor(teacher, 8)) > 0.5


def test_rownorm_ignores_each_row_s_length():
    g = gen(4)
    teacher = torch.randn(200, 32, generator=g, dtype=torch.float64)
    student = torch.randn(200, 16, generator=g, dtype=torch.float64)
    scale = torch.rand(200, 1, generator=g, dtype=torch.float64) * 100 + 0.01
    rule = TokenRule.parse("rownorm")
    for dist in DISTANCES:
        assert float(dist(student * scale, teacher / scale, rule=rule)) == pytest.approx(
            float(dist(student, teacher, rule=rule)), abs=1e-9)


@pytest.mark.parametrize("text", ["outliers:4", "all", "rownorm", "outliers:2.5+rownorm"])
def test_rule_text_round_trips(text):
    assert str(TokenRule.parse(text)) == text


@pytest.mark.parametrize("text", ["outliers", "outliers:0.5", "outliers:x", "median:4", ""])
def test_a_bad_rule_is_a_config_error_naming_the_choices(text):
    with pytest.raises(ConfigError, match="token rule"):
        TokenRule.parse(text)


def test_a_massive_channel_every_token_carries_does_not_hide_a_massive_row():
    """Gemma 3's case: one channel is ~1e5 in every row, so raw norms are all alike and a first token 10x the
    others' centred norm looks 1.5x; the rule measures centred norms (what the distances see) and finds it.
    Moving every row by one vector changes nothing the rule decides."""
    t = torch.randn(4, 60, 32, generator=gen(4), dtype=torch.float64)
    t[:, 0] *= 10.0
    mask = torch.ones(4, 60, dtype=torch.bool)
    shifted = t.clone()
    shifted[..., 7] += 50.0 * t.norm(dim=-1).median()
    raw = shifted.norm(dim=-1)
    assert float((raw[:, 0] / raw.median()).max()) < 1.5  # a raw-norm rule would keep the first tokens
    for x in (t, shifted, t + torch.randn(32, generator=gen(5), dtype=torch.float64) * 1e3):
        keep, dropped = DEFAULT_TOKEN_RULE.select(x, mask)
        assert dropped == 4 and not keep[:, 0].any() and keep[:, 1:].all()


def test_inputs_where_most_rows_are_equal_keep_every_row():
    same = torch.ones(1, 5, 8)
    assert DEFAULT_TOKEN_RULE.select(same, None) == (None, 0)
    one = torch.randn(1, 1, 8, generator=gen(6))
    assert DEFAULT_TOKEN_RULE.select(one, torch.ones(1, 1, dtype=torch.bool))[1] == 0
