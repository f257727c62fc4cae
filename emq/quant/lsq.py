"""LSQ, learned step size quantization (Esser et al., ICLR 2020), the reference learned quantizer.

``v = round(clamp(x / s, -Q_N, Q_P)) * s`` with the step ``s`` learned; its gradient is scaled
by ``g = 1 / sqrt(N Q_P)`` (N: number of elements) and it starts at ``2 mean|x| / sqrt(Q_P)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from emq.quant.quantizers import FULL_PRECISION, check_bits
from emq.quant.ste import round_ste, scale_grad


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: signed ``(2^(b-1), 2^(b-1) - 1)``, unsigned ``(0, 2^b - 1)``."""
    check_bits(bits)
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """``round(clamp(x / s, -Q_N, Q_P)) * s`` with the LSQ gradient scale on ``s``."""
    q_n, q_p = lsq_range(bits, signed)
    s = scale_grad(step, 1.0 / math.sqrt(x.numel() * max(q_p, 1)))
    return round_ste(torch.clamp(x / s, -q_n, q_p)) * s


def lsq_init_step(x: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """The initial step ``2 mean|x| / sqrt(Q_P)``."""
    _, q_p = lsq_range(bits, signed)
    return 2 * x.detach().abs().mean() / math.sqrt(max(q_p, 1))


class LSQQuantizer(nn.Module):
    """One learned step per bit-width, initialised from the first tensor it sees at that bit-width."""

    def __init__(self, bits: tuple[int, ...], signed: bool):
        super().__init__()
        self.signed = signed
        self.steps = nn.ParameterDict({str(b): nn.Parameter(torch.zeros(())) for b in bits if b != FULL_PRECISION})
        self.register_buffer("initialised", torch.zeros(len(self.steps), dtype=torch.bool))

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FULL_PRECISION:
            return x
        if str(bits) not in self.steps:
            raise ValueError(f"LSQ has no step for {bits}-bit: it learns one per trained bit-width "
                             f"({', '.join(self.steps)})")
        i = list(self.steps).index(str(bits))
        step = self.steps[str(bits)]
        if not self.initialised[i]:
            with torch.no_grad():
                step.copy_(lsq_init_step(x, bits, self.signed))
            self.initialised[i] = True
        return lsq_quantize(x, step, bits, self.signed)
