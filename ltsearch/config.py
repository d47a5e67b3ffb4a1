"""The typed run-config tree: YAML loading, `--set dotted.key=value` overrides and eager validation.

One dataclass per concern (data, model, loss, augmenter, optim, train), as Ray Tune splits what to
search from how to run. Loss and augmenter sections are open: each registered loss/augmenter brings
its own dataclass (`loss.ldam`, `augmenter.smart`, ...), so adding a method never edits this file.

Every value is checked before anything runs; a bad one raises `ConfigError` naming the dotted key,
the value and what is allowed (the CLI turns it into one line and exit code 2).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ltsearch import _checks as check
from ltsearch.errors import ConfigError
from ltsearch.registry import AUGMENTERS, BACKBONES, DATASETS, LOSSES, SAMPLERS, Registry


# --------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Which images, how they are made long-tailed, and how val/test are split off.

    `val_source: test` holds out the first `val_fraction` of each class of the official test split
    (M2m's protocol); `val_source: train` holds it out of the full training pool before the long-tail
    construction, so the val classes stay balanced. Selection never sees test images.
    `construction` names the paper whose subset is reproduced exactly (ldam, rsg, m2m; see data/longtail.py).
    """

    name: str = "digits"
    root: str = "data"
    profile: Literal["exp", "step"] = "exp"
    imbalance: float = 10.0
    construction: Literal["ldam", "rsg", "m2m"] = "ldam"
    seed: int = 0
    val_source: Literal["test", "train"] = "test"
    val_fraction: float = 0.1
    max_train_per_class: int | None = None
    max_eval_per_class: int | None = None
    image_size: int | None = None
    augment: Literal["standard", "none"] = "standard"
    placement: Literal["auto", "device", "loader"] = "auto"
    workers: int = 4
    download: bool = False
    train_list: str | None = None
    val_list: str | None = None
    test_list: str | None = None
    path: str | None = None

    def validate(self, where: str) -> None:
        check.registered(f"{where}.name", self.name, DATASETS)
        check.number(f"{where}.imbalance", self.imbalance, low=1.0, what="the ratio n_max / n_min (1 = balanced)")
        check.number(f"{where}.val_fraction", self.val_fraction, low=0.0, high=1.0, high_open=True)
        check.number(f"{where}.seed", self.seed, low=0)
        check.number(f"{where}.workers", self.workers, low=0)
        if self.construction == "m2m" and self.profile != "exp":
            raise ConfigError(f"{where}.construction", self.construction, f"'ldam' or 'rsg' with profile '{self.profile}' (M2m's code builds only the exp profile)",
                              hint=f"Set {where}.profile=exp, or choose another construction.")
        for key in ("max_train_per_class", "max_eval_per_class", "image_size"):
            value = getattr(self, key)
            if value is not None:
                check.number(f"{where}.{key}", value, low=1)


# -------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Backbone by registered name; `classifier: auto` picks the cosine head when the loss asks for it (LDAM)."""

    name: str = "small_cnn"
    classifier: Literal["auto", "linear", "cosine"] = "auto"
    weights: str | None = None
    width: int = 32

    def validate(self, where: str) -> None:
        check.registered(f"{where}.name", self.name, BACKBONES)
        check.number(f"{where}.width", self.width, low=1)
        if self.weights is not None and not Path(self.weights).is_file():
            raise ConfigError(f"{where}.weights", self.weights, "a path to an existing weights file (nothing is downloaded)")


# --------------------------------------------------------------------------------------------- loss
@dataclass
class ReweightConfig:
    """Deferred re-weighting (DRW, Cao et al. 2019): class weights switch on at `start_epoch` (0-indexed).

    `effective_number` uses w_c ∝ (1-β)/(1-β^{n_c}) (Cui et al. 2019), `inverse` uses 1/n_c; both are
    normalised to sum to the number of classes.
    """

    kind: Literal["none", "effective_number", "inverse"] = "none"
    beta: float = 0.9999
    start_epoch: int = 0

    def validate(self, where: str) -> None:
        check.number(f"{where}.beta", self.beta, low=0.0, high=1.0, high_open=True)
        check.number(f"{where}.start_epoch", self.start_epoch, low=0)


@dataclass
class ResampleConfig:
    """Deferred re-sampling (DRS): the training sampler switches to `sampler` at `start_epoch` (0-indexed)."""

    sampler: str = "instance"
    start_epoch: int = 0

    def validate(self, where: str) -> None:
        check.registered(f"{where}.sampler", self.sampler, SAMPLERS)
        check.number(f"{where}.start_epoch", self.start_epoch, low=0)


