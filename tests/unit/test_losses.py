"""Unit tests for compress.losses: hand-computed values on tiny examples plus properties."""

from __future__ import annotations

import math

import pytest
import torch

from compress.losses import (
    attention_kl_loss,
    generalized_jsd_loss,
    hard_label_loss,
    hidden_state_loss,
    kd_kl_loss,
    mix_soft_hard,
    reverse_kl_loss,
    topk_kd_kl_loss,
    uniform_layer_map,
)

pytestmark = pytest.mark.unit

LN2, LN3 = math.log(2.0), math.log(3.0)


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) in plain python floats (0 * log 0 = 0)."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Row 0: student [0, 0] -> q = [1/2, 1/2]; teacher [ln 3, 0] -> p = [3/4, 1/4].
# Row 1: student [ln 3, 0] -> q = [3/4, 1/4]; teacher [0, 0] -> p = [1/2, 1/2].
STUDENT = [[0.0, 0.0], [LN3, 0.0]]
TEACHER = [[LN3, 0.0], [0.0, 0.0]]
P0, Q0 = [0.75, 0.25], [0.5, 0.5]
P1, Q1 = [0.5, 0.5], [0.75, 0.25]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- forward / reverse KL -------------------------------------------------------------------


def test_kd_kl_hand_computed():
    row0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    row1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    expected = (row0 + row1) / 2  # batchmean: sum over classes, mean over rows
    assert kd_kl_loss(t(STUDENT), t(TEACHER)).item() == pytest.approx(expected, abs=1e-6)


def test_reverse_kl_hand_computed():
    row0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(q0 || p0)
    row1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(q1 || p1)
    expected = (row0 + row1) / 2
    assert reverse_kl_loss(t(STUDENT), t(TEACHER)).item() == pytest.approx(expected, abs=1e-6)


