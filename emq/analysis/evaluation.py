"""Evaluation at any bit-width, zero-shot or after BatchNorm re-estimation."""
from __future__ import annotations

import copy

import pandas as pd
import torch
from torch import nn

from emq.data.datasets import TensorSplit
from emq.data.load import load_data
from emq.nn.layers import active_norms, set_bits
from emq.nn.models import load_trained
from emq.quant.quantizers import check_bits


@torch.no_grad()
def evaluate(model: nn.Module, split: TensorSplit, bits: int, batch_size: int = 500,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` at ``bits`` on ``split`` (the model is left in eval mode)."""
    set_bits(model.eval(), check_bits(bits))
    correct = 0
    for x, y, _ in split.batches(batch_size, device=device):
        correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(split)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: TensorSplit, bits: int, num_batches: int, batch_size: int = 128,
                   seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics at ``bits`` are re-estimated.

    The BNs that the forward pass at ``bits`` uses are reset and re-estimated as plain
    averages over ``num_batches`` training batches (no augmentation); weights do not change.
    """
    model = set_bits(copy.deepcopy(model), check_bits(bits)).eval()
    norms = active_norms(model, bits)
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
        bn.train()
    for i, (x, _, _) in enumerate(split.batches(batch_size, shuffle=True, seed=seed, device=device)):
        if i >= num_batches:
            break
        model(x)
    return model.eval()


def evaluate_bits(model: nn.Module, train: TensorSplit, test: TensorSplit, bits: list[int],
                  recalibrate: int = 0, device: str | torch.device = "cpu") -> dict[int, float]:
    """Accuracy per bit-width; with ``recalibrate`` > 0, after re-estimating BN on that many batches."""
    out = {}
    for b in bits:
        m = recalibrate_bn(model, train, b, recalibrate, device=device) if recalibrate else model
        out[b] = evaluate(m, test, b, device=device)
    return out


def evaluate_run(run, bits: list[int], recalibrate: int = 0, data=None, device: str = "cpu",
                 model: nn.Module | None = None) -> dict[int, float]:
    """Accuracy per bit-width of a finished run, cached in the run's ``evals.json``.

    Keys are ``"<bits>/recal<N>"`` (N = 0: zero-shot), so an evaluation is computed once.
    ``data`` and ``model`` may pass what the caller has already loaded.
    """
    for b in bits:
        check_bits(b)
    cached = run.evals()
    todo = [b for b in bits if f"{b}/recal{recalibrate}" not in cached]
    if todo:
        run.check_finished()  # before loading any data
        data = data or load_data(run.config.data)
        model = model or load_trained(run, data, device)
        for b, acc in evaluate_bits(model, data.train, data.test, todo, recalibrate, device).items():
            run.save_eval(f"{b}/recal{recalibrate}", acc)
        cached = run.evals()
    return {b: cached[f"{b}/recal{recalibrate}"] for b in bits}


def accuracy_curves(runs: dict, names: tuple[str, ...] = ("method", "seed")) -> pd.DataFrame:
    """The test accuracy (%) every run logged at the end of its epochs, as a long DataFrame.

    ``runs`` maps a label (a tuple with one value per name in ``names``, or one value for one
    name) to a Run. Columns: the names, epoch, bits, acc. Epochs without a test evaluation
    (``train.eval_every``) are left out."""
    rows = []
    for label, run in runs.items():
        values = label if isinstance(label, tuple) else (label,)
        for row in run.metrics():
            for b, a in row.get("test_acc", {}).items():
                rows.append((*values, row["epoch"], int(b), 100 * a))
    return pd.DataFrame(rows, columns=[*names, "epoch", "bits", "acc"])


def accuracy_frame(runs: dict, bits: list[int], recalibrations: tuple[int, ...] = (0,), data=None,
                   device: str = "cpu") -> pd.DataFrame:
    """Accuracy of every run at every bit-width and recalibration, as a long DataFrame.

    ``runs`` maps a label tuple ``(method, seed)`` to a finished Run. Columns: method, seed,
    run, bits, trained (the bit-width was in the run's training set), recal (batches of BN
    re-estimation, 0 = zero-shot), acc. Evaluations come from (and go to) each run's cache.
    """
    rows = []
    for (method, seed), run in runs.items():
        for recal in recalibrations:
            accs = evaluate_run(run, bits, recal, data=data, device=device)
            rows += [(method, seed, run.hash, b, b in run.config.train.bits, recal, a) for b, a in accs.items()]
    return pd.DataFrame(rows, columns=["method", "seed", "run", "bits", "trained", "recal", "acc"])
