"""Run grids as data, and the runner that trains what a grid's store does not have yet.

A grid names the runs a chapter reads at a profile: methods x seeds x parameters, declared
once here rather than in a notebook, which reads them back by group and key
(:meth:`emq.book.chapter.Chapter.runs`). ``python -m emq grid NAME --profile P --jobs N`` trains
every missing run of the grid with N worker processes of one thread each (a run fine-tuned from
another waits for it), resumable: an interrupted run continues from its checkpoint, a finished
one is never recomputed. A chapter then reads the same configs back.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from emq.config import ConfigError, RunConfig, load_config
from emq.methods import method_configs
from emq.profiles import SEEDS
from emq.results import ResultsStore, Run
from emq.training.loop import train


@dataclass(frozen=True)
class Cell:
    """One point of a grid: a method at some config overrides (dotted keys)."""

    method: str
    overrides: tuple[tuple[str, object], ...] = ()

    def configs(self, base: RunConfig) -> list[RunConfig]:
        """The runs of this point, pretraining stages first."""
        return method_configs(self.method, base, **dict(self.overrides))

    @property
    def label(self) -> str:
        return " ".join([self.method, *(f"{k.split('.')[-1]}={v}" for k, v in self.overrides)])


def cell(method: str, **overrides) -> Cell:
    """``cell("emq", train_epochs=16)``: keyword names are dotted keys with "_" after the section."""
    return Cell(method, tuple((k.replace("_", ".", 1), v) for k, v in overrides.items()))


@dataclass(frozen=True)
class Grid:
    """The runs of a chapter at one profile: named groups of cells, each under the key the chapter
    reads it by (``("switchable", 0)``: a method and a seed), on the profile's config with ``scale``
    (dotted overrides every run of the grid shares) applied."""

    groups: Mapping[str, Mapping[Hashable, Cell]]
    scale: Mapping[str, object] = field(default_factory=dict)
    # (group, key) of the cells beyond the book's compute budget at this profile: the extended tier, which
    # `python -m emq grid NAME --extended` trains and a chapter reads when the store has it
    extended: frozenset[tuple[str, Hashable]] = frozenset()

    def base(self, profile_base: RunConfig) -> RunConfig:
        """The config every run of the grid starts from."""
        return profile_base.with_overrides(dict(self.scale))

    def cells(self, group: str | None = None, extended: bool = True) -> list[Cell]:
        """The grid's cells, or those of one ``group``; without the extended tier unless ``extended``."""
        groups = self.groups.items() if group is None else [(group, self.groups[group])]
        return [c for g, cells in groups for k, c in cells.items() if extended or not self.is_extended(g, k)]

    def is_extended(self, group: str, key: Hashable) -> bool:
        return (group, key) in self.extended


# ---- the scale study (book/00_scale.ipynb) --------------------------------------------------------
# Accuracy against epochs and against training-set size, full precision alone and multi-bit
# (switchable BN, and shared BN + mean+var correction), on the cpu model, tested on all 10k images.
SCALE_METHODS = ("full_precision", "any_precision", "emq")
SCALE_EPOCHS = {"smoke": (1, 2), "cpu": (8, 16, 32)}
SCALE_SIZES = {"smoke": (256, 512), "cpu": (6144, 24576, 0)}  # 0 = all 60k images
SCALE_TEST_SIZE = {"smoke": 256, "cpu": 0}
# The doubling check: does a chapter's comparison change when its training is doubled? Chapter 02's three
# headline methods and chapter 04's random 40 % of the images (warm-up 1/12 of the epochs), at the
# scale of chapter 04 (cpu: CPU_SCALE, tested every 4th epoch) and at twice its epochs (CPU_LONG_SCALE, the
# scale of chapters 01-03 and 06, which moved there after this check).
DOUBLING_METHODS = ("switchable", "shared", "shared_meanvar")
DOUBLING_SEEDS = {"smoke": (0,), "cpu": (0, 1, 2)}
DOUBLING = {"smoke": ({"data.train_size": 256, "data.test_size": 256}, (1, 2)),
            "cpu": ({"data.train_size": 2458, "train.eval_every": 4}, (48, 96))}