@dataclass
class LossConfig:
    """Classification loss by registered name; each loss's parameters live in its own sub-section."""

    __sections__: typing.ClassVar[Registry] = LOSSES

    name: str = "ce"
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        return _section(self, name)

    def validate(self, where: str) -> None:
        check.registered(f"{where}.name", self.name, LOSSES)


# ---------------------------------------------------------------------------------------- augmenter
@dataclass
class AugmenterConfig:
    """Feature/sample augmenter by registered name, shared knobs, and one sub-section per method.

    `insert_at` is a stage boundary of the backbone (0 = the input); `start_epoch` is T_th (idle
    before it); `head_ratio` is γ, the fraction of classes (most frequent first) treated as head.
    `None` for the last three means "the method's paper default".
    """

    __sections__: typing.ClassVar[Registry] = AUGMENTERS

    name: str = "none"
    insert_at: int | None = None
    start_epoch: int | None = None
    head_ratio: float | None = None
    sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:
        return _section(self, name)

    def validate(self, where: str) -> None:
        check.registered(f"{where}.name", self.name, AUGMENTERS)
        if self.insert_at is not None:
            check.integer(f"{where}.insert_at", self.insert_at)  # range depends on the backbone: checked in engine
        if self.start_epoch is not None:
            check.number(f"{where}.start_epoch", self.start_epoch, low=0)
        if self.head_ratio is not None:
            check.number(f"{where}.head_ratio", self.head_ratio, low=0.0, high=1.0, low_open=True, high_open=True)


# -------------------------------------------------------------------------------------------- optim
@dataclass
class ScheduleConfig:
    """Per-epoch learning-rate schedule: linear warmup, then step or cosine.

    Warmup follows LDAM-DRW: with e = epoch + 1, lr = base·e/warmup_epochs for e ≤ warmup_epochs.
    `step`: after epoch index m_i (0-indexed, i.e. from epoch m_i + 1 on) the lr is base·factors[i]
    (absolute multipliers, not cumulative), so the LDAM recipe is milestones [160, 180],
    factors [0.01, 0.0001]. `cosine` anneals from base to base·min_factor over the post-warmup epochs.
    """

    name: Literal["step", "cosine", "constant"] = "step"
    warmup_epochs: int = 0
    milestones: list[int] = field(default_factory=list)
    factors: list[float] = field(default_factory=list)
    min_factor: float = 0.0

    def validate(self, where: str) -> None:
        check.number(f"{where}.warmup_epochs", self.warmup_epochs, low=0)
        for index, milestone in enumerate(self.milestones):
            check.number(f"{where}.milestones[{index}]", milestone, low=0)
        if len(self.milestones) != len(self.factors):
            raise ConfigError(f"{where}.factors", self.factors, f"one factor per milestone ({len(self.milestones)} milestones: {self.milestones})")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"{where}.milestones", self.milestones, "epoch indices in increasing order")
        for i, factor in enumerate(self.factors):
            check.number(f"{where}.factors[{i}]", factor, low=0.0, low_open=True)
        check.number(f"{where}.min_factor", self.min_factor, low=0.0, high=1.0)


