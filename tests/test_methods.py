"""Every registered method trains: one shared train-a-few-steps test through the real training
loop, one at the level of a single multi-bit step, plus the registry's errors."""
from pathlib import Path

import pytest
import torch
from conftest import TINY_METHODS as TINY

from emq.config import ConfigError, RunConfig, load_config
from emq.data.load import load_data
from emq.methods import METHODS, method_config, method_configs
from emq.nn.layers import set_bits
from emq.nn.models import make_model
from emq.nn.storage import stored_bytes
from emq.quant.schemes import DoubleRoundingQuantizer, ShiftQuantizer
from emq.results import ResultsStore
from emq.training.loop import init_from_run, make_companion, shared_batch, train, train_step
from emq.training.recipes import step_configure

BITS = (2, 4, 8, 32)
DATA_ROOT = Path(__file__).resolve().parents[1] / "data"


def tiny_model(cfg: RunConfig):
    torch.manual_seed(0)
    return make_model(cfg.model, cfg.quant, cfg.train.bits, num_classes=10, in_channels=1)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_a_few_steps(name):
    cfg = method_config(name, load_config(profile="smoke", overrides={"data.root": str(DATA_ROOT)}))
    model = tiny_model(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    companion = make_companion(cfg, load_data(cfg.data), "cpu") if cfg.train.distill == "joint" else None
    if companion is not None:
        opt.add_param_group({"params": list(companion.parameters())})
    losses = []
    for _ in range(8):
        opt.zero_grad()
        # the schedules' last step (every block quantized, every stage reached), where all parameters train
        configure = step_configure(cfg.train, model, step=7, total=8)
        losses.append(train_step(model, shared_batch(x, y, cfg.train.bits), cfg.train.distill, configure, companion)[0])
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


@pytest.fixture(scope="module")
def tiny_data():
    return load_data(load_config(profile="smoke", overrides=TINY).data)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_through_the_training_loop_and_counts_its_passes(name, tiny_data, tmp_path):
    store = ResultsStore(tmp_path)
    for cfg in method_configs(name, load_config(profile="smoke", overrides=TINY)):
        run = train(cfg, store, device="cpu", progress=False, data=tiny_data)
    summary = run.summary
    assert set(summary["acc"]) == {str(b) for b in cfg.train.bits}
    assert all(0.0 <= a <= 1.0 for a in summary["acc"].values())
    steps, per_step = summary["steps"], cfg.train.batch_size
    passes = {k: v["forward"] for k, v in summary["sample_passes"].items()}
    if cfg.train.progressive == "bits":  # 8 steps in 4 stages: 32 trains in all, 8 from the 3rd step, ...
        assert steps == 8 and passes == {"32": 8 * per_step, "8": 6 * per_step, "4": 4 * per_step, "2": 2 * per_step}
    else:
        expected = {str(b): steps * per_step for b in cfg.train.bits}
        if cfg.train.distill == "joint":
            expected["companion"] = steps * per_step
        assert passes == expected


def test_shift_bit_fine_tunes_the_full_precision_run_for_half_the_epochs():
    base = load_config(profile="smoke", overrides={**TINY, "train.epochs": 4})
    pre, fine = method_configs("shift", base)
    assert pre == method_config("full_precision", base) and pre.train.bits == (32,)
    assert fine.train.init_from == pre.hash() and fine.train.epochs == 2


def test_a_fine_tuned_run_starts_from_its_source_weights(tiny_data, tmp_path):
    store = ResultsStore(tmp_path)
    pre, fine = method_configs("shift", load_config(profile="smoke", overrides=TINY))
    source = torch.load(train(pre, store, device="cpu", progress=False, data=tiny_data).path / "model.pt",
                        weights_only=True)
    model = make_model(fine.model, fine.quant, fine.train.bits, 10, 1)
    init_from_run(model, store, pre.hash(), "cpu")
    start = model.state_dict()
    assert torch.equal(start["blocks.0.conv1.weight"], source["blocks.0.conv1.weight"])
    assert torch.equal(start["fc.weight"], source["fc.weight"])
    # every switchable BN copy starts from the source's one full-precision BN
    for b in fine.train.bits:
        for stat in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(start[f"blocks.0.bn1.bns.{b}.{stat}"], source[f"blocks.0.bn1.bns.32.{stat}"])


def test_init_from_a_run_that_does_not_exist_is_a_one_line_error(tiny_data, tmp_path):
    cfg = load_config(profile="smoke", overrides={**TINY, "train.init_from": "0123456789ab"})
    with pytest.raises(ConfigError, match="no finished run of that hash"):
        train(cfg, ResultsStore(tmp_path), device="cpu", progress=False, data=tiny_data)


@pytest.mark.parametrize("scheme, bits", [("shift", 1), ("lsq", 1), ("double_rounding", 1)])
def test_a_bit_width_the_quantizer_has_no_levels_for_is_a_config_error(scheme, bits):
    with pytest.raises(ConfigError, match=f"'{scheme}' cannot do {bits}-bit"):
        load_config(overrides={"quant.weight_quantizer": scheme, "train.bits": [bits, 4, 32]})


def test_double_rounding_stores_int8_weights_in_a_quarter_of_the_fp32_bytes():
    base = load_config(profile="smoke")
    dr = method_config("double_rounding", base)
    model = make_model(dr.model, dr.quant, dr.train.bits, 10, 1)
    size = stored_bytes(model)
    quantized = sum(m.weight.numel() for m in model.modules() if isinstance(m._modules.get("weight_quantizer"),
                                                                            DoubleRoundingQuantizer))
    assert quantized > 0
    assert size["fp32"] - size["stored"] == 4 * quantized - quantized  # 8 bits instead of 32 per weight
    other = method_config("any_precision", base)
    plain = stored_bytes(make_model(other.model, other.quant, other.train.bits, 10, 1))
    assert plain["stored"] == plain["fp32"]
