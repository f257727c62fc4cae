"""Data-parallel training: 2 CPU processes with gloo against 1 process with the same global batch.

BatchNorm statistics are taken over the global batch (GlobalBatchNorm2d on the CPU), so the
2-process run computes the same function as the 1-process run; what differs is the order of
float sums (per-process partial sums, then an all-reduce). The tests check, in order:
BatchNorm over 2 processes equals BatchNorm over the whole batch (float64, to 1e-12); one
multi-bit step's gradients agree to float32 precision; and a whole run through the real
command line (torchrun, gloo) ends with the 1-process run's weights up to the drift that
those rounding differences grow into over 8 SGD steps at learning rate 0.1 (the quantizers'
rounding turns a tiny difference into a flipped level now and then).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, needs_data
from torch import nn

from emq.cli import main
from emq.config import ConfigError, load_config
from emq.data.load import load_data
from emq.nn.models import build_model
from emq.results import ResultsStore
from emq.training.distributed import GlobalBatchNorm2d, Parallel, prepare_model, wrap
from emq.training.loop import shared_batch, train, train_step

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT / "data"


def _spawn(fn, tmp: Path, *args) -> None:
    """Run ``fn(rank, tmp, *args)`` on 2 gloo processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    mp.spawn(fn, args=(tmp, *args), nprocs=2, join=True)


def _bn_worker(rank: int, tmp: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, w = torch.load(tmp / "bn_in.pt")
    bn = GlobalBatchNorm2d(3).double().train()
    part = x[rank * 4:(rank + 1) * 4].clone().requires_grad_()
    (bn(part) * w[rank * 4:(rank + 1) * 4]).sum().backward()
    for p in bn.parameters():  # averaged over the processes, as DistributedDataParallel does
        dist.all_reduce(p.grad)
        p.grad /= 2
    stats = {"mean": bn.running_mean.clone(), "var": bn.running_var.clone()}
    torch.save({"out": bn(part).detach(), "dx": part.grad, "dw": bn.weight.grad * 2, "db": bn.bias.grad * 2,
                **stats}, tmp / f"bn_out{rank}.pt")
    dist.destroy_process_group()


def test_global_batch_norm_over_two_processes_is_batch_norm_over_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64) * 3 + 1, torch.randn(8, 3, 5, 5, generator=g,
                                                                                         dtype=torch.float64)
    torch.save((x, w), tmp_path / "bn_in.pt")
    _spawn(_bn_worker, tmp_path)
    ref = nn.BatchNorm2d(3).double().train()
    xr = x.clone().requires_grad_()
    (ref(xr) * w).sum().backward()
    outs = [torch.load(tmp_path / f"bn_out{r}.pt") for r in range(2)]
    assert torch.allclose(torch.cat([o["dx"] for o in outs]), xr.grad, atol=1e-12)
    for o in outs:  # parameter gradients: averaged over processes, times 2 = summed = the whole batch's
        assert torch.allclose(o["dw"], ref.weight.grad, atol=1e-12) and torch.allclose(o["db"], ref.bias.grad)
        assert torch.allclose(o["mean"], ref.running_mean) and torch.allclose(o["var"], ref.running_var)
    assert torch.allclose(torch.cat([o["out"] for o in outs]), ref(x).detach(), atol=1e-12)


