"""Full-scale runs (chapter 05): the ImageNet config of each profile, the torchrun command
that trains it, and estimates of time and memory per GPU.

At the ``gpu`` profile the data is ImageNet under ``data_root`` (meta.bin, train/, val/),
streamed at 224 px. At ``cpu`` and ``smoke`` the same code path runs on an ImageNet-layout
folder built from real Fashion-MNIST images (:func:`make_imagenet_folder`)
under ``<data_root>/imagenet_fashion_<profile>``. The estimates are labelled as such: the memory is
counted from the tensors that autograd saves (on the CPU, at the real shapes); the time is a
bound from counted multiply-accumulates and from JPEG decoding, each with a stated assumption.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from emq.config import RunConfig, load_config
from emq.data.datasets import load_fashion_mnist
from emq.methods import method_config
from emq.nn.layers import set_bits
from emq.nn.models import make_model
from emq.profiles import FULL_SCALE
from emq.results import write_atomic
from emq.training.distributed import torchrun_command

METHOD = "shared_meanvar"  # EMQ's shared BN with mean+var correction (METHOD.md §2)
ARCH = "resnet18"
PROFILES = FULL_SCALE  # chapter 05's setting of each profile (emq.profiles)


def make_imagenet_folder(out: str | Path, fashion_root: str | Path, per_class_train: int = 100,
                         per_class_val: int = 50, size: int = 64) -> Path:
    """Write an ImageNet-layout folder of real Fashion-MNIST images under ``out``.

    Each of the 10 classes becomes a wnid folder (``n0000000k``) holding the first
    ``per_class_train`` training and ``per_class_val`` test images of that class, upscaled
    from 28 to ``size`` pixels and saved as RGB JPEGs; ``meta.bin`` is what
    ``torchvision.datasets.ImageNet`` reads. Existing complete folders are kept.
    """
    from PIL import Image

    out = Path(out)
    done = out / ".complete"
    if done.is_file() and done.read_text().strip() == f"{per_class_train} {per_class_val} {size}":
        return out
    for stale in ("train", "val"):  # a folder of other sizes (or a partial build): start afresh
        shutil.rmtree(out / stale, ignore_errors=True)
    done.unlink(missing_ok=True)
    ds = load_fashion_mnist(fashion_root)
    wnids = [f"n{k:08d}" for k in range(ds.num_classes)]
    val_wnids = []
    for split, folder, per in ((ds.train, "train", per_class_train), (ds.test, "val", per_class_val)):
        for k, wnid in enumerate(wnids):
            (out / folder / wnid).mkdir(parents=True, exist_ok=True)
            for j, i in enumerate((split.y == k).nonzero().flatten()[:per].tolist()):
                img = Image.fromarray(split.x[i, 0].numpy()).convert("RGB").resize((size, size), Image.BILINEAR)
                stem = f"{wnid}_{j}" if folder == "train" else f"ILSVRC2012_val_{k * per + j:08d}"
                img.save(out / folder / wnid / f"{stem}.JPEG", "JPEG", quality=90)
                if folder == "val":
                    val_wnids.append(wnid)
    torch.save(({w: (c,) for w, c in zip(wnids, ds.classes)}, val_wnids), out / "meta.bin")
    write_atomic(done, f"{per_class_train} {per_class_val} {size}\n")
    return out


def data_folder(profile: str, data_root: str | Path, repo: str | Path = ".") -> Path:
    """The ImageNet-layout folder of ``profile``: ImageNet itself at gpu, else a Fashion-MNIST one
    (built once under ``repo/data_root``). A relative ``data_root`` stays relative to ``repo``, so a
    run's config (and hash) does not depend on where the repository is checked out."""
    p = PROFILES[profile]
    if p.folder is None:
        return Path(data_root)
    train, val, side = p.folder
    name = f"imagenet_fashion_{profile}"
    make_imagenet_folder(Path(repo) / data_root / name, Path(repo) / data_root, train, val, side)
    return Path(data_root) / name


def full_scale_config(profile: str, folder: str | Path, seed: int = 0) -> RunConfig:
    """The run of chapter 05 at ``profile``: multi-bit ResNet-18 on an ImageNet-layout folder."""
    p = PROFILES[profile]
    base = load_config(overrides={
        "data.name": "imagenet", "data.root": str(folder), "data.image_size": p.image_size,
        "data.augment": p.augment, "model.arch": ARCH, "train.epochs": p.epochs, "train.batch_size": p.batch_size,
        "train.weight_decay": p.weight_decay, "train.seed": seed})
    return method_config(METHOD, base)


