"""Quantization bias (METHOD.md §2): how ``Q_b(W)`` drifts from the full-precision weights
per output channel, how that shifts the pre-BN activations, and what the correction leaves.
"""
from __future__ import annotations

import contextlib

import pandas as pd
import torch
from torch import nn

from emq.nn.layers import QuantWeightMixin, set_bits
from emq.quant.quantizers import FULL_PRECISION, channel_stats


def quantized_layers(model: nn.Module) -> dict[str, QuantWeightMixin]:
    """The model's quantized conv/linear layers by name, in forward order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantWeightMixin)}


@contextlib.contextmanager
def corrected(model: nn.Module, mode: str):
    """Temporarily set the weight bias correction of every quantized layer to ``mode``."""
    layers = quantized_layers(model).values()
    saved = [m.correction for m in layers]
    try:
        for m in layers:
            m.correction = mode
        yield model
    finally:
        for m, c in zip(layers, saved):
            m.correction = c


@torch.no_grad()
def weight_drift(model: nn.Module, bits: list[int], modes=("none", "mean", "meanvar")) -> pd.DataFrame:
    """Per layer, output channel, bit-width and correction: mean and std of ``W_b[c]`` next to
    those of the full-precision effective weight ``R[c]``.

    Columns: layer, channel, bits, correction, mean_fp, std_fp, mean_q, std_q, mean_drift
    (``mean_q - mean_fp`` in units of ``std_fp``) and std_ratio (``std_q / std_fp``).
    """
    rows = []
    for name, layer in quantized_layers(model).items():
        r_mean, r_std = (s.flatten() for s in channel_stats(layer.effective_weight(FULL_PRECISION)))
        for mode in modes:
            with corrected(model, mode):
                for b in bits:
                    q_mean, q_std = (s.flatten() for s in channel_stats(layer.effective_weight(b)))
                    for c in range(len(r_mean)):
                        rows.append((name, c, b, mode, r_mean[c].item(), r_std[c].item(), q_mean[c].item(),
                                     q_std[c].item()))
    df = pd.DataFrame(rows, columns=["layer", "channel", "bits", "correction", "mean_fp", "std_fp", "mean_q", "std_q"])
    df["mean_drift"] = (df.mean_q - df.mean_fp) / df.std_fp
    df["std_ratio"] = df.std_q / df.std_fp
    return df


@torch.no_grad()
def preactivation_shift(model: nn.Module, x: torch.Tensor, bits: list[int],
                        modes=("none", "mean", "meanvar")) -> pd.DataFrame:
    """How the pre-BN activations of every quantized conv move away from full precision.

    For each layer and output channel, the conv output at ``bits`` is compared with the
    output of the same layer at 32 bits **on the same input** (the layer's input recorded at
    32 bits), so only the weight quantization of that layer is measured. Columns: layer,
    channel, bits, correction, shift (``(mean_b - mean_32) / std_32``) and scale
    (``std_b / std_32``).
    """
    model.eval()
    inputs: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in quantized_layers(model).items() if isinstance(m, nn.Conv2d)}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0]))
             for n, m in layers.items()]
    set_bits(model, FULL_PRECISION)
    model(x)
    for h in hooks:
        h.remove()
    rows = []
    for name, layer in layers.items():
        ref = layer._conv_forward(inputs[name], layer.effective_weight(FULL_PRECISION), layer.bias)
        ref_mean, ref_std = ref.mean((0, 2, 3)), ref.std((0, 2, 3)).clamp_min(1e-8)
        for mode in modes:
            with corrected(model, mode):
                for b in bits:
                    out = layer._conv_forward(inputs[name], layer.effective_weight(b), layer.bias)
                    shift = (out.mean((0, 2, 3)) - ref_mean) / ref_std
                    scale = out.std((0, 2, 3)) / ref_std
                    rows += [(name, c, b, mode, shift[c].item(), scale[c].item()) for c in range(len(shift))]
    return pd.DataFrame(rows, columns=["layer", "channel", "bits", "correction", "shift", "scale"])
