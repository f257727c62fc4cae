"""The quantizers of METHOD.md §1 and the weight bias correction of §2.

Each quantizer is checked against a direct integer reference written here from the spec in
float64 numpy (integer code ``k = round(n_b u)`` in ``0..n_b``, value ``2k/n_b - 1`` for
weights, ``k/n_b`` for activations), with exact equality, not a tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emq.quant.quantizers import (
    SUPPORTED_BITS,
    activation_reference,
    channel_stats,
    check_bits,
    correct_weight_bias,
    levels,
    quantize_activation,
    quantize_weight,
    round_ste,
)

LOW_BITS = [1, 2, 3, 4, 5, 8, 16]
UNSUPPORTED = [0, 17, 33, -2, 2.5, True, False, "4", None]


def weights(shape=(8, 4, 3, 3), seed=0, scale=0.5) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0.0, scale, shape))  # float64


# ---- integer references, straight from METHOD.md §1 ----------------------------------------
def ref_weight_codes(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes k in {0..n_b} and values 2k/n_b - 1 of the DoReFa weight quantizer."""
    n = 2 ** bits - 1
    t = np.tanh(w)
    m = np.abs(t).max()
    u = t / (2 * m) + 0.5
    k = np.round(n * u)  # both numpy and torch round half to even
    assert k.min() >= 0 and k.max() <= n
    return k.astype(np.int64), 2 * k / n - 1


def ref_activation_codes(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    n = 2 ** bits - 1
    k = np.round(n * np.clip(x, 0.0, 1.0))
    return k.astype(np.int64), k / n


def codes_of_weight(q: torch.Tensor, bits: int) -> np.ndarray:
    """Recover the integer codes from quantized weight values."""
    n = 2 ** bits - 1
    return torch.round((q + 1) * n / 2).to(torch.int64).numpy()


# ---- weight quantizer ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", LOW_BITS)
def test_weight_quantizer_equals_integer_reference_exactly(bits):
    w = weights(seed=bits)
    q = quantize_weight(w, bits)
    k_ref, v_ref = ref_weight_codes(w.numpy(), bits)
    assert q.dtype == torch.float64
    assert np.array_equal(codes_of_weight(q, bits), k_ref)
    assert torch.equal(q, torch.from_numpy(v_ref))  # values, atol = 0


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_weight_quantizer_hits_exactly_the_2_to_the_b_levels(bits):
    n = 2 ** bits - 1
    q = quantize_weight(weights((64, 32, 3, 3), seed=1), bits)
    expected = torch.tensor([2 * k / n - 1 for k in range(n + 1)], dtype=torch.float64)
    assert torch.equal(torch.unique(q), expected)


def test_two_bit_weights_take_exactly_minus_one_minus_a_third_a_third_one():
    q = quantize_weight(weights((32, 16, 3, 3), seed=2), 2)
    values = sorted(torch.unique(q).tolist())
    assert len(values) == 4
    # 2*1/3 - 1 is one ulp away from the float -1/3, hence the 1e-15
    assert values == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0], rel=0, abs=1e-15)


def test_weight_quantizer_is_per_tensor_and_maps_the_largest_weight_to_plus_or_minus_one():
    w = weights(seed=3)
    w[0, 0, 0, 0] = 5.0  # largest |tanh|
    w[1, 0, 0, 0] = -4.0
    q = quantize_weight(w, 3)
    assert q[0, 0, 0, 0].item() == 1.0
    # the scale m = max|tanh(W)| of the whole tensor sets every channel's levels
    k_ref, _ = ref_weight_codes(w.numpy(), 3)
    assert np.array_equal(codes_of_weight(q, 3), k_ref)


def test_float32_weights_quantize_to_the_same_codes_as_float64():
    w = weights(seed=4)
    q32 = quantize_weight(w.float(), 4)
    assert q32.dtype == torch.float32
    k_ref, v_ref = ref_weight_codes(w.numpy(), 4)
    assert np.array_equal(codes_of_weight(q32.double(), 4), k_ref)
    assert torch.allclose(q32.double(), torch.from_numpy(v_ref), rtol=0, atol=1e-6)


def test_full_precision_weight_is_tanh_over_max_abs_tanh():
    w = weights(seed=5)
    q = quantize_weight(w, 32)
    t = torch.tanh(w)
    assert torch.equal(q, t / t.abs().max())
    t_np = np.tanh(w.numpy())
    assert np.allclose(q.numpy(), t_np / np.abs(t_np).max(), rtol=1e-14, atol=0)
    assert q.abs().max().item() == 1.0


