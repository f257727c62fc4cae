"""Linear probes (METHOD.md §4): how well a frozen network's features at one bit-width
separate the classes.

The network is frozen in eval mode at bit-width ``b``; its penultimate features (the input
of the classifier) feed a linear classifier fitted in closed form: ridge regression onto
one-hot targets of standardised features, the class with the largest output wins. Probe
accuracy is measured on samples the probe was not fitted on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from emq.nn.layers import set_bits
from emq.quant.quantizers import check_bits

RIDGE = 1e-2  # ridge penalty on standardised features (the bias is not penalised)


@torch.no_grad()
def extract_features(model: nn.Module, split, bits: int, index: torch.Tensor | None = None, batch_size: int = 500,
                     device="cpu") -> torch.Tensor:
    """Penultimate features of ``split`` (or of its samples ``index``) at ``bits``; the model is left in eval mode."""
    set_bits(model.eval(), check_bits(bits))
    part = split if index is None else split.subset(index)
    return torch.cat([model.features(x).cpu() for x, _, _ in part.batches(batch_size, device=device)])


@dataclass(frozen=True)
class Probe:
    """A linear classifier on standardised features: ``argmax(((h - mean) / std) @ weight + bias)``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.double() - self.mean) / self.std) @ self.weight + self.bias

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.logits(features).argmax(1) == labels).double().mean().item()


def fit_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ridge: float = RIDGE) -> Probe:
    """Closed-form ridge regression of one-hot labels on standardised features (in float64)."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    h = features.double()
    mean, std = h.mean(0), h.std(0).clamp_min(1e-8)
    z = (h - mean) / std
    target = F.one_hot(labels, num_classes).double()
    bias = target.mean(0)
    zc = z - z.mean(0)
    gram = zc.T @ zc + ridge * len(z) * torch.eye(z.shape[1], dtype=z.dtype)
    weight = torch.linalg.solve(gram, zc.T @ (target - bias))
    return Probe(mean, std, weight, bias - z.mean(0) @ weight)


def probe_accuracy(model: nn.Module, split, bits: int, fit_index: torch.Tensor, eval_index: torch.Tensor,
                   num_classes: int, device="cpu") -> float:
    """Fit a probe on the features of samples ``fit_index`` at ``bits``; its accuracy on ``eval_index``."""
    overlap = set(fit_index.tolist()) & set(eval_index.tolist())
    if overlap:
        raise ValueError(f"the probe would be evaluated on {len(overlap)} samples it was fitted on")
    probe = fit_probe(extract_features(model, split, bits, fit_index, device=device), split.y[fit_index], num_classes)
    return probe.accuracy(extract_features(model, split, bits, eval_index, device=device), split.y[eval_index])


def transfer_probe(model: nn.Module, data, bits: int, other_index: torch.Tensor, seed: int = 0,
                   device="cpu") -> dict[str, float]:
    """Probe the child at ``bits`` on data that only another child trained on (METHOD.md §4).

    The probe is fitted on a random half of ``other_index`` and scored on the other half
    (``other``: samples this child never trained on, the other child did) and on the test
    split (``test``: samples no child trained on).
    """
    perm = other_index[torch.randperm(len(other_index), generator=torch.Generator().manual_seed(seed))]
    fit, held = perm[:len(perm) // 2], perm[len(perm) // 2:]
    probe = fit_probe(extract_features(model, data.train, bits, fit, device=device), data.train.y[fit],
                      data.num_classes)
    other = probe.accuracy(extract_features(model, data.train, bits, held, device=device), data.train.y[held])
    test = probe.accuracy(extract_features(model, data.test, bits, device=device), data.test.y)
    return {"other": other, "test": test}
