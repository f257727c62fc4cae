"""The registry of training methods: a name maps to the config overrides that define it.

Chapters and the command line loop over names (``method_configs(name, base)``) instead of
branching on them. A method is a dict of dotted config keys, plus, for the methods that
fine-tune (shift-bit), the method whose finished run starts it and the share of the epochs the
fine-tuning takes. The quantizers and schedules the keys select live in :mod:`emq.quant.schemes` and
:mod:`emq.training.recipes`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emq.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Method:
    overrides: dict = field(default_factory=dict)  # dotted config keys
    pretrain: str | None = None  # a registered method whose finished run initialises this one
    epochs_scale: float = 1.0  # share of the base's epochs this method trains (after its pretraining)
    about: str = ""  # one line for tables and the command line


_ANY_PRECISION = {"quant.norm": "switchable", "quant.correction": "none", "quant.fp_act": "relu"}
_SHARED = {"quant.norm": "shared", "quant.fp_act": "clamp"}

METHODS: dict[str, Method] = {
    # A full-precision network alone: the reference accuracy, and the start of shift-bit fine-tuning.
    "full_precision": Method({"train.bits": [32]}, about="one full-precision network (reference)"),
    # Any-Precision baseline (METHOD.md §1): one BatchNorm per trained bit-width.
    "any_precision": Method(_ANY_PRECISION, about="Any-Precision: switchable BN, recursive distillation"),
    "switchable": Method(_ANY_PRECISION, about="the same as any_precision (the name chapter 02 uses)"),
    # Any-Precision as published (SHI-Labs/Any-Precision-DNNs, train_cifar10.sh): its pre-activation network,
    # weights scaled by E = mean|W|, ReLU at 32 bits, recursive distillation (soft cross-entropy from the
    # next-higher bit-width), Adam at 1e-3 without weight decay, lr x0.1 at epochs 100/150/180 of 200 (here
    # fractions of train.epochs, so the schedule scales with the profile), bits 1/2/4/8/32. Depth and width come
    # from the profile: upstream's ResNet-20 x5 is model.depth=20, model.width=5.
    "any_precision_published": Method(
        {**_ANY_PRECISION, "model.preact": True, "model.block": "any_precision", "quant.scale_by_mean": True,
         "train.distill": "recursive", "train.optimizer": "adam", "train.lr": 1e-3, "train.weight_decay": 0.0,
         "train.schedule": "step", "train.milestones": [0.5, 0.75, 0.9], "train.gamma": 0.1,
         "train.bits": [1, 2, 4, 8, 32]},
        about="Any-Precision as published: its network, E scaling, Adam, step decay, bits 1/2/4/8/32"),
    # One BatchNorm shared by all bit-widths, no correction (claim 1 of §2). The shared-BN
    # methods clamp to [0, 1] at 32 bits too, so the one BN sees one activation range.
    "shared": Method({**_SHARED, "quant.correction": "none"}, about="shared BN, no correction"),
    "shared_mean": Method({**_SHARED, "quant.correction": "mean"}, about="shared BN + mean correction"),
    "shared_meanvar": Method({**_SHARED, "quant.correction": "meanvar"}, about="shared BN + mean+var correction"),
    # EMQ (§2): shared BN with weight bias correction of mean and spread.
    "emq": Method({**_SHARED, "quant.correction": "meanvar"}, about="EMQ: shared BN + weight bias correction"),
    # LSQ and QIL (§5): learned step sizes / learned intervals for weights and activations.
    "lsq": Method({**_ANY_PRECISION, "quant.weight_quantizer": "lsq", "quant.act_quantizer": "lsq"},
                  about="LSQ: learned step per bit-width"),
    "qil": Method({**_ANY_PRECISION, "quant.weight_quantizer": "qil", "quant.act_quantizer": "qil"},
                  about="QIL: learned quantization intervals"),
    # Shift-bit (§5): power-of-two weights, fine-tuned from the full-precision run for half the
    # epochs at a tenth of the learning rate (our choice; the paper fine-tunes 15 ImageNet epochs).
    "shift": Method({**_ANY_PRECISION, "quant.weight_quantizer": "shift", "train.lr": 0.01},
                    pretrain="full_precision", epochs_scale=0.5,
                    about="shift-bit: power-of-two weights, fine-tuned from full precision"),
    # Double Rounding + ALRS (§5): one int-8 copy of the weights, lower precisions by a second rounding.
    "double_rounding": Method({**_ANY_PRECISION, "quant.weight_quantizer": "double_rounding", "quant.alrs": True},
                              about="Double Rounding + ALRS: one int-h copy of the weights"),
    # Zhuang et al. (§5), on the Any-Precision network.
    "progressive_weights": Method({**_ANY_PRECISION, "train.progressive": "weights_first"},
                                  about="progressive: weights first, then activations"),
    "progressive_bits": Method({**_ANY_PRECISION, "train.progressive": "bits"},
                               about="progressive: bit-widths added high to low"),
    "stochastic_precision": Method({**_ANY_PRECISION, "train.stochastic_precision": 0.5},
                                   about="stochastic precision: quantized share of blocks 0.5 -> 1"),
    "joint_kd": Method({**_ANY_PRECISION, "train.distill": "joint"},
                       about="joint distillation with a full-precision companion"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: registered methods are {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, base: RunConfig, **overrides) -> RunConfig:
    """``base`` with the overrides of method ``name`` and then ``overrides`` (dotted keys).

    For a method with a pretraining stage this is its last stage; ``method_configs`` gives all.
    """
    return method_configs(name, base, **overrides)[-1]


def method_configs(name: str, base: RunConfig, **overrides) -> list[RunConfig]:
    """The runs that method ``name`` trains, in order: its pretraining method's (if any), then its own."""
    method = get_method(name)
    stages = method_configs(method.pretrain, base, **overrides) if method.pretrain else []
    changes = {**method.overrides, **overrides}
    if method.epochs_scale != 1.0:
        epochs = base.with_overrides(overrides).train.epochs
        changes["train.epochs"] = max(1, round(epochs * method.epochs_scale))
    if stages:
        changes["train.init_from"] = stages[-1].hash()
    return stages + [base.with_overrides(changes)]