@pytest.mark.parametrize("bits", [2, 4, 32])
def test_scale_by_mean_multiplies_by_mean_abs_w_exactly(bits):
    w = weights(seed=6)
    e = w.abs().mean()
    assert torch.equal(quantize_weight(w, bits, scale_by_mean=True), quantize_weight(w, bits) * e)


def test_scale_by_mean_is_a_constant_for_the_gradient():
    w1 = weights(seed=7).requires_grad_()
    quantize_weight(w1, 4, scale_by_mean=True).sum().backward()
    w2 = w1.detach().clone().requires_grad_()
    quantize_weight(w2, 4).sum().backward()
    e = w1.detach().abs().mean()
    assert torch.allclose(w1.grad, w2.grad * e, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_weight_ste_gradient_is_that_of_the_full_precision_path_with_m_detached(bits):
    """round_ste is the identity backward, so d sum(Q_b(W)) / dW = (1 - tanh(W)^2) / m."""
    w = weights(seed=8).requires_grad_()
    quantize_weight(w, bits).sum().backward()
    t = np.tanh(w.detach().numpy())
    expected = (1 - t ** 2) / np.abs(t).max()
    assert np.allclose(w.grad.numpy(), expected, rtol=1e-12, atol=0)
    w32 = w.detach().clone().requires_grad_()
    quantize_weight(w32, 32).sum().backward()
    assert torch.allclose(w.grad, w32.grad, rtol=1e-12, atol=0)


def test_round_ste_rounds_forward_exactly_and_passes_gradient_unchanged():
    x = torch.tensor([0.2, 0.5, 1.5, 2.49, 2.51, 6.0, 14.999], dtype=torch.float64, requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))  # exactly integers, half to even
    g = torch.arange(1.0, 8.0, dtype=torch.float64)
    y.backward(g)
    assert torch.equal(x.grad, g)


# ---- activation quantizer --------------------------------------------------------------------
@pytest.mark.parametrize("bits", LOW_BITS)
def test_activation_quantizer_equals_integer_reference_exactly(bits):
    x = torch.from_numpy(np.random.default_rng(bits).uniform(-0.5, 1.5, 4096))
    q = quantize_activation(x, bits)
    k_ref, v_ref = ref_activation_codes(x.numpy(), bits)
    n = 2 ** bits - 1
    assert np.array_equal(torch.round(q * n).to(torch.int64).numpy(), k_ref)
    assert torch.equal(q, torch.from_numpy(v_ref))


def test_two_bit_activations_take_exactly_zero_a_third_two_thirds_one():
    x = torch.linspace(-1, 2, 1001, dtype=torch.float64)
    assert torch.unique(quantize_activation(x, 2)).tolist() == [0.0, 1 / 3, 2 / 3, 1.0]


def test_activation_at_32_bits_is_the_clamp_to_0_1_alone():
    x = torch.tensor([-3.0, -0.1, 0.0, 0.123456, 0.999, 1.0, 7.0], dtype=torch.float64)
    assert torch.equal(quantize_activation(x, 32), x.clamp(0, 1))


@pytest.mark.parametrize("bits", [2, 4, 32])
def test_activation_ste_gradient_is_one_inside_0_1_and_zero_outside(bits):
    x = torch.tensor([-2.0, -0.3, 0.1, 0.4, 0.6, 0.9, 1.2, 5.0], dtype=torch.float64, requires_grad=True)
    quantize_activation(x, bits).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