# Chapter 06's verdict (LSQ against the Any-Precision baseline, i.e. switchable BN) doubled in turn: both
# methods at chapter 06's length and at twice it (group "verdict", keyed by method, epochs and seed).
VERDICT_METHODS = ("switchable", "lsq")
VERDICT_LENGTHS = {"smoke": (2, 4), "cpu": (96, 192)}
# Chapter 02's claims doubled the same way: its shared BN + mean+var network against switchable BN (group
# "bn_verdict"; the switchable runs are the verdict group's).
BN_VERDICT_METHODS = ("switchable", "shared_meanvar")
# The test each check reads its comparison by, its chapter's (emq.analysis.stats.Difference.reading): chapter 06
# asks which method is clearly ahead, chapter 02's second claim whether the two match within one point.
VERDICT_TESTS = {"verdict": "order", "bn_verdict": "match"}
# A cheaper scale for the chapters: half chapter 02's training images at its length (group "half", keyed by method,
# training-set size and seed; the full-size runs are chapter 02's): are its methods flat there too, and does its
# comparison read the same?
HALF_SIZES = {"smoke": (128, 256), "cpu": (1229, 2458)}
# Another: half the cpu model's width (ResNet-8 x0.25 instead of x0.5, a quarter of the convolutions' work per
# image) at chapter 02's images and length (group "narrow", keyed by method, width and seed; the x0.5 runs are
# chapter 02's): the same two questions. Neither method was flat there, so the chapters stay at x0.5.
NARROW_WIDTHS = {"smoke": (0.125, 0.25), "cpu": (0.25, 0.5)}