def _step_worker(rank: int, tmp: Path, bits: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = load_config(profile="smoke", overrides=TINY)
    data = load_data(cfg.data)
    model = prepare_model(build_model(cfg, data).to(dtype), Parallel(rank, 2), torch.device("cpu")).train()
    x, y, _ = next(data.train.batches(64, shuffle=True, seed=0, shard=(rank, 2)))
    train_step(wrap(model, Parallel(rank, 2), torch.device("cpu")), shared_batch(x.to(dtype), y, bits))
    torch.save({n: p.grad for n, p in model.named_parameters()}, tmp / f"grads{rank}.pt")
    dist.destroy_process_group()


def _grad_gap(tmp_path: Path, bits: tuple[int, ...], dtype: torch.dtype = torch.float32) -> float:
    """Largest relative difference (per parameter, in norm) between one step's gradients on 2
    processes and on 1; also checks that both processes hold the same averaged gradient."""
    _spawn(_step_worker, tmp_path, bits, dtype)
    cfg = load_config(profile="smoke", overrides=TINY)
    data = load_data(cfg.data)
    model = build_model(cfg, data).to(dtype).train()
    x, y, _ = next(data.train.batches(64, shuffle=True, seed=0))
    train_step(model, shared_batch(x.to(dtype), y, bits))
    g0, g1 = (torch.load(tmp_path / f"grads{r}.pt") for r in range(2))
    gaps = []
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        assert torch.equal(g0[n], g1[n]), n  # every process steps with the same gradient
        gaps.append(((g0[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)).item())
    return max(gaps)


@needs_data
def test_one_full_precision_step_on_two_processes_has_the_one_process_gradients(tmp_path):
    """Two processes sum the batch in another order than one. In float32 that order, and the
    kernels each CPU's instruction set selects, moved a gradient by up to 3.2e-3 of its norm on
    one machine, so the step is compared in float64. There the conv and fc gradients agree to
    about 1e-13 of their norms and the BatchNorm scale and shift gradients to 6e-8 (measured:
    PyTorch's own BatchNorm kernel and the global one sum the batch differently). The bound of
    1e-6 leaves a margin of 16 for other CPUs' float64 kernels; a real fault, such as a missed
    gradient all-reduce or a BatchNorm over half the batch, moves gradients by percents."""
    assert _grad_gap(tmp_path, (32,), torch.float64) < 1e-6


@needs_data
def test_one_multibit_step_on_two_processes_has_the_one_process_gradients(tmp_path):
    # below 32 bits an activation within float rounding of a quantization threshold can land on
    # the other level; the gradient moves by a little more than float precision, and no more
    assert _grad_gap(tmp_path, (2, 4, 8, 32)) < 2e-2


@needs_data
def test_two_gloo_processes_under_torchrun_match_one_process(tmp_path):
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "emq", "train", "--profile", "smoke", *sets, "--results", str(tmp_path / "two"),
           "--device", "cpu", "--no-progress", "--nproc", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = load_config(profile="smoke", overrides=TINY)
    two = ResultsStore(tmp_path / "two").run(cfg)  # the same config: the same run hash on 1 or 2 processes
    one = train(cfg, ResultsStore(tmp_path / "one"), device="cpu", progress=False)
    assert out.stdout.count("run ") == 1 and two.hash in out.stdout  # only rank 0 reports
    assert two.env["processes"] == 2 and one.env["processes"] == 1
    w1, w2 = (torch.load(r.path / "model.pt", weights_only=True) for r in (one, two))
    for k in w1:
        if w1[k].is_floating_point() and "running" not in k:
            assert (w1[k] - w2[k]).abs().max() < 2e-2, k  # drift of rounding differences, see the docstring
    m1, m2 = one.metrics(), two.metrics()
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for r1, r2 in zip(m1, m2):
        for b in r1["loss"]:
            assert abs(r1["loss"][b] - r2["loss"][b]) < 5e-3
            assert abs(r1["test_acc"][b] - r2["test_acc"][b]) <= 4 / 128  # a few of 128 test images


@needs_data
def test_resume_from_a_checkpoint_of_another_world_size_is_one_line(tmp_path):
    cfg = load_config(profile="smoke", overrides=TINY)
    store = ResultsStore(tmp_path)
    run = train(cfg, store, device="cpu", progress=False, stop_after=2)
    ckpt = torch.load(run.path / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "world_size": 2}, run.path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="written by 2 process") as err:
        train(cfg, store, device="cpu", progress=False)
    assert "\n" not in str(err.value) and (run.path / "checkpoint.pt").is_file()  # nothing lost


def test_nproc_above_the_devices_is_one_line(capsys):
    assert main(["train", "--device", "cpu", "--nproc", str((os.cpu_count() or 1) + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --nproc") and "CPU cores" in err and "\n" not in err


def test_print_torchrun_names_the_same_training_arguments(capsys):
    assert main(["train", "configs/emq_shared_bn.yaml", "--profile", "cpu", "--set", "train.epochs=2",
                 "--device", "cpu", "--nproc", "2", "--print-torchrun"]) == 0
    assert capsys.readouterr().out.strip() == ("torchrun --standalone --nproc_per_node=2 -m emq train "
                                               "configs/emq_shared_bn.yaml --set train.epochs=2 --profile cpu "
                                               "--results results --device cpu")


def test_batch_must_split_over_the_processes(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        train(load_config(profile="smoke", overrides=TINY), ResultsStore(tmp_path), device="cpu")
    assert not (tmp_path / "runs").exists()


@needs_data
def test_a_preempted_two_process_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGTERM to torchrun (as a scheduler preempting a node does): every process stops after the
    same step, rank 0 saves the checkpoint, and the same command resumes it to the weights of an
    uninterrupted 2-process run, bit for bit."""
    import signal
    import time

    sets = [a for k, v in {**TINY, "train.epochs": 3, "train.batch_size": 16}.items() for a in ("--set", f"{k}={v}")]
    base = [sys.executable, "-m", "emq", "train", "--profile", "smoke", *sets, "--device", "cpu", "--no-progress",
            "--nproc", "2"]  # 16 steps per epoch, 48 steps
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run([*base, "--results", str(tmp_path / "a")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    store = tmp_path / "b"
    proc = subprocess.Popen([*base, "--results", str(store)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(store.glob("runs/*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    (run_dir,) = store.glob("runs/*")
    assert not (run_dir / "summary.json").exists()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and 16 <= ckpt["step"] < 48
    resumed = subprocess.run([*base, "--results", str(store)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "a" / "runs" / run_dir.name / "model.pt", weights_only=True)
    b = torch.load(run_dir / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