# Signed zeros, both ends of [0, 1], the floats just beyond them, subnormals, levels' midpoints.
EDGES = [0.0, -0.0, 1.0, -1e-40, 1e-40, -1e-38, 1.0000001, 0.9999999, 0.5, 1 / 6, 1 / 14, 2.0, -3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [*LOW_BITS, 32])
def test_activation_quantizer_gives_the_autograd_references_values_and_gradients_bit_for_bit(bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    x = torch.cat([torch.tensor(EDGES, dtype=dtype), 0.4 + 0.7 * torch.randn(20000, generator=gen, dtype=dtype)])
    g = torch.randn(x.shape, generator=gen, dtype=dtype)
    fused, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = quantize_activation(fused, bits), activation_reference(reference, bits)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(out, ref) and torch.equal(out.signbit(), ref.signbit())
    assert torch.equal(fused.grad, reference.grad) and torch.equal(fused.grad.signbit(), reference.grad.signbit())


# ---- bit-widths --------------------------------------------------------------------------------
def test_supported_bit_widths_are_1_to_16_and_32():
    assert SUPPORTED_BITS == tuple(range(1, 17)) + (32,)
    for b in SUPPORTED_BITS:
        assert check_bits(b) == b
    assert [levels(b) for b in (1, 2, 3, 4, 8)] == [1, 3, 7, 15, 255]


@pytest.mark.parametrize("bits", UNSUPPORTED, ids=repr)
@pytest.mark.parametrize("fn", [check_bits, lambda b: quantize_weight(weights(), b),
                                lambda b: quantize_activation(torch.rand(5), b)],
                         ids=["check_bits", "quantize_weight", "quantize_activation"])
def test_unsupported_bit_width_raises_one_line_value_error(fn, bits):
    with pytest.raises(ValueError) as e:
        fn(bits)
    msg = str(e.value)
    assert "\n" not in msg
    assert "unsupported bit-width" in msg and repr(bits) in msg


# ---- weight bias correction (METHOD.md §2) -----------------------------------------------------
def quantized_and_reference(bits=2, seed=9, shape=(16, 8, 3, 3)):
    w = weights(shape, seed=seed).float()
    return quantize_weight(w, bits), quantize_weight(w, 32)


def ref_channel_stats(a: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel mean and population std, in float64 numpy."""
    flat = a.detach().double().numpy().reshape(a.shape[0], -1)
    return flat.mean(1), flat.std(1)


def test_channel_stats_are_per_output_channel_mean_and_population_std():
    a = weights((5, 3, 2, 2), seed=10)
    mean, std = channel_stats(a)
    assert mean.shape == std.shape == (5, 1, 1, 1)
    m_ref, s_ref = ref_channel_stats(a)
    assert np.allclose(mean.flatten().numpy(), m_ref, rtol=1e-12, atol=0)
    assert np.allclose(std.flatten().numpy(), s_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mean_correction_gives_each_channel_the_mean_of_the_full_precision_weights(bits):
    q, ref = quantized_and_reference(bits)
    corrected = correct_weight_bias(q, ref, "mean")
    got_mean, _ = ref_channel_stats(corrected)
    want_mean, _ = ref_channel_stats(ref)
    assert np.allclose(got_mean, want_mean, rtol=0, atol=1e-6)
    # only a per-channel shift: the spread is that of Q_b(W)
    shift = (corrected - q).reshape(q.shape[0], -1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-6)
    assert np.allclose(ref_channel_stats(corrected)[1], ref_channel_stats(q)[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_meanvar_correction_gives_each_channel_the_mean_and_std_of_the_full_precision_weights(bits):
    q, ref = quantized_and_reference(bits)
    corrected = correct_weight_bias(q, ref, "meanvar")
    got_mean, got_std = ref_channel_stats(corrected)
    want_mean, want_std = ref_channel_stats(ref)
    assert np.allclose(got_mean, want_mean, rtol=0, atol=1e-5)
    assert np.allclose(got_std, want_std, rtol=0, atol=1e-5)


def test_meanvar_correction_is_a_positive_affine_map_of_each_channel():
    q, ref = quantized_and_reference(2)
    corrected = correct_weight_bias(q, ref, "meanvar")
    q_mean, q_std = ref_channel_stats(q)
    r_mean, r_std = ref_channel_stats(ref)
    flat_q = q.double().numpy().reshape(q.shape[0], -1)
    expected = (flat_q - q_mean[:, None]) * (r_std / q_std)[:, None] + r_mean[:, None]
    assert np.allclose(corrected.double().numpy().reshape(q.shape[0], -1), expected, rtol=0, atol=1e-5)


def test_no_correction_is_the_identity():
    q, ref = quantized_and_reference(2)
    assert torch.equal(correct_weight_bias(q, ref, "none"), q)


def test_meanvar_correction_of_a_channel_with_zero_spread_shifts_it_to_the_reference_mean():
    """A quantized channel whose weights all fall on one level (likely for 1x1 shortcuts with
    few inputs at 1-2 bits) has no spread to rescale: it gets mean(R[c]), and its gradient
    is not blown up by a division by a near-zero spread."""
    q, ref = quantized_and_reference(2)
    q = q.clone()
    q[0] = q[0].new_tensor(2 * 1 / 3 - 1)  # all on level -1/3: std(Q_b(W)[0]) = 0
    q.requires_grad_()
    corrected = correct_weight_bias(q, ref, "meanvar")
    corrected[0].sum().backward()
    assert torch.isfinite(corrected).all()
    assert torch.allclose(corrected[0], ref[0].mean().expand_as(corrected[0]), atol=1e-6)
    assert q.grad.abs().max() < 1e3


def test_meanvar_correction_rescales_a_channel_of_tiny_weights_like_one_of_ordinary_weights():
    """std(Q_b(W)[c]) = 1e-6 is a spread, not zero, when the weights themselves are of scale 1e-6:
    (q - mean(q)) * std(R) / std(q) + mean(R) with q = (-s, s), R = (-2s, 2s) is (-2s, 2s)."""
    for s in (1e-6, 1e-3, 1.0):
        q, ref = torch.tensor([[-s, s]]), torch.tensor([[-2 * s, 2 * s]])
        corrected = correct_weight_bias(q, ref, "meanvar")
        assert torch.allclose(corrected, torch.tensor([[-2 * s, 2 * s]]), rtol=1e-6, atol=0), (s, corrected)


@pytest.mark.parametrize("level", [1e-6, 1 / 3, 0.7, 1.0])
def test_meanvar_correction_of_a_constant_channel_of_any_scale_falls_back_to_the_mean(level):
    """A channel whose quantized weights all sit on one level gets mean(R[c]) alone, at any
    scale of the weights, also where rounding leaves it a spread of a float epsilon or so."""
    q = torch.full((1, 512, 3, 3), level)
    _, q_std = channel_stats(q)
    assert q_std.item() <= 2 * torch.finfo(q.dtype).eps * level  # 0, or rounding of the mean (1/3, 0.7, 1e-6)
    ref = torch.linspace(-2 * level, 4 * level, q.numel()).reshape(q.shape)
    corrected = correct_weight_bias(q, ref, "meanvar")
    assert torch.allclose(corrected, ref.mean().expand_as(q), rtol=1e-6, atol=0)


def test_unknown_correction_raises_one_line_value_error():
    q, ref = quantized_and_reference(2)
    with pytest.raises(ValueError, match=r"unknown correction 'median'") as e:
        correct_weight_bias(q, ref, "median")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["mean", "meanvar"])
def test_detached_and_attached_statistics_give_the_same_forward_but_different_gradients(mode):
    q0, r0 = quantized_and_reference(2)
    g = torch.from_numpy(np.random.default_rng(11).normal(size=q0.shape)).float()
    out, grads = {}, {}
    for detach in (True, False):
        q, r = q0.clone().requires_grad_(), r0.clone().requires_grad_()
        out[detach] = correct_weight_bias(q, r, mode, detach_stats=detach)
        (out[detach] * g).sum().backward()
        grads[detach] = (q.grad, torch.zeros_like(r) if r.grad is None else r.grad)
    assert torch.equal(out[True], out[False])
    assert not torch.allclose(grads[True][0], grads[False][0])
    assert not torch.allclose(grads[True][1], grads[False][1])


def test_mean_correction_gradients_match_the_formula_in_both_gradient_choices():
    """W_b = q - mean(q) + mean(r): detached, dW_b/dq = I and dW_b/dr = 0; attached,
    the upstream gradient G gives G - mean_c(G) for q and mean_c(G) for each entry of r."""
    q0, r0 = quantized_and_reference(2)
    g = torch.from_numpy(np.random.default_rng(12).normal(size=q0.shape)).float()
    c_mean = g.mean(dim=(1, 2, 3), keepdim=True)
    q, r = q0.clone().requires_grad_(), r0.clone().requires_grad_()
    (correct_weight_bias(q, r, "mean", detach_stats=True) * g).sum().backward()
    assert torch.equal(q.grad, g)
    assert r.grad is None or torch.count_nonzero(r.grad) == 0
    q, r = q0.clone().requires_grad_(), r0.clone().requires_grad_()
    (correct_weight_bias(q, r, "mean", detach_stats=False) * g).sum().backward()
    assert torch.allclose(q.grad, g - c_mean, atol=1e-6)
    assert torch.allclose(r.grad, c_mean.expand_as(r), atol=1e-6)
