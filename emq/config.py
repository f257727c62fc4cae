"""Frozen dataclass configs, strict loading from YAML/dicts, dotted overrides and profiles.

A run is fully described by a :class:`RunConfig`; its hash keys the results store. Every
default below is the one a user gets from ``python -m emq train`` without overrides.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from emq.errors import ConfigError
from emq.profiles import SCALES


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true and false (also True, TRUE, False,
    FALSE). YAML 1.1 also reads on/off/yes/no as booleans, which would turn the documented values
    of str keys (``train.amp=off``, ``train.channels_last=on``) into False and True; here they stay
    the words written. Every YAML emq reads (config files, ``--set`` values) goes through it."""


_YAML_BOOL = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _YAML_BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(_YAML_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2's exponent floats too: 1e-3 and 5E4 (YAML 1.1 needs a dot and a signed exponent: 1.0e-3)
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                    list("-+.0123456789"))


def load_yaml(text: str):
    """YAML text as Python values, with YAML 1.2's booleans (:class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | tinyimagenet | imagenet
    # folder holding the dataset (relative to the working directory). Where the data lives does not
    # determine a result: the run hash and the stored config.json leave it out (RunConfig.portable)
    root: str = "data"
    train_size: int = 0  # 0 = the whole training split; else a fixed random subset of this size
    test_size: int = 0  # 0 = the whole test split
    subset_seed: int = 0  # seed of the fixed subsets, shared by all runs so they see the same data
    augment: bool = True  # random crop (pad 2 or 4) and horizontal flip on training batches
    # 0: ImageNet decoded once into 64 px tensors (small copies); > 0: ImageNet streamed from disk
    # through torchvision's ImageFolder, RandomResizedCrop+flip to this size (emq.data.imagefolder)
    image_size: int = 0


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet"  # resnet: CIFAR-style ResNet of depth 6n+2 | resnet18 | resnet50 | vit_tiny
    depth: int = 20  # 20 = ResNet-20 (CIFAR ResNet only)
    width: float = 1.0  # multiplier on the stage widths 16, 32, 64 (CIFAR ResNet only)
    preact: bool = False  # pre-activation blocks (BN -> act -> conv) (CIFAR ResNet only)
    # emq: the blocks of emq.nn.models.Block | any_precision: Any-Precision's pre-activation ResNet as published
    # (SHI-Labs/Any-Precision-DNNs): shortcut from the pre-activated input through a full-precision 1x1 conv and
    # one plain BN, no activation after the last BN, PyTorch's default init; needs preact (CIFAR ResNet only).
    # Upstream's first conv and classifier are full precision: quant.quantize_first_last false, the default
    block: str = "emq"


@dataclass(frozen=True)
class QuantConfig:
    norm: str = "switchable"  # switchable: one BN per trained bit-width | shared: one BN for all
    correction: str = "none"  # weight bias correction: none | mean | meanvar (METHOD.md §2)
    detach_stats: bool = True  # correction statistics are constants in the backward pass
    fp_act: str = "relu"  # activation at 32 bits: relu (Any-Precision) | clamp to [0, 1]
    scale_by_mean: bool = False  # multiply quantized weights by E = mean|W| (Any-Precision option)
    quantize_first_last: bool = False  # the stem conv and classifier stay full precision by default
    weight_quantizer: str = "dorefa"  # dorefa | lsq | qil | shift | double_rounding (emq.quant.schemes)
    act_quantizer: str = "dorefa"  # dorefa | lsq | qil
    steepness_start: float = 10.0  # shift-bit soft staircase: steepness lambda at the first step ...
    steepness_end: float = 1000.0  # ... raised geometrically to this at the last step
    alrs: bool = False  # Double Rounding: scale's gradient scaled per precision (Adaptive LR Scaling)


@dataclass(frozen=True)
class TrainConfig:
    bits: tuple[int, ...] = (2, 4, 8, 32)  # trained bit-widths; 32 = full precision
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (Nesterov, with momentum) | adam (PyTorch's defaults, L2 weight decay)
    lr: float = 0.1  # peak learning rate, after the warm-up
    schedule: str = "cosine"  # cosine: annealed to zero per step | step: lr x gamma at each of the milestones
    milestones: tuple[float, ...] = (0.5, 0.75, 0.9)  # step schedule: fractions of train.epochs (epoch boundaries)
    gamma: float = 0.1  # step schedule: the factor at every milestone
    warmup_epochs: float = 0.0  # linear warm-up before the schedule
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    distill: str = "recursive"  # recursive | hard (all CE) | soft (full precision teaches all) | joint
    kd_temperature: float = 4.0  # joint: temperature T of the KL terms with the full-precision companion
    progressive: str = "none"  # none | weights_first (activations quantized from the second half) | bits
    stochastic_precision: float = 0.0  # 0 = off; else the share of blocks quantized at the start, rising to 1
    init_from: str = ""  # hash of a finished run in the same store whose weights start this one
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at the end of every epoch
    # epochs between test evaluations; the last epoch and the start of its last quarter
    # (emq.analysis.stats.reference_epoch, for the plateau rule) are always evaluated
    eval_every: int = 1
    # Speed options (emq.training.speed). auto = on for CUDA, off on the CPU, so CPU runs are unchanged.
    amp: str = "auto"  # bf16 autocast of the forward passes: auto | off | bf16
    channels_last: str = "auto"  # NHWC memory format for model and inputs: auto | off | on
    compile: str = "auto"  # torch.compile the model (one graph per bit-width): auto | off | on


@dataclass(frozen=True)
class CoresetConfig:
    """Bit-wise coreset sampling (METHOD.md §3); ``prune = 0`` trains every bit-width on all data."""

    prune: float = 0.0  # pruning ratio p: each bit-width trains on a fraction 1 - p; 0 = off (all data)
    score: str = "el2n"  # el2n | grand | grand_last | loss | random | shard (disjoint random blocks)
    mode: str = "static"  # static: select once | dynamic: re-score every `every` epochs | lightweight: dynamic,
    #                       scores taken from the logits training computes (el2n or loss only)
    warmup_epochs: int = 1  # epochs on the full data before the first selection
    every: int = 1  # epochs between re-selections in the dynamic and lightweight modes
    class_balanced: bool = False  # keep 1 - p of every class rather than of the whole training set
    shard_offset: int = 0  # score=shard: the i-th bit-width (high to low) takes block i + shard_offset


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def non_default(self) -> dict:
        """The fields that differ from their defaults, as ``{section: {name: value}}``."""
        default = RunConfig().to_dict()
        out = {}
        for section, fields in self.to_dict().items():
            changed = {k: v for k, v in fields.items() if v != default[section][k]}
            if changed:
                out[section] = changed
        return out

    def portable(self) -> RunConfig:
        """This config with the location of the data reset to its default: what a run folder
        stores, so that a clone of the store at any path reads the same runs."""
        return dataclasses.replace(self, data=dataclasses.replace(self.data, root=DataConfig.root))

    def hash(self) -> str:
        """12 hex digits of the SHA-256 of the canonical JSON of the non-default fields.

        Only fields that differ from their defaults enter the hash, so adding a config field
        whose default keeps the old behaviour leaves every stored run's hash valid; and the data
        root is left out (:meth:`portable`), since where the data lives does not change a result.
        """
        blob = json.dumps(self.portable().non_default(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def with_overrides(self, overrides: dict | list[str] | None) -> RunConfig:
        """A copy with dotted overrides applied, e.g. ``{"train.epochs": 3}`` or ``["train.epochs=3"]``."""
        merged = self.to_dict()
        for key, value in parse_overrides(overrides).items():
            section, _, name = key.partition(".")
            if section not in merged or not name:
                raise ConfigError(f"unknown config key {key!r}{_suggest(key, flat_keys(RunConfig))}")
            if name not in merged[section]:
                raise ConfigError(f"unknown config key {key!r}{_suggest(key, flat_keys(RunConfig))}")
            merged[section][name] = value
        return from_dict(merged)


def flat_keys(cls=RunConfig) -> list[str]:
    """All dotted keys of a run config: ``data.name``, ``train.epochs``, ..."""
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cls) for f in dataclasses.fields(s.default_factory)]


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_overrides(overrides) -> dict:
    """``["train.epochs=3", ...]`` (values read as YAML) or a dict, as ``{dotted key: value}``."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = load_yaml(raw) if raw.strip() else ""
    return parsed