def scale_grid(profile: str) -> Grid:
    """Epochs on the profile's 6,144-image training set (every method); then full precision on
    other training-set sizes, 40 % of those images among them, and the multi-bit methods on all
    60k images for 4 epochs (about the sample-passes of 32 epochs on 6,144 images) and 8; the
    doubling check (group "doubling", keyed by method, epochs and seed); and chapter 06's verdict at
    twice its epochs (group "verdict", the same keys)."""
    epochs, sizes = SCALE_EPOCHS[profile], SCALE_SIZES[profile]
    test = SCALE_TEST_SIZE[profile]
    cells = [cell(m, data_train_size=sizes[0], data_test_size=test, train_epochs=e)
             for m in SCALE_METHODS for e in epochs]
    if profile == "cpu":
        middle, every = sizes[1], sizes[2]
        cells += [cell("full_precision", data_train_size=middle, data_test_size=test, train_epochs=e)
                  for e in (4, 8, 16)]
        cells += [cell("full_precision", data_train_size=every, data_test_size=test, train_epochs=e) for e in (2, 4, 8)]
        cells += [cell(m, data_train_size=every, data_test_size=test, train_epochs=e) for m in SCALE_METHODS[1:]
                  for e in (4, 8)]  # 8: switchable BN gained 0.42-0.79 pp over the last of 4 epochs (3 seeds)
        # 40 % of the 6,144 images: is the data redundant at this scale (chapter 04's question)? And the
        # multi-bit methods there: the cheapest candidate plateau (full precision gains 0.41 pp at 32 epochs)
        cells += [cell("full_precision", data_train_size=2458, data_test_size=test, train_epochs=e) for e in (16, 32)]
        cells += [cell(m, data_train_size=2458, data_test_size=test, train_epochs=32) for m in SCALE_METHODS[1:]]
    else:
        cells += [cell(m, data_train_size=sizes[1], data_test_size=test, train_epochs=epochs[0]) for m in SCALE_METHODS]
    sizes_, lengths = DOUBLING[profile]
    same = {k.replace(".", "_", 1): v for k, v in sizes_.items()}
    doubling = {(m, e, s): cell(m, **same, train_seed=s, train_epochs=e)
                for s in DOUBLING_SEEDS[profile] for m in DOUBLING_METHODS for e in lengths}
    doubling |= {("random 40 %", e, s): cell("shared_meanvar", **same, train_seed=s, train_epochs=e, coreset_prune=0.6,
                                             coreset_score="random", coreset_mode="static",
                                             coreset_warmup_epochs=e // 12)
                 for s in DOUBLING_SEEDS[profile] for e in lengths}
    def checked(methods: tuple[str, ...]) -> dict:  # a verdict check: methods at a chapter's length and at twice it
        return {(m, e, s): cell(m, **same, train_seed=s, train_epochs=e)
                for s in DOUBLING_SEEDS[profile] for m in methods for e in VERDICT_LENGTHS[profile]}

    short = VERDICT_LENGTHS[profile][0]
    half = {(m, n, s): cell(m, **{**same, "data_train_size": n}, train_seed=s, train_epochs=short)
            for s in DOUBLING_SEEDS[profile] for m in BN_VERDICT_METHODS for n in HALF_SIZES[profile]}
    narrow = {(m, w, s): cell(m, **same, model_width=w, train_seed=s, train_epochs=short)
              for s in DOUBLING_SEEDS[profile] for m in BN_VERDICT_METHODS for w in NARROW_WIDTHS[profile]}
    return Grid({"scale": {c.label: c for c in cells}, "doubling": doubling, "verdict": checked(VERDICT_METHODS),
                 "bn_verdict": checked(BN_VERDICT_METHODS), "half": half, "narrow": narrow})


# ---- the GPU evidence (make gpu-evidence) ---------------------------------------------------------
# Chapter 02's headline comparison on all 60k Fashion-MNIST images with ResNet-20 (the gpu
# profile's model and data), 3 seeds, 20 epochs of batch 256, six runs at a time: a length chosen
# to fit the 10-minute budget of one H100-class GPU by estimate, not yet measured on one.
GPU_EVIDENCE_METHODS = ("switchable", "shared", "shared_mean", "shared_meanvar")


def gpu_evidence_grid(profile: str) -> Grid:
    if profile != "gpu":
        raise KeyError(profile)
    return Grid({"methods": {(m, s): cell(m, train_seed=s) for m in GPU_EVIDENCE_METHODS for s in (0, 1, 2)}},
                scale={"train.epochs": 20, "train.batch_size": 256})


# The cpu scale of every chapter but the scale study: 2,458 training images (40 % of
# the profile's 6,144) for 48 epochs, where the data rather than the number of steps caps the accuracy (the
# scale study, on 32 epochs: full precision gained +0.41 pp over the last quarter, shared BN + mean+var
# -0.11 pp, switchable BN +0.8; on all 60k images no affordable length stopped the multi-bit runs). At 48
# epochs most runs no longer rise but still move by 1-2 pp between evaluations (chapter 02's plateau
# table). Tested every 4th epoch and at epochs 36 and 48, where the plateau rule reads; three seeds.
CPU_SCALE = {"data.train_size": 2458, "train.epochs": 48, "train.eval_every": 4}
# The doubling check (chapter 00) found 48 epochs still short of a plateau (about 1 pp more at 32 bits from
# 96), and at 96 the switchable runs flat by the rule: chapters 01-03 and 06 train the same 2,458 images for
# 96 epochs. Chapter 04 stays at 48: its 38 runs at 96 would take about 5.5 core-hours.
CPU_LONG_SCALE = {**CPU_SCALE, "train.epochs": 96}


# ---- the chapters' grids ---------------------------------------------------------------------------
# Each keeps, at the cpu profile, the runs the committed chapters read (tests/test_grids.py checks it
# against results/chapters/<chapter>.runs.json).
#
# At the cpu profile the chapters' grids take about 4 hours on 2 cores, over the book's budget of 3. So
# chapters 02, 04 and 06 split theirs into a core, which carries each chapter's headline comparisons
# with three seeds, and an extended tier: the runs that add a method or a setting beside them (chapter
# 02's mean-only correction and its all-bit-widths control, chapter 04's gentlest ratio and its one-seed
# scores and modes, chapter 06's Double Rounding and shift-bit). `make runs` trains the core, `make runs
# EXTENDED=1` both; a chapter reads the extended runs when the store has them and says what it left out
# where it lacks them. The smoke profile has the same tiers, so that the tests run a chapter both ways.
TIERED_PROFILES = ("smoke", "cpu")


def bias_grid(profile: str) -> Grid:
    """Chapter 01 analyses one trained switchable network: at the cpu profile chapter 02's first seed."""
    return Grid({"switchable": {SEEDS[profile][0]: cell("switchable", train_seed=SEEDS[profile][0])}},
                scale=CPU_LONG_SCALE if profile == "cpu" else {})


BN_METHODS = ("switchable", "shared", "shared_mean", "shared_meanvar")
ALL_BITS = (*range(2, 9), 32)  # chapter 02's control trains every bit-width the others test
BN_ABLATIONS = {  # label -> (method, overrides)
    "shared_meanvar, ReLU at 32": ("shared_meanvar", {"quant_fp_act": "relu"}),
    "switchable, clamp at 32": ("switchable", {"quant_fp_act": "clamp"}),
    "shared_meanvar, attached statistics": ("shared_meanvar", {"quant_detach_stats": False}),
}


def bn_grid(profile: str) -> Grid:
    """Chapter 02: the four BatchNorm treatments over the profile's seeds, the mean+var network
    trained on every bit-width, and three ablations. At the cpu profile the control has one seed and
    the ablations are left out, to keep the compute for the seeds of the claims."""
    seeds = SEEDS[profile]
    controls = seeds[:1] if profile == "cpu" else seeds
    ablation_seeds = {"gpu": seeds, "cpu": ()}.get(profile, seeds[:1])
    extended = {("methods", ("shared_mean", s)) for s in seeds} | {("all_bits", s) for s in controls}
    return Grid({
        # seed-major, so that the runner's first runs cover every treatment
        "methods": {(m, s): cell(m, train_seed=s) for s in seeds for m in BN_METHODS},
        "all_bits": {s: cell("shared_meanvar", train_seed=s, train_bits=ALL_BITS) for s in controls},
        "ablations": {(label, s): cell(m, train_seed=s, **extra)
                      for label, (m, extra) in BN_ABLATIONS.items() for s in ablation_seeds},
    }, scale=CPU_LONG_SCALE if profile == "cpu" else {},
        extended=frozenset(extended if profile in TIERED_PROFILES else ()))


# Chapter 02's earlier candidate scale: all 60k images for 4 epochs, where the first seed of switchable
# BN stopped rising in the scale study; three seeds of the four treatments, the all-bit-widths control
# with one. Its other seeds did not stop rising, so it was left partly trained (the store has what the
# scale chapter shows) and the chapters moved to CPU_SCALE.
BN_PLATEAU_SCALE = {"data.train_size": 0, "data.test_size": 0}


def bn_plateau_grid(profile: str) -> Grid:
    if profile != "cpu":
        raise KeyError(profile)
    seeds = (0, 1, 2)
    return Grid({
        "methods": {(m, s): cell(m, train_seed=s) for m in BN_METHODS for s in seeds},
        "all_bits": {s: cell("shared_meanvar", train_seed=s, train_bits=ALL_BITS) for s in seeds[:1]},
    }, scale=BN_PLATEAU_SCALE)


TRANSFER_CHILDREN = (32, 2)  # chapter 03's child A (full precision) and child B (2 bits), high to low


def transfer_grid(profile: str) -> Grid:
    """Chapter 03: two children sharing weights, each on its own half of the data (shard sampling),
    and each child alone on the same half; three seeds (two at smoke): each child sees half the data."""
    seeds = SEEDS[profile]
    scale = CPU_LONG_SCALE if profile == "cpu" else {}

    def child(seed: int, bits=TRANSFER_CHILDREN, offset: int = 0) -> Cell:
        return cell("shared_meanvar", train_bits=bits, train_distill="hard", train_seed=seed, coreset_score="shard",
                    coreset_prune=0.5, coreset_warmup_epochs=0, coreset_shard_offset=offset)

    return Grid({"shared": {s: child(s) for s in seeds},
                 "alone": {(b, s): child(s, (b,), TRANSFER_CHILDREN.index(b)) for b in TRANSFER_CHILDREN
                           for s in seeds}}, scale=scale)


PRUNE_RATIOS = (0.3, 0.5, 0.6, 0.7, 0.8)
PRUNE_SCORES = ("el2n", "grand", "grand_last", "loss", "random")
PRUNE_BITS = (2, 4, 8, 32)  # the trained bit-widths of chapter 04's multi-bit runs (the default train.bits)


def pruning_grid(profile: str) -> Grid:
    """Chapter 04: multi-bit training (shared BN + mean+var) on the full data and on pruned data,
    keyed by "score, mode", ratio and seed. Below the gpu profile EL2N and random (static) cover the
    main ratios with every seed, the other scores and modes p = 0.6 (0.5 at smoke) with one seed; the
    gpu profile runs every score and mode at every ratio. Beside them, one network per bit-width
    trained alone on all the data, with the baseline's seeds. Below the gpu profile the one-seed runs
    are the extended tier (TIERED_PROFILES), and at the cpu profile p = 0.3 too. At the cpu profile: CPU_SCALE,
    p = 0.3, 0.6 and 0.8, warm-up 4 of the 48 epochs (about 1/12, as the gpu profile's 5 of 60); the
    baseline is the scale study's 48-epoch shared BN + mean+var runs of its doubling check (the same hashes)."""
    if profile == "cpu":
        return _pruning(SEEDS[profile], (0.3, 0.6, 0.8), CPU_SCALE, warmup=4, extended_ratios=(0.3,))
    if profile == "smoke":
        return _pruning(SEEDS[profile], (0.5, 0.8), {"train.epochs": 2}, warmup=1, side=0.5)
    seeds = SEEDS[profile]
    plan = {(s, m): (PRUNE_RATIOS, seeds) for m in ("static", "dynamic") for s in PRUNE_SCORES}
    plan.update({(s, "lightweight"): (PRUNE_RATIOS, seeds) for s in ("el2n", "loss")})
    return _pruning_plan(plan, {}, warmup=5)


HEADLINE_PRUNING = (("el2n", "static"), ("random", "static"))  # below the gpu profile: every ratio and seed
# The ratio of the one-seed scores and modes, where chapter 04 and its synthesis line compare every score (at the
# ratio run nearest it: side_ratio).
PRUNE_SIDE = 0.6


def side_ratio(ratios) -> float:
    """Of the pruning ratios a chapter 04 store has, the one nearest PRUNE_SIDE."""
    return min(ratios, key=lambda p: abs(p - PRUNE_SIDE))


def _pruning(seeds: tuple[int, ...], main: tuple[float, ...], scale: dict, warmup: int, side: float = PRUNE_SIDE,
             extended_ratios: tuple[float, ...] = ()) -> Grid:
    """EL2N and random (static) at the ``main`` ratios with every seed, the other scores and modes at
    ``side`` with the first; the extended tier: those one-seed runs, and the headline methods at
    ``extended_ratios``."""
    plan = dict.fromkeys(HEADLINE_PRUNING, (main, seeds))
    plan.update({(s, "static"): ((side,), seeds[:1]) for s in ("grand", "grand_last", "loss")})
    plan.update({("el2n", mode): ((side,), seeds[:1]) for mode in ("dynamic", "lightweight")})
    grid = _pruning_plan(plan, scale, warmup)
    extended = {("pruned", key) for key in grid.groups["pruned"]
                if tuple(key[0].split(", ")) not in HEADLINE_PRUNING or key[1] in extended_ratios}
    return replace(grid, extended=frozenset(extended))


def _pruning_plan(plan: dict, scale: dict, warmup: int) -> Grid:
    """The grid of a plan ``(score, mode) -> (ratios, seeds)``. The warm-up (full-data epochs before the
    first selection) is a setting of the pruned runs only, so the baseline is the plain multi-bit run."""
    used = sorted({s for _, ss in plan.values() for s in ss})
    return Grid({
        "baseline": {s: cell("shared_meanvar", train_seed=s) for s in used},
        "pruned": {(f"{score}, {mode}", p, s): cell("shared_meanvar", train_seed=s, coreset_prune=p,
                                                     coreset_score=score, coreset_mode=mode,
                                                     coreset_warmup_epochs=warmup)
                   for (score, mode), (ratios, ss) in plan.items() for p in ratios for s in ss},
        # the user's alternative to one multi-bit network: one network per bit-width, each alone
        "per_bit": {(b, s): cell("switchable", train_seed=s, train_bits=(b,)) for b in PRUNE_BITS for s in used},
    }, scale=scale)


COMPARED_METHODS = ("any_precision", "any_precision_published", "emq", "lsq", "qil", "shift", "double_rounding",
                    "progressive_weights", "progressive_bits", "stochastic_precision", "joint_kd")
REFERENCE_METHOD = "full_precision"


# At the cpu profile, three seeds of all eleven methods at the plateau scale do not fit the book's budget,
# so five of them with the reference: the two baselines of chapter 02 (the same runs), a learned
# quantizer, the one-int-copy method and the fine-tuned one. Left out there: the published Any-Precision
# recipe (its step schedule flattens the last quarter by construction, so the plateau rule cannot read
# it), QIL, the progressive and stochastic schedules and joint distillation.
CPU_COMPARED_METHODS = ("any_precision", "emq", "lsq", "double_rounding", "shift")
# Their extended tier (TIERED_PROFILES): the core compares the two baselines with a learned quantizer.
EXTENDED_METHODS = ("double_rounding", "shift")


# Shift-bit's low bit-widths collapse at the cpu profile as its staircase steepens past about 100 (chapter
# 06); the same fine-tuning with the steepness growing to SHIFT_STEEPNESS_CAP only (its pretraining run
# carries the key too, which full precision does not read).
SHIFT_STEEPNESS_CAP = 100.0


def methods_grid(profile: str) -> Grid:
    """Chapter 06: the compared methods and the full-precision reference over the profile's seeds; at
    the cpu profile the five of CPU_COMPARED_METHODS at CPU_LONG_SCALE, elsewhere all of them; and
    shift-bit with its steepness capped (group "shift_capped", by seed; at the cpu profile at CPU_SCALE's
    48 epochs, where the collapse it tests was found)."""
    methods = CPU_COMPARED_METHODS if profile == "cpu" else COMPARED_METHODS
    capped = {"train_epochs": CPU_SCALE["train.epochs"]} if profile == "cpu" else {}
    seeds = SEEDS[profile]
    extended = {("methods", (m, s)) for m in EXTENDED_METHODS for s in seeds} | {("shift_capped", s) for s in seeds}
    return Grid({"methods": {(m, s): cell(m, train_seed=s) for s in seeds for m in (*methods, REFERENCE_METHOD)},
                 "shift_capped": {s: cell("shift", train_seed=s, quant_steepness_end=SHIFT_STEEPNESS_CAP, **capped)
                                  for s in seeds}},
                scale=CPU_LONG_SCALE if profile == "cpu" else {},
                extended=frozenset(extended if profile in TIERED_PROFILES else ()))


GRIDS: dict[str, Callable[[str], Grid]] = {
    "00_scale": scale_grid,
    "01_quantization_bias": bias_grid,
    "02_shared_bn": bn_grid,
    "03_knowledge_transfer": transfer_grid,
    "04_coreset_pruning": pruning_grid,
    "06_methods": methods_grid,
    "02_shared_bn_plateau": bn_plateau_grid,
    "gpu_evidence": gpu_evidence_grid,
}
# the grids the book's chapters read (what `make runs` trains)
CHAPTER_GRIDS = ("00_scale", "01_quantization_bias", "02_shared_bn", "03_knowledge_transfer", "04_coreset_pruning",
                 "06_methods")


def grid_of(name: str, profile: str) -> Grid:
    if name not in GRIDS:
        raise ConfigError(f"unknown grid {name!r}: grids are {', '.join(GRIDS)}")
    try:
        return GRIDS[name](profile)
    except KeyError:
        raise ConfigError(f"grid {name!r} has no {profile!r} profile") from None


def grid_stages(name: str, profile: str, base: RunConfig | None = None, group: str | None = None, overrides=None,
                extended: bool = True) -> list[tuple[Cell, list[RunConfig]]]:
    """Every cell of grid ``name`` at ``profile`` (or of one of its groups; without its extended tier
    unless ``extended``) with its runs (pretraining stages first), on ``base`` (default: the profile's
    config). ``overrides`` (dotted, as ``--set``) apply to every run after the grid's scale and before
    each cell's own settings."""
    grid = grid_of(name, profile)
    start = grid.base(base or load_config(profile=profile)).with_overrides(overrides)
    return [(c, c.configs(start)) for c in grid.cells(group, extended)]


def grid_configs(name: str, profile: str, base: RunConfig | None = None, overrides=None,
                 extended: bool = True) -> list[RunConfig]:
    """Every run of grid ``name`` at ``profile`` (without its extended tier unless ``extended``), each
    once, pretraining stages before their users."""
    out: dict[str, RunConfig] = {}
    for _, stages in grid_stages(name, profile, base, overrides=overrides, extended=extended):
        for cfg in stages:
            out.setdefault(cfg.hash(), cfg)
    return list(out.values())


# ---- the runner ----------------------------------------------------------------------------------
def _train_one(args) -> tuple[str, float, dict]:
    cfg, root, threads, device = args
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run = train(cfg, ResultsStore(root), device=device, progress=False)
    return run.hash, time.perf_counter() - t0, run.summary["acc"]


def run_grid(name: str | Sequence[str], profile: str, store: ResultsStore, jobs: int = 2, threads: int = 1,
             base: RunConfig | None = None, echo: Callable[[str], None] = print, device: str = "cpu",
             overrides=None, extended: bool = False) -> list[str]:
    """Train every missing run of grid ``name`` at ``profile`` (:func:`train_all`), its extended tier
    too if ``extended``, with ``overrides`` (:func:`grid_stages`). Several grids (``name`` a sequence)
    train in one queue, a run they share once, so that no worker idles at the end of each grid."""
    names = [name] if isinstance(name, str) else list(name)
    configs = {c.hash(): c for n in names for c in grid_configs(n, profile, base, overrides, extended)}
    title = f"grid {', '.join(names)} at {profile}" + (" with the extended tier" if extended else "")
    return train_all(list(configs.values()), store, jobs, threads, title, echo, device)


def run_cost(cfg: RunConfig) -> int:
    """A run's size for ordering the runner's queue (cheapest first, so results land early): training
    images x epochs x trained bit-widths; the whole split counts as 60,000 images."""
    return (cfg.data.train_size or 60_000) * cfg.train.epochs * len(cfg.train.bits)


def recorded_seconds(run: Run) -> float:
    """The wall time a finished run recorded."""
    return run.summary["wall_time_s"]


def paced_seconds(run: Run, quantile: float = 0.25) -> float:
    """A finished run's wall time at the pace of its faster epochs. Runs trained beside more workers than
    cores were slowed for part of their epochs; this scales the recorded time by how much faster the
    run's epochs without a test evaluation (all its epochs, if it tests after nearly every one) would
    have been at the ``quantile`` of their durations, taken among epochs of the same number of steps (a
    pruned run's full-data warm-up is one kind, its pruned epochs another). Read from
    ``metrics.jsonl``; the recorded time if the run has fewer than 4 epochs."""
    wall = recorded_seconds(run)
    rows = [r for r in run.metrics() if "elapsed_s" in r and "step" in r]
    ends = [(0.0, 0), *((r["elapsed_s"], r["step"]) for r in rows)]
    # a test evaluation is logged with its epoch and timed in the next one
    tested = [False, *("test_acc" in r for r in rows)]
    kinds: dict[int, list[float]] = {}
    for plain_only in (True, False):  # all epochs where fewer than 4 are without one (tested every epoch)
        kinds.clear()
        for (t0, s0), (t1, s1), after_test in zip(ends, ends[1:], tested):
            if s1 > s0 and not (plain_only and after_test):
                kinds.setdefault(s1 - s0, []).append(t1 - t0)
        if sum(len(d) for d in kinds.values()) >= 4:
            break
    measured = sum(sum(d) for d in kinds.values())
    if sum(len(d) for d in kinds.values()) < 4 or measured <= 0:
        return wall
    paced = sum(sorted(d)[int(quantile * len(d))] * len(d) for d in kinds.values())
    return wall * min(1.0, paced / measured)


def runner_seconds(configs: list[RunConfig], store: ResultsStore, jobs: int = 2,
                   seconds: Callable[[Run], float] = recorded_seconds) -> tuple[float, int]:
    """How long :func:`train_all` takes to train ``configs`` from an empty store with ``jobs`` workers,
    from each finished run's ``seconds`` (default: the wall time it recorded; :func:`paced_seconds`
    for the pace of its faster epochs, a lower bound): the runs in the runner's order (cheapest first),
    each started on the first free worker, a fine-tuned run not before its source has finished.
    Also returns how many of ``configs`` the store lacks (not counted)."""
    done = sorted((c for c in configs if store.is_finished(c)), key=run_cost)
    free, finished = [0.0] * jobs, {}
    for c in done:
        i = min(range(jobs), key=free.__getitem__)
        start = max(free[i], finished.get(c.train.init_from, 0.0))
        free[i] = finished[c.hash()] = start + seconds(store.run(c))
    return max(free), len(configs) - len(done)


def train_all(configs: list[RunConfig], store: ResultsStore, jobs: int = 2, threads: int = 1, title: str = "runs",
              echo: Callable[[str], None] = print, device: str = "cpu") -> list[str]:
    """Train every config the store lacks with ``jobs`` processes of ``threads`` threads, cheapest
    first (:func:`run_cost`); one line per run. Runs fine-tuned from another (``train.init_from``)
    start once it has finished. Returns the hashes trained."""
    todo = sorted((c for c in configs if not store.is_finished(c)), key=run_cost)
    echo(f"{title}: {len(configs)} runs, {len(configs) - len(todo)} in the store, "
         f"{len(todo)} to train with {jobs} process(es) x {threads} thread(s)")
    done: list[str] = []
    total = len(todo)
    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        while todo:
            ready = [c for c in todo if not c.train.init_from or store.is_finished_hash(c.train.init_from)]
            if not ready:
                raise ConfigError(f"{title}: runs wait for init_from runs that are not trained here")
            todo = [c for c in todo if c not in ready]
            for h, seconds, acc in pool.imap_unordered(_train_one, [(c, store.root, threads, device) for c in ready]):
                done.append(h)
                accs = ", ".join(f"{b}-bit {100 * a:.1f}%" for b, a in sorted(acc.items(), key=lambda t: int(t[0])))
                echo(f"[{len(done)}/{total}] run {h}: {seconds:.0f} s, {accs}")
    return done