@dataclass
class OptimConfig:
    """SGD hyperparameters (the optimiser every paper here uses) and the batch size.

    `grad_clip` bounds the gradient norm of the backbone and, separately, of the augmenter's own modules
    (off by default, as in every reference recipe). It keeps methods with unbounded ratio losses (SAFA's
    mode seeking, Eq. 7) finite at high learning rates without letting their gradients shrink the backbone's.
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    batch_size: int = 128
    grad_clip: float | None = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self, where: str) -> None:
        check.number(f"{where}.lr", self.lr, low=0.0, low_open=True)
        check.number(f"{where}.momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check.number(f"{where}.weight_decay", self.weight_decay, low=0.0)
        check.number(f"{where}.batch_size", self.batch_size, low=1)
        if self.grad_clip is not None:
            check.number(f"{where}.grad_clip", self.grad_clip, low=0.0, low_open=True, what="max global L2 norm of the gradient")


# -------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """Length, seed and device of one run. `seed` drives init, sampling and augmentation (not the split).

    `init_from` warm-starts the backbone's weights (only) from a finished run, e.g. to switch a method
    on over a trained network at a decayed lr.

    `select_epochs` says which epochs the best-val epoch is chosen from: `active` (default) those where the
    method acts, epoch >= its start epoch T (every epoch for a run without a method), so a method's reported
    result is never an epoch of the trunk it shares with its baseline; `all` every epoch (the rule before;
    an ablation matrix then marks a cell whose selected epoch precedes its method's start)."""

    epochs: int = 10
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    channels_last: bool = True
    eval_batch_size: int = 512
    threads: int | None = None
    select_metric: str = "val/top1"
    select_epochs: Literal["active", "all"] = "active"
    init_from: str | None = None

    def validate(self, where: str) -> None:
        if self.init_from is not None and not (Path(self.init_from).is_file() or (Path(self.init_from) / "checkpoint.pt").is_file()):
            raise ConfigError(f"{where}.init_from", self.init_from, "a run directory holding checkpoint.pt, or a checkpoint file",
                              hint="Train the starting network first (ltsearch train ... --out DIR), then pass DIR.")
        check.number(f"{where}.epochs", self.epochs, low=1)
        check.number(f"{where}.seed", self.seed, low=0)
        check.number(f"{where}.eval_batch_size", self.eval_batch_size, low=1)
        if not self.select_metric.startswith("val/"):
            raise ConfigError(f"{where}.select_metric", self.select_metric, "a validation metric such as 'val/top1' or 'val/bacc'",
                              hint="Selecting on test leaks the test set; the best-test number is reported as legacy/best_test_top1.")
        if self.threads is not None:
            check.number(f"{where}.threads", self.threads, low=1)


# ---------------------------------------------------------------------------------------------- run
@dataclass
class RunConfig:
    """One training run: everything `engine.fit` needs, nothing about search or tracking.

    Checks that need the backbone's shape (insert_at) run in `engine.check_compatible`.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augmenter: AugmenterConfig = field(default_factory=AugmenterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ================================================================================ generic machinery
def _section(config: Any, name: str) -> Any:
    if name.startswith("_") or name == "sections":
        raise AttributeError(name)
    sections = config.__dict__.get("sections", {})
    if name in sections:
        return sections[name]
    raise AttributeError(f"{type(config).__name__} has no field or section '{name}'")


def build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass `cls` from a plain mapping, rejecting unknown keys and wrong types, then validate."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(where, raw, f"a mapping of keys for section '{where}'")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "sections"}
    registry: Registry | None = getattr(cls, "__sections__", None)
    section_names = registry.names() if registry is not None else []
    unknown = [key for key in raw if key not in fields and key not in section_names]
    if unknown:
        allowed = sorted(fields) + section_names
        raise ConfigError(f"{where}.{unknown[0]}" if where else str(unknown[0]), raw[unknown[0]], f"a known key here; allowed keys: {allowed}",
                          hint="Check the spelling, or remove the key.", choices=allowed)
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], key)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build(hints[name], {}, key)  # defaults get their sections and checks too
    instance = cls(**kwargs)
    if registry is not None:
        for section in section_names:
            section_cls = registry.get(section).config
            if section_cls is not None:
                instance.sections[section] = build(section_cls, raw.get(section), f"{where}.{section}")
            elif section in raw and raw[section]:
                raise ConfigError(f"{where}.{section}", raw[section], f"nothing: {registry.kind} '{section}' takes no parameters")
    if hasattr(instance, "validate"):
        instance.validate(where)
    return instance


def _coerce(annotation: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as error:
                errors.append(error.expected)
        raise ConfigError(key, value, " or ".join(errors + (["null"] if type(None) in args else [])))
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, value, f"one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        item = args[0] if args else Any
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, key)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, value, "an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        if not math.isfinite(value):
            raise ConfigError(key, value, "a finite number (not nan or inf)")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {key}")


def to_dict(config: Any, *, active_only: bool = False) -> Any:
    """Plain-data view of a config tree (sections inlined), suitable for YAML, MLflow params and Ray.

    `active_only` keeps only the section of the selected loss/augmenter (`augmenter.smart` when
    `augmenter.name` is smart): what a run actually used, as tracking shows it. Without it every
    registered method's section is kept, so the YAML reruns with any `--set augmenter.name=...`.
    """
    if dataclasses.is_dataclass(config):
        out = {f.name: to_dict(getattr(config, f.name), active_only=active_only) for f in dataclasses.fields(config) if f.name != "sections"}
        for name, section in getattr(config, "sections", {}).items():
            if not active_only or name == getattr(config, "name", None):
                out[name] = to_dict(section, active_only=active_only)
        return out
    if isinstance(config, (list, tuple)):
        return [to_dict(v, active_only=active_only) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v, active_only=active_only) for k, v in config.items()}
    return config


# ----------------------------------------------------------------------------------- raw dict layer
class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-3` as a string, which every lr breaks on."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as a YAML scalar or list)."""
    if "=" not in text:
        raise ConfigError("--set", text, "the form dotted.key=value, e.g. --set optim.lr=0.05",
                          hint="A file or other argument goes before --set, which takes every KEY=VALUE after it.")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", text, "the form dotted.key=value with a non-empty dotted key, e.g. --set optim.lr=0.05")
    try:
        value = load_yaml_text(value_text) if value_text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(key, value_text, f"a YAML scalar or list ({error.__class__.__name__})") from None
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: depth + 1]), child, f"a section (mapping) so that '{key}' can be set")
        node = child
    node[parts[-1]] = value


