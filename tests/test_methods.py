"""Every registered method trains: one shared train-a-few-steps test, plus the registry's errors."""
import pytest
import torch

from emq.config import ConfigError, RunConfig, load_config
from emq.layers import set_bits
from emq.methods import METHODS, method_config
from emq.models import make_model
from emq.schemes import DoubleRoundingQuantizer, ShiftQuantizer
from emq.training import multibit_step

BITS = (2, 4, 8, 32)


def tiny_model(cfg: RunConfig):
    torch.manual_seed(0)
    return make_model(cfg.model, cfg.quant, cfg.train.bits, num_classes=10, in_channels=1)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_a_few_steps(name):
    cfg = method_config(name, load_config(profile="smoke"))
    model = tiny_model(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = []
    for _ in range(8):
        opt.zero_grad()
        losses.append(multibit_step(model, x, y, cfg.train.bits, cfg.train.distill))
        if _ == 0:  # every learnable parameter, quantizer parameters included, gets a gradient
            missing = [k for k, p in model.named_parameters() if p.grad is None]
            assert not missing, missing
        opt.step()
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in losses)
    assert losses[-1][32] < losses[0][32]  # the same batch eight times: full precision fits it
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters())


def test_an_unregistered_method_lists_the_registered_ones():
    with pytest.raises(ConfigError) as e:
        method_config("dorefa_plus", RunConfig())
    assert "unknown method 'dorefa_plus'" in str(e.value) and all(n in str(e.value) for n in METHODS)


def test_an_unknown_quantizer_scheme_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="quant.weight_quantizer.*dorefa, lsq, qil, shift, double_rounding"):
        load_config(overrides=["quant.weight_quantizer=apot"])


def test_lsq_cannot_evaluate_a_bit_width_it_learned_no_step_for():
    cfg = method_config("lsq", load_config(profile="smoke"))
    model = set_bits(tiny_model(cfg).eval(), 3)
    with pytest.raises(ValueError, match="LSQ has no step for 3-bit"):
        model(torch.randn(2, 1, 16, 16))


def test_shift_bit_has_no_one_bit_level_set():
    with pytest.raises(ValueError, match="no 1-bit level set"):
        ShiftQuantizer()(torch.randn(10), 1)


def test_shift_quantizer_is_soft_while_training_and_hard_in_eval():
    w = torch.randn(200, generator=torch.Generator().manual_seed(1))
    q = ShiftQuantizer(steepness=5.0)
    soft, hard = q.train()(w, 3), q.eval()(w, 3)
    assert len(torch.unique(hard)) <= 7 and len(torch.unique(soft)) > 7


def test_double_rounding_serves_every_lower_precision_from_one_int8_copy():
    w = torch.randn(500, generator=torch.Generator().manual_seed(2))
    q = DoubleRoundingQuantizer(high=8)
    w8 = q(w, 8)
    codes8 = torch.round(w8 / q.scale)
    for low in (2, 4):
        expected = torch.clamp(torch.round(codes8 / 2 ** (8 - low)), -(2 ** (low - 1)), 2 ** (low - 1) - 1)
        assert torch.equal(q(w, low), expected * (q.scale * 2 ** (8 - low)))
    with pytest.raises(ValueError, match="from 8-bit, not 16-bit"):
        q(w, 16)