def test_kd_kl_with_temperature_hand_computed():
    # teacher [2 ln 3, 0] / T=2 -> [3/4, 1/4]; student [0, 0] -> [1/2, 1/2]; times T**2 = 4.
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    got = kd_kl_loss(t([[0.0, 0.0]]), t([[2 * LN3, 0.0]]), temperature=2.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("fn", [kd_kl_loss, reverse_kl_loss, generalized_jsd_loss])
def test_temperature_squared_scaling(fn):
    # Doubling both the logits and T leaves p_T unchanged, so only the T**2 factor moves: x4.
    s, te = _rand(3, 5, seed=1), _rand(3, 5, seed=2)
    base = fn(s, te, temperature=1.0)
    assert fn(2 * s, 2 * te, temperature=2.0).item() == pytest.approx(4 * base.item(), rel=1e-5)
    assert fn(3 * s, 3 * te, temperature=3.0).item() == pytest.approx(9 * base.item(), rel=1e-5)


def test_kl_zero_when_equal_and_batch_seq_shape():
    x = _rand(2, 3, 7)
    assert kd_kl_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # (batch, seq, vocab): mean over all 6 positions == mean of per-position losses.
    s, te = _rand(2, 3, 7, seed=3), _rand(2, 3, 7, seed=4)
    per_pos = [kd_kl_loss(s[b, i], te[b, i]).item() for b in range(2) for i in range(3)]
    assert kd_kl_loss(s, te).item() == pytest.approx(sum(per_pos) / 6, rel=1e-5)


# --- generalized JSD ------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.5, 0.25])
def test_jsd_mid_value_hand_computed(beta):
    # Single row: p (teacher) = [3/4, 1/4], q (student) = [1/2, 1/2].
    p, q = [0.75, 0.25], [0.5, 0.5]
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
    if beta == 0.5:
        assert m == [0.625, 0.375]
    expected = beta * kl(p, m) + (1 - beta) * kl(q, m)
    got = generalized_jsd_loss(t([[0.0, 0.0]]), t([[LN3, 0.0]]), beta=beta)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_jsd_limits_follow_trl_convention():
    s, te = _rand(4, 6, seed=5), _rand(4, 6, seed=6)
    for temp in (1.0, 2.0):
        fwd = kd_kl_loss(s, te, temperature=temp)
        rev = reverse_kl_loss(s, te, temperature=temp)
        assert torch.equal(generalized_jsd_loss(s, te, beta=0.0, temperature=temp), fwd)
        assert torch.equal(generalized_jsd_loss(s, te, beta=1.0, temperature=temp), rev)
    # The endpoints are the limits of JSD/beta and JSD/(1-beta), not of JSD itself.
    eps = 1e-3
    near0 = generalized_jsd_loss(s, te, beta=eps) / eps
    near1 = generalized_jsd_loss(s, te, beta=1 - eps) / eps
    assert near0.item() == pytest.approx(kd_kl_loss(s, te).item(), rel=2e-2)
    assert near1.item() == pytest.approx(reverse_kl_loss(s, te).item(), rel=2e-2)


def test_jsd_half_is_symmetric():
    s, te = _rand(3, 4, seed=7), _rand(3, 4, seed=8)
    a, b = generalized_jsd_loss(s, te, beta=0.5), generalized_jsd_loss(te, s, beta=0.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert 0 < a.item() <= math.log(2)


# --- hard labels and the combined loss -------------------------------------------------------


def test_hard_label_hand_computed_and_ignore_index():
    logits = t([[LN3, 0.0], [0.0, 0.0], [5.0, -5.0]])  # softmax rows: [3/4,1/4], [1/2,1/2], ...
    labels = torch.tensor([0, 1, -100])
    expected = (-math.log(0.75) - math.log(0.5)) / 2  # ignored row is out of numerator and count
    assert hard_label_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert hard_label_loss(logits, torch.tensor([0, 1, 7]), ignore_index=7).item() == (
        pytest.approx(expected, abs=1e-6)
    )
    seq = hard_label_loss(logits.reshape(1, 3, 2), labels.reshape(1, 3))  # (batch, seq, vocab)
    assert seq.item() == pytest.approx(expected, abs=1e-6)
    all_ignored = hard_label_loss(logits, torch.full((3,), -100))
    assert all_ignored.item() == 0.0


def _mixed(s, te, y, alpha=0.5, temperature=2.0, mask=None):
    return mix_soft_hard(kd_kl_loss(s, te, temperature, mask), s, y, alpha, mask)


def test_mix_soft_hard_hand_computed():
    # alpha=0.5, T=2. Teacher [2 ln 3, 0] / 2 -> [3/4, 1/4]; student [0, 0] -> [1/2, 1/2].
    # KD term is T**2 * KL; the CE term uses the raw (T=1) student logits: -log(1/2) = ln 2.
    kd = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    expected = 0.5 * kd + 0.5 * LN2
    got = _mixed(t([[0.0, 0.0]]), t([[2 * LN3, 0.0]]), torch.tensor([0]))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_mix_soft_hard_alpha_limits():
    s, te, y = _rand(2, 3, 5, seed=9), _rand(2, 3, 5, seed=10), torch.tensor([[0, 1, 2]] * 2)
    soft = kd_kl_loss(s, te, temperature=3.0)
    pure_kd = mix_soft_hard(soft, s, None, alpha=1.0)
    assert pure_kd.item() == pytest.approx(soft.item(), rel=1e-6)
    plain_ft = mix_soft_hard(soft, s, y, alpha=0.0)
    assert plain_ft.item() == pytest.approx(hard_label_loss(s, y).item(), rel=1e-6)
    mixed = mix_soft_hard(soft, s, y, alpha=0.3)
    assert mixed.item() == pytest.approx(0.3 * pure_kd.item() + 0.7 * plain_ft.item(), rel=1e-5)


def test_mix_soft_hard_bad_arguments():
    s, te, y = _rand(2, 3), _rand(2, 3), torch.tensor([0, 1])
    soft = kd_kl_loss(s, te)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            mix_soft_hard(soft, s, y, alpha=alpha)
    with pytest.raises(ValueError, match="labels are required"):
        mix_soft_hard(soft, s, None, alpha=0.5)
    with pytest.raises(ValueError, match="mask shape"):
        mix_soft_hard(soft, s, y, alpha=0.5, mask=torch.ones(3, dtype=torch.bool))


def test_mix_soft_hard_mask_also_drops_labels():
    s, te = _rand(1, 3, 4, seed=11), _rand(1, 3, 4, seed=12)
    mask = torch.tensor([[True, True, False]])
    y = torch.tensor([[1, 2, 3]])
    got = _mixed(s, te, y, alpha=0.5, mask=mask)
    want = _mixed(s[:, :2], te[:, :2], y[:, :2], alpha=0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


# --- hidden states and attention -------------------------------------------------------------


def test_hidden_state_mse_and_cosine_hand_computed():
    s, te = t([[1.0, 2.0], [3.0, 0.0]]), t([[0.0, 0.0], [1.0, 0.0]])
    # mse: ((1-0)^2 + (2-0)^2 + (3-1)^2 + 0^2) / 4 features*positions
    assert hidden_state_loss(s, te).item() == pytest.approx((1 + 4 + 4 + 0) / 4, abs=1e-6)
    s, te = t([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]), t([[0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    expected = ((1 - 0.0) + (1 - 1 / math.sqrt(2)) + (1 - 1.0)) / 3
    got = hidden_state_loss(s, te, kind="cosine")
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_hidden_state_nmse_is_mse_over_the_teachers_mean_square_and_scale_free():
    s, te = t([[1.0, 2.0], [3.0, 0.0]]), t([[0.0, 0.0], [1.0, 2.0]])
    # mse 9/4 (as above but t = [1, 2] in row 2: (1 + 4 + 4 + 4) / 4 = 13/4), teacher (0+0+1+4)/4
    got = hidden_state_loss(s, te, kind="nmse")
    assert got.item() == pytest.approx((13 / 4) / (5 / 4), abs=1e-6)
    # a residual stream 100x larger gives the same loss (plain mse: 10,000x)
    assert hidden_state_loss(100 * s, 100 * te, kind="nmse").item() == pytest.approx(got.item())
    assert hidden_state_loss(100 * s, 100 * te).item() == pytest.approx(
        1e4 * hidden_state_loss(s, te).item(), rel=1e-5)


def test_hidden_state_bad_arguments():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 8\)"):
        hidden_state_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="kind"):
        hidden_state_loss(torch.zeros(2, 4), torch.zeros(2, 4), kind="l1")


def test_attention_kl_hand_computed():
    # (batch=1, heads=2, q=2, k=2). Head 0: query 0 t=[1/2,1/2] s=[1/4,3/4]; query 1 t=[1,0]
    # s=[1/2,1/2] (teacher zero contributes 0). Head 1: student == teacher -> 0.
    te = t([[[[0.5, 0.5], [1.0, 0.0]], [[0.3, 0.7], [0.9, 0.1]]]])
    s = t([[[[0.25, 0.75], [0.5, 0.5]], [[0.3, 0.7], [0.9, 0.1]]]])
    q0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    q1 = 1.0 * math.log(1.0 / 0.5)
    expected = (q0 + q1 + 0 + 0) / 4  # mean over (batch, heads, q)
    assert attention_kl_loss(s, te).item() == pytest.approx(expected, abs=1e-6)
    # Query mask (batch, q) keeps query 0 only: (q0 + 0) / 2 heads.
    got = attention_kl_loss(s, te, mask=torch.tensor([[True, False]]))
    assert got.item() == pytest.approx(q0 / 2, abs=1e-6)


def test_attention_zero_student_prob_stays_finite_and_bad_shapes():
    te, s = t([[[[0.5, 0.5]]]]), t([[[[1.0, 0.0]]]])
    assert torch.isfinite(attention_kl_loss(s, te))
    with pytest.raises(ValueError):
        attention_kl_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError):
        attention_kl_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="mask"):
        attention_kl_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.ones(1, 2))


# --- top-k offline distillation -------------------------------------------------------------


def test_topk_hand_computed_k_less_than_c():
    # Vocab 4, teacher kept ids [1, 0] with logits [ln 3, 0] -> p = [3/4, 1/4].
    # Student logits [0, ln 2, 5, 7]: gathered at [1, 0] = [ln 2, 0] -> renormalised q = [2/3, 1/3]
    # (the dropped ids 2 and 3 carry most of the student mass but do not enter).
    s = t([[0.0, LN2, 5.0, 7.0]])
    vals, idx = t([[LN3, 0.0]]), torch.tensor([[1, 0]])
    expected = 0.75 * math.log(0.75 / (2 / 3)) + 0.25 * math.log(0.25 / (1 / 3))
    assert topk_kd_kl_loss(s, vals, idx).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_equals_full_kl_when_k_is_c(temperature):
    s, te = _rand(2, 3, 6, seed=13), _rand(2, 3, 6, seed=14)
    vals, idx = te.topk(6, dim=-1)  # a permutation of the vocab: order must not matter
    mask = torch.tensor([[True, True, False], [True, False, True]])
    for m in (None, mask):
        full = kd_kl_loss(s, te, temperature=temperature, mask=m)
        topk = topk_kd_kl_loss(s, vals, idx, temperature=temperature, mask=m)
        assert topk.item() == pytest.approx(full.item(), abs=1e-6)


def test_topk_matches_documented_full_vocab_renormalisation():
    s, te = _rand(2, 5, 11, seed=15), _rand(2, 5, 11, seed=16)
    vals, idx = te.topk(4, dim=-1)
    temp = 2.0
    log_q = torch.log_softmax(s / temp, -1).gather(-1, idx)
    log_q = log_q - log_q.logsumexp(-1, keepdim=True)
    p = torch.softmax(vals / temp, -1)
    expected = (p * (p.log() - log_q)).sum(-1).mean() * temp**2
    assert topk_kd_kl_loss(s, vals, idx, temperature=temp).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_topk_gradient_only_on_kept_ids_and_bad_shapes():
    s = _rand(1, 5).requires_grad_()
    topk_kd_kl_loss(s, t([[2.0, 1.0]]), torch.tensor([[3, 1]])).backward()
    assert s.grad[0, [0, 2, 4]].abs().max().item() == 0.0
    assert s.grad[0, [1, 3]].abs().max().item() > 0.0
    with pytest.raises(ValueError):
        topk_kd_kl_loss(torch.zeros(2, 5), torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        topk_kd_kl_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long))


