"""The distillation losses of the training step (METHOD.md §1 and §5), in one place.

- ``soft_cross_entropy``: a lower bit-width learns from the detached softmax of its teacher
  (recursive: the next-higher bit-width; soft: the highest).
- ``kd_loss``: joint distillation's ``T^2 KL`` between the softened outputs of a bit-width and
  the full-precision companion, each way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from emq.config import register

# train.distill: what each bit-width learns from (the training step, emq.training.loop, applies them):
# recursive: soft_cross_entropy on the next-higher bit-width | hard: the labels only | soft: soft_cross_entropy
# on the highest bit-width | joint: the labels and kd_loss with a full-precision companion
DISTILL = ("recursive", "hard", "soft", "joint")
register("train.distill", DISTILL)


def soft_cross_entropy(logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a soft target (KL up to the teacher's entropy, a constant)."""
    return -(teacher_probs * F.log_softmax(logits, dim=1)).sum(1).mean()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))``, batch mean; the teacher is detached."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher.detach() / t, dim=1),
                            reduction="batchmean", log_target=True)
