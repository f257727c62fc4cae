"""The quantizers of the related methods (METHOD.md §5) against direct references."""
import math

import numpy as np
import pytest
import torch

from emq.quant.double_rounding import double_rounding, int_range, lower_from_high, to_int_high
from emq.quant.lsq import LSQQuantizer, lsq_init_step, lsq_quantize, lsq_range
from emq.quant.qil import QILQuantizer, qil_discretise, qil_transform_activation, qil_transform_weight
from emq.quant.shiftbit import ALPHA_CANDIDATES, shift_alpha, shift_hard, shift_levels, shift_soft


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- LSQ ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, signed, expected", [(2, True, (2, 1)), (4, True, (8, 7)), (2, False, (0, 3)),
                                                    (8, False, (0, 255))])
def test_lsq_range_is_that_of_the_paper(bits, signed, expected):
    assert lsq_range(bits, signed) == expected


@pytest.mark.parametrize("bits, signed", [(2, True), (3, True), (4, False), (8, False)])
def test_lsq_hits_exactly_the_integer_reference(bits, signed):
    x, step = randn(500), torch.tensor(0.3, dtype=torch.float64)
    q_n, q_p = lsq_range(bits, signed)
    codes = np.clip(np.round(x.numpy() / 0.3), -q_n, q_p)
    out = lsq_quantize(x, step, bits, signed)
    assert np.array_equal(out.numpy(), codes * 0.3)
    assert set(np.unique(codes)) <= set(range(-q_n, q_p + 1))


def test_lsq_step_gradient_is_the_papers_formula_times_the_gradient_scale():
    x = randn(64)
    step = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    lsq_quantize(x, step, 3, True).sum().backward()
    q_n, q_p = lsq_range(3, True)
    v = x / 0.25
    per_element = torch.where(v <= -q_n, -q_n, torch.where(v >= q_p, q_p, torch.round(v) - v))
    expected = per_element.sum() / math.sqrt(x.numel() * q_p)
    assert torch.allclose(step.grad, expected)


def test_lsq_init_step_and_module_initialises_once_per_bit_width():
    x = randn(100)
    assert torch.isclose(lsq_init_step(x, 4, True), 2 * x.abs().mean() / math.sqrt(7))
    q = LSQQuantizer((2, 4, 32), signed=True).double()
    q(x, 4)
    first = q.steps["4"].detach().clone()
    q(2 * x, 4)
    assert torch.equal(q.steps["4"].detach(), first)
    assert torch.equal(q(x, 32), x)
    with pytest.raises(ValueError, match="no step for 3-bit"):
        q(x, 3)


def test_lsq_step_receives_a_gradient_through_the_module():
    q = LSQQuantizer((2,), signed=False).double()
    q(randn(50).abs(), 2).sum().backward()
    assert q.steps["2"].grad is not None and q.steps["2"].grad != 0


# ---- QIL ---------------------------------------------------------------------------------
def test_qil_weight_transform_prunes_clips_and_keeps_sign():
    c, d, g = torch.tensor(0.5), torch.tensor(0.2), torch.tensor(1.0)
    w = torch.tensor([0.1, -0.2, 0.8, -0.9, 0.5, -0.5])
    out = qil_transform_weight(w, c, d, g)
    assert torch.equal(out[:2], torch.zeros(2) * torch.sign(w[:2]))
    assert torch.equal(out[2:4], torch.tensor([1.0, -1.0]))
    assert torch.allclose(out[4:], torch.tensor([0.5, -0.5]))  # the centre maps to 1/2


def test_qil_weight_transform_in_the_interval_follows_alpha_beta_gamma():
    c, d, g = torch.tensor(0.4), torch.tensor(0.3), torch.tensor(1.7)
    w = torch.linspace(0.11, 0.69, 30)
    alpha, beta = 0.5 / 0.3, -0.5 * 0.4 / 0.3 + 0.5
    assert torch.allclose(qil_transform_weight(w, c, d, g), (alpha * w + beta) ** 1.7, atol=1e-6)