def train_args(cfg: RunConfig, results: str | Path, device: str = "auto") -> list[str]:
    """``python -m emq train`` arguments that give ``cfg`` (every non-default field as --set)."""
    out = []
    for section, fields in cfg.non_default().items():
        for name, value in fields.items():
            out += ["--set", f"{section}.{name}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]
    return out + ["--results", str(results), "--device", device, "--no-progress"]


def torchrun_line(cfg: RunConfig, nproc: int, results: str | Path, device: str = "auto",
                  width: int | None = None) -> str:
    """The torchrun command, as a user types it, that trains ``cfg`` on ``nproc`` processes: one
    line, or with ``width`` lines of at most that many characters (:func:`wrap_command`)."""
    args = torchrun_command(nproc, train_args(cfg, results, device))
    return shlex.join(args) if width is None else wrap_command(args, width)


def wrap_command(args: list[str], width: int = 76, indent: str = "    ") -> str:
    """``args`` as a shell command over lines of at most ``width`` characters, each but the last
    continued with `` \\``; an option and its value (``--set key=value``) stay on one line, and
    an argument longer than a line keeps a line of its own. Pasted into a shell, it is the command
    ``shlex.join(args)``."""
    words = [shlex.quote(a) for a in args]
    tokens, i = [], 0
    while i < len(words):
        pair = (words[i].startswith("--") and "=" not in words[i] and i + 1 < len(words)
                and not words[i + 1].startswith("-"))
        tokens.append(f"{words[i]} {words[i + 1]}" if pair else words[i])
        i += 2 if pair else 1
    lines = [tokens[0]]
    for token in tokens[1:]:
        room = width - len(" \\") - (len(indent) if len(lines) > 1 else 0)
        if len(lines[-1]) + 1 + len(token) <= room:
            lines[-1] += " " + token
        else:
            lines.append(token)
    return (" \\\n" + indent).join(lines)


def run_distributed(cfg: RunConfig, nproc: int, results: str | Path, device: str = "auto", cwd=None) -> None:
    """Train ``cfg`` on ``nproc`` processes with torchrun (this interpreter's) from folder ``cwd``
    (where a relative data root is found), raising on failure."""
    cmd = torchrun_command(nproc, train_args(cfg, results, device), [sys.executable, "-m", "torch.distributed.run"])
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"torchrun failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}")


# ---- estimates -----------------------------------------------------------------------------
def count_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of the conv and linear layers in one forward pass of ``x``."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            total += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, torch.nn.Linear):
            total += out.numel() * mod.in_features

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def saved_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of one forward."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else torch.autocast(x.device.type, enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    del loss
    return sum(storages.values())


def memory_per_gpu(cfg: RunConfig, num_classes: int, per_gpu_batch: int, amp: bool, probe_batch: int = 2) -> dict:
    """Estimated training memory per GPU (bytes): weights, gradients and momentum (fp32), plus the
    activations one bit-width's forward saves (the multi-bit step frees each bit-width's graph
    before the next), counted at ``probe_batch`` on the CPU and scaled to ``per_gpu_batch``.
    Excludes allocator slack, cuDNN workspaces and communication buffers."""
    model = make_model(cfg.model, cfg.quant, cfg.train.bits, num_classes, 3, cfg.data.image_size).train()
    x = torch.randn(probe_batch, 3, cfg.data.image_size, cfg.data.image_size)
    y = torch.zeros(probe_batch, dtype=torch.long)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    act = max(saved_bytes(set_bits(model, b), x, y, amp) for b in cfg.train.bits)
    return {"states": 3 * params, "activations": act * per_gpu_batch // probe_batch,
            "total": 3 * params + act * per_gpu_batch // probe_batch}


def epoch_time_bounds(macs_per_image: int, bits: int, images: int, nproc: int, sustained_flops: float,
                      decode_per_worker: float, workers_per_gpu: int) -> dict:
    """Seconds per epoch as the larger of a compute bound and an input bound.

    compute: 2 FLOPs per MAC, forward + backward ~ 3 forwards, once per bit-width, at
    ``sustained_flops`` per GPU; input: images decoded and augmented at ``decode_per_worker``
    images/s per DataLoader worker. Both rates are assumptions of the caller.
    """
    flops = 2 * macs_per_image * 3 * bits * images
    compute = flops / (sustained_flops * nproc)
    decode = images / (decode_per_worker * workers_per_gpu * nproc)
    return {"compute_s": compute, "decode_s": decode, "epoch_s": max(compute, decode)}
