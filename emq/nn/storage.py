"""What a trained multi-bit model costs to store.

Every method here keeps float master weights, from which each bit-width is quantized on the
fly, except Double Rounding (METHOD.md §5), which stores the weights of its quantized layers
once as int-h codes and derives every lower precision by a second rounding. Everything else
(BatchNorm parameters and statistics, scales, the full-precision first and last layers) is
counted at 4 bytes a value.
"""
from __future__ import annotations

from torch import nn

from emq.nn.layers import QuantWeightMixin
from emq.quant.schemes import DoubleRoundingQuantizer


def stored_bytes(model: nn.Module) -> dict[str, int]:
    """``{"fp32": bytes with every value in fp32, "stored": bytes as the method stores it}``."""
    low_bits = {}  # id of a weight tensor -> its stored bits per value
    for m in model.modules():
        if isinstance(m, QuantWeightMixin) and isinstance(m._modules.get("weight_quantizer"), DoubleRoundingQuantizer):
            low_bits[id(m.weight)] = m._modules["weight_quantizer"].high
    fp32 = stored = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(("num_batches_tracked", "initialised")):
            continue  # training bookkeeping, not needed to run the model
        fp32 += 4 * t.numel()
        stored += -(-t.numel() * low_bits[id(t)] // 8) if id(t) in low_bits else 4 * t.numel()
    return {"fp32": fp32, "stored": stored}