def test_qil_activation_transform_is_the_clamped_line():
    x = torch.linspace(-1, 2, 31)
    out = qil_transform_activation(x, torch.tensor(0.5), torch.tensor(0.5))
    assert torch.allclose(out, x.clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qil_discretisation_hits_its_levels_exactly(bits):
    v = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    q = 2 ** (bits - 1) - 1
    assert torch.equal(torch.unique(qil_discretise(v, bits, True)), torch.arange(-q, q + 1, dtype=torch.float64) / q)
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert len(torch.unique(qil_discretise(u, bits, False))) == 2 ** bits


def test_qil_parameters_receive_gradients():
    qw, qa = QILQuantizer(signed=True), QILQuantizer(signed=False)
    (qw(torch.randn(200), 3).pow(2).sum() + qa(torch.rand(200) * 1.5, 3).pow(2).sum()).backward()
    for p in (qw.c, qw.d, qw.gamma, qa.c, qa.d):
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad != 0


def test_qil_interval_gradients_are_the_direct_ones_scaled_by_one_over_sqrt_n():
    w = torch.randn(400, generator=torch.Generator().manual_seed(4))
    q = QILQuantizer(signed=True)
    q(w, 3).pow(2).sum().backward()
    c, d, g = (torch.tensor(v, requires_grad=True) for v in (0.5, 0.5, 1.0))
    qil_discretise(qil_transform_weight(w, c, d, g), 3, signed=True).pow(2).sum().backward()
    for scaled, direct in ((q.c, c), (q.d, d), (q.gamma, g)):
        assert torch.allclose(scaled.grad, direct.grad / 20.0)  # sqrt(400) = 20


# ---- shift-bit ---------------------------------------------------------------------------
def test_shift_levels_are_zero_and_powers_of_two():
    assert shift_levels(2).tolist() == [0.0, 1.0]
    assert shift_levels(3).tolist() == [0.0, 0.25, 0.5, 1.0]
    assert len(shift_levels(4)) == 8


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_shift_hard_goes_to_the_nearest_level_with_the_sign(bits):
    w = randn(400)
    alpha = w.abs().max()
    levels = (shift_levels(bits) * alpha).numpy()
    ref = np.sign(w.numpy()) * levels[np.argmin(np.abs(np.abs(w.numpy())[:, None] - levels[None]), axis=1)]
    assert np.array_equal(shift_hard(w, bits, alpha).numpy(), ref)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_shift_alpha_is_the_candidate_with_the_least_squared_error(bits):
    w = randn(400, seed=bits)
    candidates = [w.abs().max() / 2 ** k for k in range(ALPHA_CANDIDATES)]
    errors = [float((shift_hard(w, bits, a) - w).pow(2).sum()) for a in candidates]
    assert float(shift_alpha(w, bits)) == float(candidates[int(np.argmin(errors))])
    assert torch.equal(shift_hard(w, bits), shift_hard(w, bits, shift_alpha(w, bits)))


def test_at_two_bits_the_chosen_alpha_zeroes_fewer_weights_than_max_abs():
    w = randn(4000, seed=7)
    zeros = lambda q: float((q == 0).float().mean())  # noqa: E731
    assert zeros(shift_hard(w, 2)) < zeros(shift_hard(w, 2, w.abs().max())) - 0.3


def test_shift_soft_staircase_tends_to_the_hard_quantizer():
    w = randn(400, seed=3)
    hard = shift_hard(w, 3)
    errors = [float((shift_soft(w, 3, lam) - hard).abs().max()) for lam in (10.0, 100.0, 10000.0)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2


def test_shift_soft_is_differentiable():
    w = randn(50).requires_grad_()
    shift_soft(w, 3, 20.0).sum().backward()
    assert torch.isfinite(w.grad).all() and (w.grad != 0).any()


# ---- Double Rounding -----------------------------------------------------------------------
def test_one_int_h_tensor_gives_every_lower_precision_by_a_second_rounding():
    w, s_h, high = randn(300), torch.tensor(0.01, dtype=torch.float64), 8
    w_h = to_int_high(w, s_h, high)
    lo, hi = int_range(high)
    assert w_h.min() >= lo and w_h.max() <= hi and torch.equal(w_h, torch.round(w_h))
    for low in (2, 4, 6):
        ref = np.clip(np.round(w_h.numpy() / 2 ** (high - low)), *int_range(low))
        assert np.array_equal(lower_from_high(w_h, high, low).numpy(), ref)
        assert np.array_equal(double_rounding(w, s_h, high, low).numpy(), ref * 0.01 * 2 ** (high - low))


def test_double_rounding_rejects_a_precision_above_the_stored_one():
    with pytest.raises(ValueError, match="from 4-bit, not 8-bit"):
        lower_from_high(torch.zeros(3), 4, 8)