# --- properties shared by the logit losses ---------------------------------------------------


def _topk_as_logit_loss(s, te, temperature=1.0, mask=None):
    vals, idx = te.topk(3, dim=-1)
    return topk_kd_kl_loss(s, vals, idx, temperature=temperature, mask=mask)


LOGIT_LOSSES = [kd_kl_loss, reverse_kl_loss, generalized_jsd_loss, _topk_as_logit_loss]


@pytest.mark.parametrize("fn", LOGIT_LOSSES)
def test_mask_excludes_padded_positions(fn):
    s, te = _rand(2, 4, 5, seed=17), _rand(2, 4, 5, seed=18)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    ref = fn(s, te, mask=mask)
    s_bad, te_bad = s.clone(), te.clone()
    s_bad[~mask], te_bad[~mask] = float("nan"), 1e4  # garbage in padding
    s_bad = s_bad.requires_grad_()
    got = fn(s_bad, te_bad, mask=mask)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    got.backward()
    assert torch.isfinite(s_bad.grad).all() and s_bad.grad[~mask].abs().max() == 0
    kept = [fn(s[b, i : i + 1], te[b, i : i + 1]).item() for b, i in mask.nonzero().tolist()]
    assert ref.item() == pytest.approx(sum(kept) / len(kept), rel=1e-5)  # mean over kept only
    assert fn(s, te, mask=mask.long()).item() == pytest.approx(ref.item(), rel=1e-6)  # 0/1 mask
    assert fn(s, te, mask=torch.zeros_like(mask)).item() == 0.0  # nothing selected: 0, not NaN


