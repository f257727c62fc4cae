"""Data-parallel training over N processes, started by ``torchrun`` (or not at all).

The same config trains on 1 or N processes and means the same thing: the global batch is
``train.batch_size``; each of the ``world`` processes takes its contiguous part of every
seeded batch (``shard = (rank, world)``, the role of a DistributedSampler), and gradients
are averaged over the processes after the multi-bit step, so every process takes the same
optimizer step as one process would on the whole batch.

- Process group: from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR/PORT``); NCCL on GPUs (process ``r`` on ``cuda:LOCAL_RANK``), gloo on the CPU.
- Gradients: PyTorch's ``DistributedDataParallel`` (:func:`wrap`). A multi-bit step runs one
  forward and one backward pass per bit-width; each backward pass all-reduces that bit-width's
  gradients, so the accumulated gradient is the average over the processes of the whole
  step's, and :func:`emq.training.loop.train_step` stays a plain function of the (wrapped) model.
  ``find_unused_parameters`` because a pass leaves the switchable BNs of the other bit-widths
  unused. (One all-reduce per bit-width; ``no_sync()`` on all but the last would make it one
  per step, at the price of a step function that knows about DDP.)
- BatchNorm: statistics over the global batch, not per process (:func:`sync_norms`):
  torch's ``SyncBatchNorm`` on GPUs; on the CPU, where torch's SyncBatchNorm refuses CPU tensors,
  :class:`GlobalBatchNorm2d`, which all-reduces the per-channel sums (autograd-aware). So a
  2-process run computes the 1-process run's function, up to the order of float sums.
- Only rank 0 writes to the results store; metrics are all-reduced (accuracy as counts of
  correct images over each process's part of the test split).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from emq.analysis.evaluation import evaluate
from emq.errors import ConfigError


@dataclass(frozen=True)
class Parallel:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world


def from_env() -> Parallel:
    """The Parallel of this process as torchrun describes it (one process if not under torchrun)."""
    try:
        return Parallel(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None


def available_devices(device: str = "auto") -> int:
    """How many processes one node can run: the GPUs for a CUDA device, the CPU cores otherwise."""
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return torch.cuda.device_count() if cuda else (os.cpu_count() or 1)


def check_nproc(nproc: int, device: str = "auto") -> None:
    """A one-line ConfigError unless ``nproc`` processes fit this node's devices."""
    have = available_devices(device)
    kind = "GPUs" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "CPU cores"
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if nproc > have:
        raise ConfigError(f"--nproc {nproc} is more than the {have} {kind} of this machine")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda[:N]``; a one-line ValueError otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda[:N]")
    return dev


def setup(device: str = "auto") -> tuple[Parallel, torch.device]:
    """Join the process group if torchrun started several processes; this process's device."""
    par = from_env()
    if par.world == 1:
        return par, resolve_device(device)
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", par.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=par.rank, world_size=par.world)
    return par, dev


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(par: Parallel) -> None:
    if par.world > 1:
        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of each process's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``t`` over all processes."""
    return _AllReduceSum.apply(t)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all processes.

    Per-channel sums are all-reduced with :func:`all_reduce`, which all-reduces the
    gradients in the backward pass too, so the gradient is that of a
    BatchNorm over the global batch. With one process (or in eval mode) it is BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.double()  # sums over many elements whose gradients nearly cancel: accumulate in float64
        count = xf.numel() // xf.shape[1] * dist.get_world_size()  # every process holds an equal part
        mean = all_reduce(xf.sum((0, 2, 3))) / count
        centred = xf - mean.view(1, -1, 1, 1)
        var = all_reduce(centred.pow(2).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * count / max(1, count - 1)).to(self.running_var.dtype), m)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(torch.promote_types(x.dtype, torch.float32))  # float32 under bf16 autocast, as BN is


def _global_bn(bn: nn.BatchNorm2d) -> GlobalBatchNorm2d:
    new = GlobalBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    return new.to(bn.weight.device if bn.affine else bn.running_mean.device)


def sync_norms(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorms with global-batch statistics: SyncBatchNorm on CUDA, GlobalBatchNorm2d on the CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, _global_bn(child))
            else:
                visit(child)

    visit(model)
    return model


def prepare_model(model: nn.Module, par: Parallel, device: torch.device) -> nn.Module:
    """For several processes: BatchNorm over the global batch (the model's own modules)."""
    if par.world == 1:
        return model
    return sync_norms(model, device)


def wrap(model: nn.Module, par: Parallel, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` for several processes (which also broadcasts rank 0's
    parameters and buffers to every process), ``model`` itself for one. BatchNorm statistics
    are global already (:func:`prepare_model`), so buffers are not broadcast at every step."""
    if par.world == 1:
        return model
    ids = [device.index if device.index is not None else par.local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True,
                                               broadcast_buffers=False)


def any_true(flag: bool, par: Parallel, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (e.g. a SIGTERM seen by one of them)."""
    if par.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t)
    return bool(t.item())


def mean_over(values: dict, par: Parallel, device: torch.device) -> dict:
    """The mean over processes of a dict of floats (e.g. the losses of each bit-width)."""
    if par.world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v / par.world for k, v in zip(values, t.tolist())}


def evaluate_sharded(model: nn.Module, split, bits: int, par: Parallel, device: torch.device) -> float:
    """Top-1 accuracy on the whole ``split``: each process counts its contiguous part."""
    if par.world == 1:
        return evaluate(model, split, bits, device=device)
    n = len(split)
    lo, hi = n * par.rank // par.world, n * (par.rank + 1) // par.world
    part = split.subset(torch.arange(lo, hi))
    correct = round(evaluate(model, part, bits, device=device) * len(part)) if len(part) else 0
    t = torch.tensor([correct], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / n


def torchrun_command(nproc: int, train_args: list[str], launcher: list[str] | None = None) -> list[str]:
    """The torchrun command line that trains ``train_args`` (the arguments of ``python -m emq
    train``) on ``nproc`` processes of this node; ``launcher`` replaces ``torchrun`` (e.g. with
    ``python -m torch.distributed.run`` of this interpreter)."""
    return [*(launcher or ["torchrun"]), "--standalone", f"--nproc_per_node={nproc}", "-m", "emq", "train", *train_args]