def get_dotted(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def merge(base: dict, update: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in `update` replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def yaml_error_line(source: str, error: yaml.YAMLError) -> str:
    """One line, `file:line:col: problem` (1-based), from PyYAML's multi-line error text."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    text = " ".join((str(problem) + (f" ({context})" if context else "")).split())
    return f"{where}: not valid YAML: {text}"


def load_yaml_file(path: Path) -> Any:
    """A file's YAML (None when empty); unreadable, not UTF-8 or not YAML, it is one line naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError("file", str(path), f"a UTF-8 text file (byte {error.start} is not UTF-8)") from None
    except OSError as error:
        raise ConfigError("file", str(path), f"a readable file ({error.strerror or error})") from None
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as error:
        raise ConfigError("file", str(path), "valid YAML", message=yaml_error_line(str(path), error)) from None


def read_saved(path: Path, key: str) -> dict:
    """A file ltsearch saved in a directory it wrote (sweep.yaml, ablation.yaml) as a mapping; edited, cut short or
    emptied since, it is one line naming the file, under `key` (the argument that named the directory)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(key, str(path.parent), "valid YAML", message=yaml_error_line(str(path), error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(key, str(path.parent), f"a readable {path.name} ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(key, str(path.parent), f"a directory whose {path.name} is the mapping ltsearch wrote, but {path} is "
                          + ("empty" if raw is None else "not a mapping"))
    return raw


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping, following `base: other.yaml` or `base: [a.yaml, b.yaml]` (relative to the file).

    A file that is missing, a directory, empty, unreadable, not UTF-8, not YAML or not a mapping is refused
    with one line naming it; so is a `base:` chain that comes back to a file it started from.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError("file", str(path), "a YAML file, not a directory")
    if not path.is_file():
        raise ConfigError("file", str(path), "an existing YAML file")
    here = path.resolve()
    if here in _chain:
        cycle = " -> ".join(p.name for p in (*_chain[_chain.index(here):], here))
        raise ConfigError("base", str(path), f"a chain of base files without a cycle, but it loops: {cycle}", source=str(_chain[-1]))
    raw = load_yaml_file(path)
    if raw is None:
        raise ConfigError("file", str(path), "a YAML mapping, but the file is empty (or only comments)")
    if not isinstance(raw, dict):
        raise ConfigError("file", str(path), "a YAML mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError("base", base, "a path (or list of paths) to other YAML files, relative to this one", source=str(path))
    merged: dict = {}
    for parent in bases:  # later bases override earlier ones; this file overrides them all
        merged = merge(merged, read_yaml(path.parent / parent, (*_chain, here)))
    return merge(merged, raw)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    out = copy.deepcopy(raw)
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(out, key, value)
    return out


RUN_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig))


def with_threads(raw: dict, cpus: float) -> dict:
    """`raw` with torch threads = the run's CPUs unless set: what a trial or an ablation cell runs with, so
    concurrent runs do not oversubscribe the cores and a run's arithmetic (its prefix key included) is the same
    whether it is planned (`--dry-run`), trained under Ray, or rerun from its config."""
    raw.setdefault("train", {})
    if raw["train"].get("threads") is None:
        raw["train"]["threads"] = max(1, int(cpus))
    return raw


def build_run_config(raw: dict, *, source: str | None = None) -> RunConfig:
    """Validate a raw mapping into a RunConfig; errors name `source` (the file, or '--set')."""
    try:
        return build(RunConfig, raw, "")
    except ConfigError as error:
        raise error.with_source(source) if source and not error.source else error


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The one entry point for a run config: YAML file (optional) + `--set` overrides -> validated tree."""
    from ltsearch.tracking.settings import split_tracking  # a run file may say where it is tracked; that is not the run

    source = str(path) if path is not None else None
    raw, _ = split_tracking(apply_overrides(read_yaml(path) if path is not None else {}, overrides), source=source)
    return build_run_config(raw, source=source)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