@pytest.mark.parametrize("fn", LOGIT_LOSSES)
def test_gradient_flows_to_student_only(fn):
    s, te = _rand(2, 3, 5, seed=19).requires_grad_(), _rand(2, 3, 5, seed=20)
    assert not te.requires_grad
    loss = fn(s, te, temperature=2.0)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert te.grad is None


def test_gradient_flows_for_distillation_and_hidden_losses():
    s = _rand(2, 3, 5, seed=21).requires_grad_()
    _mixed(s, _rand(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    h = _rand(2, 3, 4).requires_grad_()
    for kind in ("mse", "cosine"):
        h.grad = None
        hidden_state_loss(h, _rand(2, 3, 4, seed=22), kind=kind).backward()
        assert h.grad is not None and h.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", LOGIT_LOSSES)
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_bad_temperature_raises(fn, temperature):
    with pytest.raises(ValueError, match="temperature"):
        fn(torch.zeros(2, 4), torch.zeros(2, 4), temperature=temperature)


def test_other_bad_arguments_raise():
    z = torch.zeros(2, 3)
    for beta in (-0.01, 1.01):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd_loss(z, z, beta=beta)
    with pytest.raises(ValueError, match="shape"):
        kd_kl_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        kd_kl_loss(z, z, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        hard_label_loss(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))


def test_bf16_inputs_computed_in_float32():
    s, te = _rand(2, 3, 5, seed=23).bfloat16(), _rand(2, 3, 5, seed=24).bfloat16()
    got = kd_kl_loss(s, te, temperature=2.0)
    assert got.dtype == torch.float32
    ref = kd_kl_loss(s.float(), te.float(), temperature=2.0)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert hidden_state_loss(s, te).dtype == torch.float32


# --- layer map -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("s", "te", "expected"),
    [
        (3, 6, [(1, 2), (2, 4), (3, 6)]),
        (3, 12, [(1, 4), (2, 8), (3, 12)]),
        (1, 1, [(1, 1)]),
        (2, 2, [(1, 1), (2, 2)]),
        (4, 6, [(1, 2), (2, 3), (3, 5), (4, 6)]),  # 4.5 rounds half up to 5 (not banker's 4)
        (5, 2, [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]),  # never maps onto embeddings (0)
    ],
)
def test_uniform_layer_map(s, te, expected):
    assert uniform_layer_map(s, te) == expected


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3", None])
def test_uniform_layer_map_rejects_non_positive_ints(bad):
    with pytest.raises(ValueError):
        uniform_layer_map(bad, 6)
    with pytest.raises(ValueError):
        uniform_layer_map(3, bad)


def test_mix_teacher_logits_averages_soft_targets_by_weight():
    from compress.losses import mix_teacher_logits

    a = torch.tensor([[0.0, math.log(3.0)]])  # softmax: [0.25, 0.75]
    b = torch.tensor([[math.log(3.0), 0.0]])  # softmax: [0.75, 0.25]
    even = torch.softmax(mix_teacher_logits([a, b], [1.0, 1.0]), -1)
    assert torch.allclose(even, torch.tensor([[0.5, 0.5]]), atol=1e-6)
    skew = torch.softmax(mix_teacher_logits([a, b], [3.0, 1.0]), -1)  # .75*a + .25*b
    assert torch.allclose(skew, torch.tensor([[0.375, 0.625]]), atol=1e-6)
    hot = mix_teacher_logits([a, b], [3.0, 1.0], temperature=2.0)
    pa, pb = torch.softmax(a / 2, -1), torch.softmax(b / 2, -1)
    assert torch.allclose(torch.softmax(hot / 2, -1), 0.75 * pa + 0.25 * pb, atol=1e-6)
    with pytest.raises(ValueError):
        mix_teacher_logits([a, b], [1.0])


def test_shift_for_causal_lm_scores_the_next_token_and_masks_padding():
    from compress.losses import shift_for_causal_lm

    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 2 (the label at position 1)
    labels = torch.tensor([[1, 2, 0]])
    mask = torch.tensor([[1, 1, 0]])  # the last position is padding
    s, y, m = shift_for_causal_lm(logits, labels, mask)
    assert s.shape == (1, 2, 4) and y.tolist() == [[2, 0]] and m.tolist() == [[True, False]]
    loss = hard_label_loss(s, y.masked_fill(~m, -100))
    # only position 0 counts: CE of a 10-logit spike among 4 = log(1 + 3 e^-10)
    assert loss.item() == pytest.approx(math.log(1 + 3 * math.exp(-10)), rel=1e-3)


def test_soft_target_loss_dispatches_each_divergence():
    from compress.losses import soft_target_loss

    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    assert soft_target_loss(s, t, divergence="kl").item() == pytest.approx(
        kd_kl_loss(s, t).item())
    assert soft_target_loss(s, t, divergence="reverse_kl").item() == pytest.approx(
        reverse_kl_loss(s, t).item())
    assert soft_target_loss(s, t, divergence="jsd", beta=0.5).item() == pytest.approx(
        generalized_jsd_loss(s, t, 0.5).item())
    with pytest.raises(ValueError, match="divergence"):
        soft_target_loss(s, t, divergence="nope")
