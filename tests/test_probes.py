"""Linear probes (METHOD.md §4): features are the frozen network's penultimate activations at
one bit-width, and a closed-form probe separates what is linearly separable."""
from __future__ import annotations

import pytest
import torch

from emq.analysis.probes import extract_features, fit_probe, probe_accuracy, transfer_probe
from emq.config import ModelConfig, QuantConfig
from emq.data.datasets import TensorSplit
from emq.nn.models import make_model


def clusters(n_per_class=60, classes=4, dim=8, seed=0):
    """Gaussian clusters around well separated centres: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = 6 * torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + 0.5 * torch.randn(len(y), dim, generator=g), y


def test_a_probe_on_linearly_separable_features_classifies_held_out_samples():
    h, y = clusters()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    fit, held = perm[:160], perm[160:]
    probe = fit_probe(h[fit], y[fit], 4)
    assert probe.accuracy(h[held], y[held]) == 1.0


def test_a_probe_on_features_that_carry_no_label_is_near_chance():
    g = torch.Generator().manual_seed(2)
    h, y = torch.randn(2000, 8, generator=g), torch.randint(0, 4, (2000,), generator=g)
    assert fit_probe(h[:1000], y[:1000], 4).accuracy(h[1000:], y[1000:]) < 0.35


def tiny_split(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return TensorSplit(x, torch.arange(n) % 10, torch.tensor([0.5]), torch.tensor([0.25]))


def tiny_model():
    torch.manual_seed(0)
    return make_model(ModelConfig(depth=8, width=0.25), QuantConfig(norm="shared", correction="meanvar"),
                      (2, 32), num_classes=10, in_channels=1)


@pytest.mark.parametrize("bits", [2, 32])
def test_features_are_the_frozen_models_penultimate_activations_at_that_bit_width(bits):
    split, model = tiny_split(), tiny_model()
    index = torch.tensor([3, 7, 11])
    feats = extract_features(model, split, bits, index, batch_size=2)
    assert not model.training and feats.shape == (3, 16)
    with torch.no_grad():
        want = model.features(split.normalise(split.x[index]))
    assert torch.allclose(feats, want, atol=1e-6)


def test_features_differ_between_bit_widths():
    split, model = tiny_split(), tiny_model()
    assert not torch.allclose(extract_features(model, split, 2), extract_features(model, split, 32))


def test_a_probe_is_never_evaluated_on_samples_it_was_fitted_on():
    with pytest.raises(ValueError, match="evaluated on 1 samples it was fitted on"):
        probe_accuracy(tiny_model(), tiny_split(), 2, torch.arange(0, 20), torch.arange(19, 40), 10)


def test_a_transfer_probe_fits_on_half_the_other_childs_data_and_scores_the_rest_and_the_test_split():
    from emq.data.datasets import Dataset

    split = tiny_split(40)
    data = Dataset("tiny", split, tiny_split(20), 10, [str(c) for c in range(10)])
    out = transfer_probe(tiny_model(), data, 2, torch.arange(20, 40))
    assert set(out) == {"other", "test"}
    assert out["other"] * 10 == pytest.approx(round(out["other"] * 10))  # accuracy over the 10 held-out samples
    assert out["test"] * 20 == pytest.approx(round(out["test"] * 20))
