"""GPU speed options: bf16 autocast, channels-last memory format, torch.compile.

Each is a ``train`` config field with ``auto`` (on for CUDA, off on the CPU, so CPU runs keep
their numbers and their hashes), ``off``, or on (``bf16`` / ``on``). :func:`resolve_speed`
turns the config into the :class:`Speed` actually used, which is recorded in the run's
env.json. The quantizers' arithmetic is unchanged: under autocast, matmuls and convolutions
run in bf16, while reductions such as the weight statistics stay in float32.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from emq.config import TrainConfig, register

COMPILE_BACKEND = "inductor"  # torch.compile's default; tests on the CPU may use a lighter one

# The values of train.amp and of train.channels_last and train.compile (resolve_speed reads them)
AMP = ("auto", "off", "bf16")
SWITCH = ("auto", "off", "on")
register("train.amp", AMP)
register("train.channels_last", SWITCH)
register("train.compile", SWITCH)


@dataclass(frozen=True)
class Speed:
    amp: bool = False  # bf16 autocast of the forward passes
    channels_last: bool = False
    compile: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_speed(t: TrainConfig, device: torch.device | str) -> Speed:
    """The options in effect for ``device``: ``auto`` is on for CUDA and off elsewhere."""
    cuda = torch.device(device).type == "cuda"

    def on(value: str) -> bool:
        return cuda if value == "auto" else value in ("bf16", "on")

    return Speed(on(t.amp), on(t.channels_last), on(t.compile))


def autocast(speed: Speed, device: torch.device | str):
    """bf16 autocast on the device's type if ``speed.amp``, else a context that does nothing."""
    if not speed.amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def prepare_model(model: nn.Module, speed: Speed) -> nn.Module:
    """The callable that the training step uses: channels-last and/or compiled ``model``.

    ``model`` itself (its parameters, its state_dict) stays the one that is saved and evaluated;
    the compiled wrapper shares its parameters. Switching the bit-width changes an attribute
    that torch.compile guards on, so each trained bit-width gets its own graph.
    """
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if speed.compile:
        return torch.compile(model, backend=COMPILE_BACKEND)
    return model


def prepare_input(x: torch.Tensor, speed: Speed) -> torch.Tensor:
    if speed.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
