"""The registry of training methods: a name maps to the config overrides that define it.

Chapters and the command line loop over names (``method_config(name, base)``) instead of
branching on them. Each entry is a dict of dotted config keys.
"""
from __future__ import annotations

from .config import ConfigError, RunConfig

METHODS: dict[str, dict] = {
    # Any-Precision baseline (METHOD.md §1): one BatchNorm per trained bit-width.
    "switchable": {"quant.norm": "switchable", "quant.correction": "none", "quant.fp_act": "relu"},
    # One BatchNorm shared by all bit-widths, no correction (claim 1 of §2). The shared-BN
    # methods clamp to [0, 1] at 32 bits too, so the one BN sees one activation range.
    "shared": {"quant.norm": "shared", "quant.correction": "none", "quant.fp_act": "clamp"},
    # Shared BN with weight bias correction of the per-channel mean (§2, mean mode).
    "shared_mean": {"quant.norm": "shared", "quant.correction": "mean", "quant.fp_act": "clamp"},
    # Shared BN with correction of mean and spread (§2, mean+var mode).
    "shared_meanvar": {"quant.norm": "shared", "quant.correction": "meanvar", "quant.fp_act": "clamp"},
    # LSQ (METHOD.md §5): learned step sizes for weights and activations, one per bit-width.
    "lsq": {"quant.norm": "switchable", "quant.weight_quantizer": "lsq", "quant.act_quantizer": "lsq"},
    # QIL (METHOD.md §5): learned quantization intervals for weights and activations.
    "qil": {"quant.norm": "switchable", "quant.weight_quantizer": "qil", "quant.act_quantizer": "qil"},
}


def method_config(name: str, base: RunConfig, **overrides) -> RunConfig:
    """``base`` with the overrides of method ``name`` and then ``overrides`` (dotted keys)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: registered methods are {', '.join(METHODS)}")
    return base.with_overrides({**METHODS[name], **overrides})
