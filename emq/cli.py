"""Command line: ``python -m emq {train,eval,data,bench} ...``.

Bad input (unknown bit-width, unknown config key, bad type, missing or corrupt dataset, a
checkpoint of another config) ends with one line on stderr and exit status 2; nothing that
was already written is touched.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys

from emq.analysis.evaluation import evaluate_run
from emq.bench import main as bench_main
from emq.book.grids import GRIDS, grid_configs, grid_stages, run_grid
from emq.config import PROFILES, ConfigError, load_config, parse_overrides
from emq.data.check import missing_pieces
from emq.data.datasets import DataError, fetch_fashion_mnist
from emq.methods import METHODS, method_configs
from emq.quant.quantizers import check_bits
from emq.results import ResultsStore, Run
from emq.training import distributed
from emq.training.distributed import resolve_device
from emq.training.loop import TrainingInterrupted, train


def _bits_list(text: str) -> list[int]:
    """``"2,4,32"`` -> ``[2, 4, 32]``; a ValueError naming the problem otherwise."""
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"bad bit-width list {text!r}: use integers such as 2,4,8,32") from None
    if not bits:
        raise ValueError("--bits is empty: name at least one bit-width")
    return [check_bits(b) for b in bits]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emq", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) the run of a config")
    t.add_argument("config", nargs="?", help="YAML config file (defaults apply to missing keys)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    t.add_argument("--profile", choices=sorted(PROFILES), help="scale: smoke, cpu or gpu (applied before --set)")
    t.add_argument("--method", help="a registered method (python -m emq methods), applied before --set; "
                                    "its pretraining run, if any, is trained first")
    t.add_argument("--results", default="results", help="results store folder (default: results)")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint; refuse to start one afresh")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (GPUs, or CPU cores with gloo), via torchrun")
    t.add_argument("--print-torchrun", action="store_true", help="print the torchrun command of --nproc and exit")

    e = sub.add_parser("eval", help="evaluate a finished run at any bit-widths")
    e.add_argument("run_dir", help="the run's folder in the results store")
    e.add_argument("--bits", default="2,3,4,5,6,8,32", help="comma-separated bit-widths (default: 2,3,4,5,6,8,32)")
    e.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="re-estimate BatchNorm statistics on N training batches first (0: zero-shot)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--data-root", default="data",
                   help="the folder holding the run's dataset (default: data; a run does not store where it was)")

    sub.add_parser("methods", help="list the registered methods")

    g = sub.add_parser("grid", help="train every missing run of a chapter's grid (python -m emq grid --list)")
    g.add_argument("names", nargs="*", metavar="NAME",
                   help="one grid or several, e.g. 00_scale (several train in one queue, a shared run once)")
    g.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    g.add_argument("--jobs", type=int, default=2, help="worker processes (default 2: on 2 cores, two 1-thread "
                                                       "workers train more runs per hour than one 2-thread one)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    g.add_argument("--results", default="results", help="results store folder (default: results)")
    g.add_argument("--device", default="cpu", help="cpu or cuda (every worker uses it)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every run after the grid's scale, e.g. --set model.width=0.25 "
                        "(each run keeps its own settings; repeatable)")
    g.add_argument("--extended", action="store_true",
                   help="train the grid's extended tier too (the runs beyond the book's budget that a chapter "
                        "reads when the store has them)")
    g.add_argument("--list", "--dry-run", dest="list", action="store_true",
                   help="list the grid's runs, their tier and whether the store has them; train nothing")

    d = sub.add_parser("data", help="get the embedded dataset, or check a dataset's files")
    dsub = d.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="put Fashion-MNIST under ROOT/FashionMNIST/raw")
    f.add_argument("--root", default="data")
    c = dsub.add_parser("check", help="say what of dataset NAME is missing under ROOT (exit 1 if anything)")
    c.add_argument("name", help="fashion_mnist, cifar10, cifar100, tinyimagenet or imagenet")
    c.add_argument("root", help="the data root of that dataset")
    sub.add_parser("bench", help="speed figures (python -m emq.bench; its options follow)", add_help=False)
    return p


def _train_args(args) -> list[str]:
    """The arguments of ``python -m emq train`` that reproduce ``args`` without --nproc."""
    out = [args.config] if args.config else []
    if args.method:
        out += ["--method", args.method]
    for o in args.overrides:
        out += ["--set", o]
    if args.profile:
        out += ["--profile", args.profile]
    out += ["--results", args.results, "--device", args.device]
    return out + (["--no-progress"] if args.no_progress else []) + (["--resume"] if args.resume else [])


def _check_resumable(stages, store: ResultsStore) -> None:
    """For ``--resume``: the first unfinished run must have a checkpoint to continue from."""
    pending = [cfg for cfg in stages if not store.is_finished(cfg)]
    if pending and not (store.path_of(pending[0]) / "checkpoint.pt").is_file():
        raise ConfigError(f"--resume: run {pending[0].hash()} has no checkpoint in {store.root}; "
                          f"leave out --resume to start it")


def _launch(args) -> int:
    """Print, or run, the torchrun command that trains on ``args.nproc`` processes."""
    if distributed.from_env().world > 1:
        raise ConfigError("--nproc is for the launching command; under torchrun leave it out")
    distributed.check_nproc(args.nproc, args.device)
    train_args = _train_args(args)
    if args.print_torchrun:
        print(shlex.join(distributed.torchrun_command(args.nproc, train_args)))
        return 0
    cmd = distributed.torchrun_command(args.nproc, train_args, [sys.executable, "-m", "torch.distributed.run"])
    proc = subprocess.Popen(cmd)
    # a SIGTERM (a preempted node) or Ctrl-C reaches torchrun, which passes it on to every process
    previous = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _grid(args) -> None:
    if not args.names:
        print("grids: " + ", ".join(GRIDS))
        return
    store = ResultsStore(args.results)
    if args.list:
        for name in args.names:
            core = {cfg.hash() for cfg in grid_configs(name, args.profile, overrides=args.overrides, extended=False)}
            for c, stages in grid_stages(name, args.profile, overrides=args.overrides):
                for cfg in stages:
                    state = "finished" if store.is_finished(cfg) else "missing"
                    tier = "core" if cfg.hash() in core else "extended"
                    print(f"{cfg.hash()}  {state:<8}  {tier:<8}  {c.label}")
        return
    if args.jobs < 1 or args.threads < 1:
        raise ConfigError(f"--jobs and --threads must be at least 1, got {args.jobs} and {args.threads}")
    resolve_device(args.device)
    run_grid(args.names, args.profile, store, args.jobs, args.threads, device=args.device, overrides=args.overrides,
             extended=args.extended)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # every further option is emq.bench's own
        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            cfg = load_config(args.config, None, args.profile)
            if args.method:
                stages = method_configs(args.method, cfg, **parse_overrides(args.overrides))
            else:
                stages = [cfg.with_overrides(args.overrides)]
            resolve_device(args.device)
            if args.resume:
                _check_resumable(stages, ResultsStore(args.results))
            if args.nproc != 1 or args.print_torchrun:
                return _launch(args)
            for cfg in stages:
                run = train(cfg, ResultsStore(args.results), device=args.device, progress=not args.no_progress)
                if distributed.from_env().main:
                    acc = run.summary["acc"]
                    print(f"run {run.path}: " + ", ".join(f"{b}-bit {100 * acc[b]:.2f}%" for b in sorted(acc, key=int)))
            distributed.teardown()
        elif args.command == "methods":
            width = max(map(len, METHODS))
            for name, method in METHODS.items():
                print(f"{name:<{width}}  {method.about}")
        elif args.command == "grid":
            _grid(args)
        elif args.command == "eval":
            bits = _bits_list(args.bits)
            resolve_device(args.device)
            run = ResultsStore().open(args.run_dir)
            run = Run(run.path, run.config.with_overrides({"data.root": args.data_root}))
            if args.recalibrate_bn < 0:
                raise ConfigError(f"--recalibrate-bn must be 0 or positive, got {args.recalibrate_bn}")
            accs = evaluate_run(run, bits, args.recalibrate_bn, device=args.device)
            trained = set(run.config.train.bits)
            mode = f"BN re-estimated on {args.recalibrate_bn} batches" if args.recalibrate_bn else "zero-shot"
            print(f"run {run.path} ({mode})")
            for b, acc in accs.items():
                print(f"  {b:>2}-bit  {100 * acc:6.2f}%  {'trained' if b in trained else 'not trained'}")
        elif args.command == "data" and args.data_command == "check":
            missing = missing_pieces(args.name, args.root)
            for line in missing:
                print(f"missing: {line}")
            if missing:
                return 1
            print(f"{args.name}: all present under {args.root}")
        elif args.command == "data":
            fetch_fashion_mnist(args.root)
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted: the run keeps its last checkpoint; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