def _coerce(key: str, value, typ):
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
            value = [load_yaml(v) for v in value]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} needs a list of integers, got {value!r}")
        return tuple(_coerce(key, v, typing.get_args(typ)[0]) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    article = "an" if typ.__name__[0] in "aeiou" else "a"
    hint = " (write true or false)" if typ is bool and isinstance(value, str) else ""
    raise ConfigError(f"config key {key!r} needs {article} {typ.__name__}{hint}, got {value!r}")


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"unknown config key {prefix + k!r}{_suggest(prefix + k, flat_keys())}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            kwargs[f.name] = _build(typ, d[f.name], prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(prefix + f.name, d[f.name], typ)
    return cls(**kwargs)


def from_dict(d: dict) -> RunConfig:
    """Build a RunConfig from a nested dict, rejecting unknown keys and wrong types."""
    cfg = _build(RunConfig, d or {}, "")
    validate(cfg)
    return cfg


# What the registries above config implement, registered by each where it is defined (the
# quantization schemes and corrections in emq.quant; the norms, full-precision activations,
# architectures and blocks in emq.nn; the distillation modes, progressive recipes, optimizers,
# schedules, speed options and coreset scores and modes in emq.training), so that validate checks
# a config against the registry itself rather than a second list, and config imports nothing of
# emq but its errors and the profiles.
# Importing emq (which any ``import emq.<module>`` does first) registers them all.
_REGISTERED: dict[str, object] = {}


def register(key: str, value) -> None:
    """Make ``value`` (the allowed names of config key ``key``, or a check) known to :func:`validate`."""
    _REGISTERED[key] = value


def registered(key: str):
    """What the registry of ``key`` registered; a RuntimeError if its module was never imported."""
    if key not in _REGISTERED:
        raise RuntimeError(f"nothing registered the choices of {key!r}: import emq before validating configs")
    return _REGISTERED[key]


def validate(cfg: RunConfig) -> None:
    """Check values that types alone do not: names of choices, bit-widths, sizes."""
    check_bits, check_scheme_bits = registered("bits"), registered("scheme bits")
    choices = {
        "quant.weight_quantizer": cfg.quant.weight_quantizer,
        "quant.act_quantizer": cfg.quant.act_quantizer,
        "quant.norm": cfg.quant.norm,
        "quant.correction": cfg.quant.correction,
        "quant.fp_act": cfg.quant.fp_act,
        "train.distill": cfg.train.distill,
        "train.progressive": cfg.train.progressive,
        "model.arch": cfg.model.arch,
        "model.block": cfg.model.block,
        "train.optimizer": cfg.train.optimizer,
        "train.schedule": cfg.train.schedule,
        "train.amp": cfg.train.amp,
        "train.channels_last": cfg.train.channels_last,
        "train.compile": cfg.train.compile,
    }
    for key, value in choices.items():
        allowed = tuple(registered(key))
        if value not in allowed:
            raise ConfigError(f"config key {key!r} is {value!r}: use one of {', '.join(allowed)}")
    if not cfg.train.bits:
        raise ConfigError("config key 'train.bits' is empty: name at least one bit-width")
    for b in cfg.train.bits:
        try:
            check_bits(b)
        except ValueError as e:
            raise ConfigError(f"config key 'train.bits': {e}") from None
    if len(set(cfg.train.bits)) != len(cfg.train.bits):
        raise ConfigError(f"config key 'train.bits' repeats a bit-width: {cfg.train.bits}")
    for b in cfg.train.bits:
        try:
            check_scheme_bits(cfg.quant.weight_quantizer, b)
        except ValueError as e:
            raise ConfigError(f"config key 'train.bits': {e}") from None
    if not 0.0 <= cfg.train.stochastic_precision <= 1.0:
        raise ConfigError("config key 'train.stochastic_precision' must be in [0, 1], "
                          f"got {cfg.train.stochastic_precision}")
    if not 0 < cfg.quant.steepness_start <= cfg.quant.steepness_end:
        raise ConfigError("config keys 'quant.steepness_start' and 'quant.steepness_end' need "
                          f"0 < start <= end, got {cfg.quant.steepness_start} and {cfg.quant.steepness_end}")
    if not all(0.0 < m < 1.0 for m in cfg.train.milestones):
        raise ConfigError(f"config key 'train.milestones' needs fractions of train.epochs in (0, 1), "
                          f"got {cfg.train.milestones}")
    validate_block(cfg)
    positive = {"train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
                "model.depth": cfg.model.depth, "model.width": cfg.model.width,
                "train.kd_temperature": cfg.train.kd_temperature, "train.gamma": cfg.train.gamma,
                "train.eval_every": cfg.train.eval_every}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {value}")
    for key, value in {"data.train_size": cfg.data.train_size, "data.test_size": cfg.data.test_size,
                       "data.image_size": cfg.data.image_size}.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must be 0 (all) or positive, got {value}")
    validate_coreset(cfg)


def validate_block(cfg: RunConfig) -> None:
    """model.block 'any_precision' is upstream's pre-activation network: it needs model.preact."""
    if cfg.model.block == "any_precision" and not cfg.model.preact:
        raise ConfigError("model.block 'any_precision' is a pre-activation block: set model.preact=true")


def validate_coreset(cfg: RunConfig) -> None:
    """The coreset section: choices, a pruning ratio in [0, 1), a warm-up shorter than training."""
    c = cfg.coreset
    for key, (value, allowed) in {"coreset.score": (c.score, tuple(registered("coreset.score"))),
                                  "coreset.mode": (c.mode, tuple(registered("coreset.mode")))}.items():
        if value not in allowed:
            raise ConfigError(f"config key {key!r} is {value!r}: use one of {', '.join(allowed)}")
    if not 0.0 <= c.prune < 1.0:
        raise ConfigError(f"config key 'coreset.prune' is {c.prune}: the pruning ratio must be in [0, 1)")
    for key, value in {"coreset.warmup_epochs": c.warmup_epochs, "coreset.shard_offset": c.shard_offset}.items():
        if value < 0:
            raise ConfigError(f"config key {key!r} must be 0 or positive, got {value}")
    if c.every <= 0:
        raise ConfigError(f"config key 'coreset.every' must be positive, got {c.every}")
    if c.prune == 0:
        return
    if c.warmup_epochs >= cfg.train.epochs:
        raise ConfigError(f"config key 'coreset.warmup_epochs' is {c.warmup_epochs}: it must be below "
                          f"train.epochs ({cfg.train.epochs}) for pruning to happen")
    lightweight = tuple(registered("lightweight scores"))
    if c.mode == "lightweight" and c.score not in lightweight:
        raise ConfigError(f"coreset.mode 'lightweight' takes its scores from the training logits: use coreset.score "
                          f"{' or '.join(lightweight)}, not {c.score!r}")
    if c.mode == "lightweight" and c.warmup_epochs == 0:
        raise ConfigError("coreset.mode 'lightweight' needs coreset.warmup_epochs >= 1 to have scores to select by")
    if c.score == "shard" and c.class_balanced:
        raise ConfigError("coreset.score 'shard' cuts random blocks: it cannot be class_balanced")
    if cfg.train.distill == "joint":
        raise ConfigError("train.distill 'joint' trains its companion on the shared batch: it cannot be combined "
                          "with coreset pruning (coreset.prune > 0)")


def load_config(path: str | Path | None = None, overrides=None, profile: str | None = None) -> RunConfig:
    """Read a YAML config (or start from the defaults), apply a profile, then overrides."""
    d = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror or type(e).__name__})") from None
        try:
            d = load_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    cfg = from_dict(d)
    if profile is not None:
        cfg = apply_profile(cfg, profile)
    return cfg.with_overrides(overrides)


# What each profile sets in a config (emq.profiles, where the profiles' seeds and sizes all live).
PROFILES: dict[str, dict] = SCALES


def apply_profile(cfg: RunConfig, profile: str) -> RunConfig:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}: use one of {', '.join(PROFILES)}")
    return cfg.with_overrides(PROFILES[profile])
