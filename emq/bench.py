"""``python -m emq.bench``: speed figures measured side by side in one run.

1. One multi-bit training step (forward + backward at every trained bit-width, one SGD step)
   against one full-precision step of the same model on the same batch, interleaved so both
   see the same machine state; the quantization overhead is
   ``multi-bit time / (number of bit-widths x full-precision time)``.
2. The whole book at the ``cpu`` profile (every chapter with papermill into a fresh,
   temporary results store, so nothing is read back), unless ``--no-book``.
3. With ``--coreset``: the training-cost ratio of EMQ (shared BN + mean+var correction +
   bit-wise coreset at p = 0.6) against the same model on the full data, trained side by
   side into a temporary store, and the scoring overhead of the lightweight-dynamic mode.
4. With ``--throughput``: images/s of a multi-bit training step (all trained bit-widths) of
   ResNet-20 at CIFAR shape and ResNet-18 at ImageNet shape, eager and compiled, fp32 and
   bf16, each beside a full-precision step of the same model; the quantization overhead and
   the time of one 50k-image epoch. Full size (batch 256, 224 px) on a GPU; a small size on
   the CPU (``--size``). Synthetic inputs: this measures the step, not the data pipeline.
5. With ``--speed-options``: one multi-bit step of the profile's model on a real batch, eager
   against channels-last, ``torch.compile`` and both, the variants' steps interleaved.
6. With ``--runner``: runs per hour of the grid runner, N one-thread processes against one
   N-thread process.
7. With ``--budget``: the time the runner takes to train every chapter's grid from an empty
   store with 2 workers, computed from the wall times the committed runs recorded (each run
   counted once, however many chapters read it), and at the pace of each run's faster epochs
   (the quarter quantile of their durations), since many runs were trained beside more
   workers than cores; for each chapter with an extended tier, and for the book, also its core
   (the runs `make runs` trains). With ``--activation`` as well, the paced times sped up by the
   fused activation quantizer's step ratio measured in the same call (the committed runs were
   timed before it). With ``--budget-check N``: N committed runs retrained now beside each
   other, their times against both estimates.
8. With ``--activation``: one multi-bit step with the fused activation quantizer the package runs
   against the same step with its autograd reference, interleaved on one batch.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from emq.book.chapter import repo_root
from emq.book.grids import (
    CHAPTER_GRIDS,
    grid_configs,
    grid_of,
    grid_stages,
    paced_seconds,
    recorded_seconds,
    runner_seconds,
    train_all,
)
from emq.config import ModelConfig, QuantConfig, RunConfig, load_config
from emq.data.load import load_data
from emq.methods import method_config
from emq.nn import layers
from emq.nn.models import build_model, make_model
from emq.quant import schemes
from emq.quant.quantizers import activation_reference
from emq.results import ResultsStore
from emq.training.coresets import cost_ratio, total_passes, training_time
from emq.training.distributed import resolve_device
from emq.training.loop import shared_batch, train, train_step
from emq.training.speed import Speed, autocast, prepare_input, prepare_model


def timed_step(model, opt, batch: dict, dev: torch.device, distill: str = "recursive",
               speed: Speed | None = None) -> float:
    """Seconds of one optimizer step (:func:`train_step` on ``batch``, under ``speed``'s autocast),
    synchronized on CUDA so that the time is the step's and not its launch."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast(speed or Speed(), dev):
        train_step(model, batch, distill)
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _first_batch(profile: str, method: str, device: str):
    """The method's config at the profile, the device, the data and one shuffled training batch."""
    cfg = method_config(method, load_config(profile=profile, overrides={"data.root": str(repo_root() / "data")}))
    dev = resolve_device(device)
    data = load_data(cfg.data)
    x, y, _ = next(data.train.batches(cfg.train.batch_size, shuffle=True, device=dev))
    return cfg, dev, data, x, y


def step_times(profile: str, method: str, repeats: int, device: str) -> dict:
    """Median seconds of a multi-bit and a full-precision step of the profile's model."""
    cfg, dev, data, x, y = _first_batch(profile, method, device)
    model = build_model(cfg, data, dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    bits = cfg.train.bits

    def one(b):
        return timed_step(model, opt, shared_batch(x, y, b), dev, cfg.train.distill)

    for _ in range(3):  # warm-up
        one(bits), one((32,))
    multi, fp = [], []
    for _ in range(repeats):
        multi.append(one(bits))
        fp.append(one((32,)))
    m, f = statistics.median(multi), statistics.median(fp)
    return {"config": cfg, "bits": bits, "multi_s": m, "fp_s": f, "device": str(dev)}


def book_time(profile: str) -> float:
    """Seconds to execute every chapter with papermill into a fresh temporary results store."""
    root = repo_root()
    chapters = sorted((root / "book").glob("[0-9][0-9]_*.ipynb"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for nb in chapters:
            subprocess.run([sys.executable, "-m", "papermill", "--cwd", str(root / "book"), "-p", "profile", profile,
                            "-p", "results_dir", str(Path(tmp) / "results"), str(nb), str(Path(tmp) / nb.name)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            print(f"  {nb.name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
        return time.perf_counter() - t0


# The small size of the coreset comparison: the cpu profile's model on 2048 images, 4 epochs
# of which the first is the full-data warm-up.
CORESET_SIZE = {"data.train_size": 2048, "data.test_size": 2000, "train.epochs": 4, "coreset.warmup_epochs": 1}


def coreset_cost(profile: str, prune: float, device: str) -> None:
    """Train the full-data baseline, EMQ with static EL2N coresets and with lightweight-dynamic
    ones, and print accuracy differences, wall time, sample-passes and the cost ratios."""
    base = method_config("shared_meanvar", load_config(profile=profile, overrides={
        "data.root": str(repo_root() / "data"), **CORESET_SIZE}))
    runs = {"full data": base, f"EMQ p={prune} static EL2N": base.with_overrides({"coreset.prune": prune}),
            f"EMQ p={prune} lightweight EL2N": base.with_overrides({"coreset.prune": prune,
                                                                    "coreset.mode": "lightweight"})}
    data = load_data(base.data)
    print(f"coreset cost: {base.model.arch}-{base.model.depth} width x{base.model.width}, {len(data.train)} images, "
          f"{base.train.epochs} epochs (warm-up {base.coreset.warmup_epochs}), bits {list(base.train.bits)}")
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(tmp)
        summaries = {name: train(cfg, store, device=device, progress=False, data=data).summary
                     for name, cfg in runs.items()}
    full = summaries["full data"]
    for name, s in summaries.items():
        accs = "  ".join(f"{b}-bit {100 * s['acc'][b]:.2f}%" for b in sorted(s["acc"], key=int))
        print(f"  {name:32s} train {training_time(s):6.1f} s (+{s['eval_time_s']:.1f} s eval), "
              f"{total_passes(s):>9,d} sample-passes; {accs}")
        if s is full:
            continue
        r = cost_ratio(full, s)
        diffs = "  ".join(f"{b}-bit {100 * (s['acc'][b] - full['acc'][b]):+.2f}" for b in sorted(s["acc"], key=int))
        print(f"  {'':32s} cost ratio {r['passes']:.2f}x in sample-passes, {r['wall_time']:.2f}x in training time; "
              f"accuracy vs full data (pp): {diffs}")
        print(f"  {'':32s} scoring {s['scoring_passes']:,d} passes, {s['scoring_time_s']:.2f} s = "
              f"{100 * s['scoring_time_s'] / training_time(s):.2f}% of training time")


# name -> (arch, image side, batch, classes) at each size of the throughput section
THROUGHPUT_MODELS = {
    "full": {"resnet20": ("resnet", 32, 256, 10), "resnet18": ("resnet18", 224, 256, 1000)},
    "small": {"resnet20": ("resnet", 32, 32, 10), "resnet18": ("resnet18", 64, 16, 1000)},
}
EPOCH_IMAGES = 50_000  # a CIFAR-size epoch


def throughput_times(arch: str, side: int, batch: int, classes: int, bits: tuple[int, ...], speed, device: str,
                     repeats: int) -> dict:
    """Median seconds of a multi-bit step and of a full-precision step, under ``speed``."""
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = make_model(ModelConfig(arch=arch), QuantConfig(), bits, classes, 3, side).to(dev).train()
    step_model = prepare_model(model, speed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = prepare_input(torch.randn(batch, 3, side, side, device=dev), speed)
    y = torch.randint(0, classes, (batch,), device=dev)

    def one(b):
        return timed_step(step_model, opt, shared_batch(x, y, b), dev, speed=speed)

    for _ in range(3):  # warm-up (and, compiled, one graph per bit-width)
        one(bits), one((32,))
    multi, fp = [], []
    for _ in range(repeats):
        multi.append(one(bits))
        fp.append(one((32,)))
    return {"multi_s": statistics.median(multi), "fp_s": statistics.median(fp)}


def throughput(size: str, device: str, repeats: int, compile_: bool, bits=(2, 4, 8, 32)) -> list[dict]:
    """One row per model and variant (compile x bf16): step times, images/s, overhead, epoch time."""
    dev = resolve_device(device)
    rows = []
    for name, (arch, side, batch, classes) in THROUGHPUT_MODELS[size].items():
        for comp in ((False, True) if compile_ else (False,)):
            for amp in (False, True):
                speed = Speed(amp=amp, channels_last=dev.type == "cuda", compile=comp)
                if comp:
                    torch._dynamo.reset()
                t = throughput_times(arch, side, batch, classes, bits, speed, device, repeats)
                rows.append({"model": name, "side": side, "batch": batch, "compile": comp, "bf16": amp, **t,
                             "images_per_s": batch / t["multi_s"], "fp_images_per_s": batch / t["fp_s"],
                             "overhead": t["multi_s"] / (len(bits) * t["fp_s"]),
                             "epoch_s": EPOCH_IMAGES / batch * t["multi_s"]})
    return rows


def print_throughput(rows: list[dict], device: str, bits=(2, 4, 8, 32)) -> None:
    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"throughput on {name}; multi-bit = one step over bits {list(bits)}, fp = one step at 32 bits; "
          f"overhead = multi / ({len(bits)} x fp); epoch = {EPOCH_IMAGES} images at the multi-bit step")
    print(f"  {'model':9} {'side':>4} {'batch':>5} {'compile':>7} {'bf16':>5} {'fp ms':>8} {'multi ms':>9} "
          f"{'img/s':>8} {'fp img/s':>9} {'overhead':>8} {'epoch s':>8}")
    for r in rows:
        print(f"  {r['model']:9} {r['side']:>4} {r['batch']:>5} {str(r['compile']):>7} {str(r['bf16']):>5} "
              f"{1000 * r['fp_s']:8.1f} {1000 * r['multi_s']:9.1f} {r['images_per_s']:8.0f} "
              f"{r['fp_images_per_s']:9.0f} {r['overhead']:8.2f} {r['epoch_s']:8.1f}")


SPEED_OPTIONS = {"eager": Speed(), "channels-last": Speed(channels_last=True), "compiled": Speed(compile=True),
                 "compiled + channels-last": Speed(channels_last=True, compile=True)}


def speed_option_times(profile: str, method: str, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of one multi-bit step of the profile's model under each of :data:`SPEED_OPTIONS`
    (fp32: bf16's 8-bit significand is as coarse as an 8-bit grid), on one batch; each repeat steps
    every variant once, in turn, so that all see the same machine state. The compiled variants'
    first steps (one graph per bit-width) are warm-up and are not timed."""
    cfg, dev, data, x0, y = _first_batch(profile, method, device)
    torch._dynamo.reset()
    steps = {}
    for name, speed in SPEED_OPTIONS.items():
        torch.manual_seed(0)
        model = build_model(cfg, data, dev).train()
        step_model = prepare_model(model, speed)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batch = shared_batch(prepare_input(x0, speed), y, cfg.train.bits)
        steps[name] = lambda m=step_model, o=opt, b=batch: timed_step(m, o, b, dev, cfg.train.distill)
    for one in steps.values():
        for _ in range(3):
            one()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, one in steps.items():
            times[name].append(one())
    return {name: statistics.median(t) for name, t in times.items()}


# the modules whose layers call quantize_activation: the reference is patched in there
ACTIVATION_CALLERS = (layers, schemes)


def activation_times(profile: str, method: str, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of one multi-bit step of the profile's model with the activation quantizer the
    package runs (:class:`emq.quant.quantizers.ClampQuantize`) and with its autograd reference
    (:func:`emq.quant.quantizers.activation_reference`, patched in where the layers call it), on one
    batch, the two steps interleaved. Both give the same values and gradients bit for bit."""
    cfg, dev, data, x, y = _first_batch(profile, method, device)
    model = build_model(cfg, data, dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = shared_batch(x, y, cfg.train.bits)

    def fused():
        return timed_step(model, opt, batch, dev, cfg.train.distill)

    def reference():
        with contextlib.ExitStack() as stack:
            for module in ACTIVATION_CALLERS:
                stack.enter_context(mock.patch.object(module, "quantize_activation", activation_reference))
            return fused()

    times = {"fused": [], "reference": []}
    for _ in range(3):
        fused(), reference()
    for _ in range(repeats):
        times["fused"].append(fused())
        times["reference"].append(reference())
    return {name: statistics.median(t) for name, t in times.items()}


def runner_throughput(profile: str, runs: int, layouts: tuple[tuple[int, int], ...]) -> list[dict]:
    """Runs per hour of the grid runner (:func:`emq.book.grids.run_grid`) at each (processes, threads)
    layout: the same ``runs`` runs of the profile's multi-bit model (seeds 0..runs-1), each layout
    into a fresh temporary store, one layout after the other on the same machine."""
    base = load_config(profile=profile, overrides={"data.root": str(repo_root() / "data")})
    configs = [method_config("shared_meanvar", base, **{"train.seed": s}) for s in range(runs)]
    out = []
    for jobs, threads in layouts:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train_all(configs, ResultsStore(tmp), jobs, threads, echo=lambda line: None)
            seconds = time.perf_counter() - t0
        out.append({"jobs": jobs, "threads": threads, "seconds": seconds, "runs_per_hour": 3600 * runs / seconds})
    return out


def print_budget(profile: str, jobs: int = 2, speedup: float | None = None) -> None:
    """Per chapter grid (and its core, where it has an extended tier) and for the book: runs, runs
    missing from the store, the training time of its runs (core-hours) and the runner's time with
    ``jobs`` one-thread workers, from the wall times the runs recorded and at the pace of their faster
    epochs (:func:`emq.book.grids.paced_seconds`); with ``speedup`` (the fused activation quantizer's
    step ratio, measured beside its reference in the same call), also paced and sped up by it where a
    run's activations are DoReFa's (the fused quantizer's; the committed runs were timed before it); and
    the paced core-hours of each group of a grid."""
    store = ResultsStore(repo_root() / "results")
    every = {name: grid_configs(name, profile) for name in CHAPTER_GRIDS}
    core = {name: grid_configs(name, profile, extended=False) for name in CHAPTER_GRIDS}
    print(f"training the chapters' grids at the {profile} profile from an empty store, {jobs} one-thread workers "
          "(recorded: the runs' wall times; paced: at the pace of each run's faster epochs, "
          "emq.book.grids.paced_seconds" + (f"; fused: paced / {speedup:.2f} where a run's activations are "
                                            "DoReFa's" if speedup else "")
          + "), and per group of a grid (a run two chapters share counts in each):")
    def once(seconds):  # each run's metrics read once, however many lines count the run
        cache: dict[str, float] = {}
        return lambda run: cache[run.hash] if run.hash in cache else cache.setdefault(run.hash, seconds(run))

    paced = once(paced_seconds)
    measures = {"recorded": once(recorded_seconds), "paced": paced}
    if speedup:
        measures["fused"] = lambda run: paced(run) / (speedup if run.config.quant.act_quantizer == "dorefa" else 1.0)

    def line(label, configs):
        configs = list({c.hash(): c for c in configs}.values())
        cells = []
        for seconds in measures.values():
            runner, missing = runner_seconds(configs, store, jobs, seconds)
            total, _ = runner_seconds(configs, store, 1, seconds)
            cells.append(f"{total / 3600:6.2f} core-h, runner {runner / 3600:5.2f} h")
        print(f"  {label:34} {len(configs):4d} runs ({missing} not in the store)  "
              + "  ".join(f"{name} {cell}" for name, cell in zip(measures, cells)))

    for name, configs in every.items():
        line(name, configs)
        if len(core[name]) < len(configs):
            line(f"{name}, core", core[name])
        groups = grid_of(name, profile).groups
        for group in groups if len(groups) > 1 else ():
            runs = {cfg.hash(): cfg for _, stages in grid_stages(name, profile, group=group) for cfg in stages}
            done = [c for c in runs.values() if store.is_finished(c)]
            if runs:
                hours = sum(paced(store.run(c)) for c in done) / 3600
                print(f"    group {group:20} {len(runs):4d} runs  paced {hours:6.2f} core-h")
    line("every chapter but 00_scale", [c for name, cs in every.items() if name != "00_scale" for c in cs])
    line("every chapter but 00_scale, core", [c for name, cs in core.items() if name != "00_scale" for c in cs])
    line("every chapter", [c for cs in every.values() for c in cs])


def budget_check(profile: str, runs: int = 4, jobs: int = 2, store: ResultsStore | None = None) -> list[dict]:
    """Retrain ``runs`` committed runs of the chapters' grids into a temporary store with the runner
    (``jobs`` one-thread workers, nothing else to run beside them) and return, per run, the seconds it
    recorded, its paced estimate and the seconds it takes now. The runs: the cheapest of each kind
    (method, trained bit-widths, epochs), the kinds that take the largest share of the budget (their
    runs' paced seconds) first, so that the check weighs what the budget mostly is; none fine-tuned
    from another; from ``store`` (default: the repository's). ``same_acc``: the retrained run ends at
    the stored run's accuracies exactly (on the CPU that trained it, training is deterministic)."""
    store = store or ResultsStore(repo_root() / "results")
    method, configs = {}, {}
    for name in CHAPTER_GRIDS:
        for c, stages in grid_stages(name, profile):
            for cfg in stages:
                if not cfg.train.init_from and store.is_finished(cfg):
                    method[cfg.hash()], configs[cfg.hash()] = c.method, cfg
    paced = {h: paced_seconds(store.run(c)) for h, c in configs.items()}  # each run's metrics read once
    kinds: dict[tuple, RunConfig] = {}
    share: dict[tuple, float] = {}
    for c in sorted(configs.values(), key=lambda c: paced[c.hash()]):
        kind = (method[c.hash()], len(c.train.bits), c.train.epochs)
        kinds.setdefault(kind, c)
        share[kind] = share.get(kind, 0.0) + paced[c.hash()]
    chosen = [kinds[k] for k in sorted(kinds, key=share.__getitem__, reverse=True)[:runs]]
    with tempfile.TemporaryDirectory() as tmp:
        again = ResultsStore(tmp)
        train_all(chosen, again, jobs, 1, echo=lambda line: None)
        return [{"hash": c.hash(), "kind": f"{method[c.hash()]}, {len(c.train.bits)} bits, {c.train.epochs} epochs",
                 "recorded_s": recorded_seconds(store.run(c)), "paced_s": paced[c.hash()],
                 "now_s": recorded_seconds(again.run(c)),
                 "same_acc": again.run(c).summary["acc"] == store.run(c).summary["acc"]} for c in chosen]


def print_budget_check(profile: str, runs: int, jobs: int = 2) -> None:
    rows = budget_check(profile, runs, jobs)
    print(f"the budget's estimates against {len(rows)} committed runs retrained now, {jobs} one-thread workers:")
    for r in rows:
        print(f"  {r['hash']} {r['kind']:42} recorded {r['recorded_s']:6.0f} s  paced {r['paced_s']:6.0f} s  "
              f"now {r['now_s']:6.0f} s")
    now, paced, recorded = (sum(r[k] for r in rows) for k in ("now_s", "paced_s", "recorded_s"))
    print(f"  ratio now / paced {now / paced:.2f}, now / recorded {now / recorded:.2f}")
    same = sum(r["same_acc"] for r in rows)
    print(f"  the same final accuracies as the committed runs: {same} of {len(rows)} "
          f"(float results differ between CPUs)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m emq.bench", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="cpu", help="model and batch of this profile (default cpu)")
    p.add_argument("--method", default="shared_meanvar")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-book", action="store_true", help="skip timing the whole book")
    p.add_argument("--coreset", action="store_true", help="also measure the coreset cost ratio (section 3)")
    p.add_argument("--prune", type=float, default=0.6, help="pruning ratio of the coreset comparison")
    p.add_argument("--throughput", action="store_true", help="add the training-throughput section (section 4)")
    p.add_argument("--size", choices=("auto", "full", "small"), default="auto",
                   help="throughput at full size (batch 256, 224 px) or small; auto: full on CUDA, small on CPU")
    p.add_argument("--speed-options", action="store_true",
                   help="a multi-bit step eager, channels-last, compiled and both (section 5)")
    p.add_argument("--activation", action="store_true",
                   help="a multi-bit step with the fused activation quantizer against its autograd reference "
                        "(section 8)")
    p.add_argument("--runner", action="store_true",
                   help="runs per hour of the grid runner: N one-thread processes against one N-thread process")
    p.add_argument("--runner-runs", type=int, default=4, help="runs trained per layout by --runner (default 4)")
    p.add_argument("--budget", action="store_true",
                   help="the runner's time for every chapter's grid, from the committed runs' wall times")
    p.add_argument("--budget-check", type=int, default=0, metavar="N",
                   help="retrain N committed runs (the cheapest of each kind) to check the budget's estimates")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="also time compiled steps (auto: on CUDA only; inductor on the CPU compiles for minutes)")
    args = p.parse_args(argv)
    r = step_times(args.profile, args.method, args.repeats, args.device)
    cfg, n = r["config"], len(r["bits"])
    print(f"device {r['device']}, {torch.get_num_threads()} threads; {cfg.model.arch}-{cfg.model.depth} "
          f"width x{cfg.model.width}, batch {cfg.train.batch_size}, method {args.method}, bits {list(r['bits'])}")
    print(f"  full-precision step  {1000 * r['fp_s']:8.1f} ms (median of {args.repeats})")
    print(f"  multi-bit step       {1000 * r['multi_s']:8.1f} ms ({n} bit-widths)")
    print(f"  ratio multi-bit / full-precision          {r['multi_s'] / r['fp_s']:.2f}")
    print(f"  quantization overhead multi / ({n} x fp)    {r['multi_s'] / (n * r['fp_s']):.2f}")
    if args.throughput:
        cuda = resolve_device(args.device).type == "cuda"
        size = args.size if args.size != "auto" else ("full" if cuda else "small")
        comp = cuda if args.compile == "auto" else args.compile == "on"
        print_throughput(throughput(size, args.device, args.repeats, comp), args.device)
    if args.speed_options:
        t = speed_option_times(args.profile, args.method, args.repeats, args.device)
        print(f"speed options, one multi-bit step of the {args.profile} model (median of {args.repeats}, interleaved):")
        for name, seconds in t.items():
            print(f"  {name:26} {1000 * seconds:8.1f} ms  speed-up {t['eager'] / seconds:5.2f}x")
    speedup = None
    if args.activation:
        t = activation_times(args.profile, args.method, args.repeats, args.device)
        speedup = t["reference"] / t["fused"]
        print(f"activation quantizer, one multi-bit step of the {args.profile} model (median of {args.repeats}, "
              f"interleaved; the same values and gradients):")
        print(f"  autograd reference   {1000 * t['reference']:8.1f} ms")
        print(f"  fused                {1000 * t['fused']:8.1f} ms  speed-up {t['reference'] / t['fused']:5.2f}x")
    if args.runner:
        cores = torch.get_num_threads()
        rows = runner_throughput(args.profile, args.runner_runs, ((cores, 1), (1, cores)))
        print(f"grid runner, {args.runner_runs} {args.profile} runs per layout ({cores} cores):")
        for r in rows:
            print(f"  {r['jobs']} process(es) x {r['threads']} thread(s)  {r['seconds']:7.0f} s  "
                  f"{r['runs_per_hour']:6.1f} runs/hour")
        print(f"  ratio {rows[0]['jobs']} x 1 thread / 1 x {rows[1]['threads']} threads  "
              f"{rows[0]['runs_per_hour'] / rows[1]['runs_per_hour']:.2f}")
    if args.budget:
        print_budget(args.profile, speedup=speedup)
    if args.budget_check:
        print_budget_check(args.profile, args.budget_check)
    if not args.no_book:
        print(f"whole book at the {args.profile} profile, fresh results store:")
        print(f"  book time {book_time(args.profile):.0f} s")
    if args.coreset:
        coreset_cost(args.profile, args.prune, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
