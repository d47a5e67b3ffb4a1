"""Search spaces written in YAML, turned into an Optuna define-by-run function with conditional keys.

A search file's `space:` maps dotted run-config keys to distributions:

    space:
      optim.lr: {loguniform: [0.01, 0.2]}
      augmenter.name: {choice: [smart, rsg]}
      augmenter.smart.tau: {uniform: [0.1, 2.0], step: 0.1}   # sampled only when augmenter.name = smart
      augmenter.rsg.layer: {grid: [1, 2]}                       # every value is run (see below)

Nested mappings are the same keys (`optim: {lr: {...}}` is `optim.lr`), so `--set space.optim.lr=...`
works, and `--set space.optim.lr=null` removes a key from the search.

Conditional keys come from the config tree itself: a key inside a method's own section
(`augmenter.<method>.*`, `loss.<loss>.*`, any section of a registry-backed config) is only sampled when
that method is the chosen one, so Optuna's define-by-run records only parameters that mattered
(TPE then models each method's parameters separately). The selector (`augmenter.name`) is either
searched too or fixed by the base config; a key whose method can never be chosen is an error.

`grid` keys are enumerated rather than sampled: every cell of their product is run (`num_samples`
times), with the sampler filling in the other keys, which is Ray Tune's `grid_search` semantics. The
cells are handed to Optuna as enqueued trials with fixed parameters, because Optuna's GridSampler
needs one fixed space and cannot express conditional keys.

Bounds are checked with the run config's own validation, never re-encoded here: every corner of the
space (both ends of each range, every value of a choice or grid, in every combination of the chosen
methods) is built into a RunConfig and checked against the backbone (`engine.check_compatible`).
The rules are intervals (τ > 0, head_ratio in (0, 1), M >= 1, an existing insertion point), so a box
whose corners pass holds only valid configs, and a bad range fails before anything is launched.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

from ltsearch.config import RunConfig, build_run_config, get_dotted, set_dotted, to_dict
from ltsearch.errors import ConfigError

Scalar = bool | int | float | str | None
Point = dict[str, Any]

DISTRIBUTIONS: dict[str, type["Distribution"]] = {}


def _distribution(cls: type["Distribution"]) -> type["Distribution"]:
    DISTRIBUTIONS[cls.kind] = cls
    return cls


# ------------------------------------------------------------------------------------ distributions
class Distribution(ABC):
    """One key's distribution: how Optuna suggests it, its corners, its values when enumerated."""

    kind: ClassVar[str]
    #: enumerated into cells of their own (Ray's grid_search), not sampled
    enumerated: ClassVar[bool] = False

    @abstractmethod
    def suggest(self, trial: Any, name: str) -> Any:
        """Draw a value through an Optuna trial (or Ray's captor of one)."""

    @abstractmethod
    def corners(self) -> list[Any]:
        """Values that bound what `suggest` can return: both ends of a range, every value of a set."""

    @abstractmethod
    def values(self) -> list[Any] | None:
        """Every value, when there are finitely many (for the exhaustive grid sampler); else None."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """The YAML form, as a user writes it."""

    def clip(self, value: Any) -> Any:
        """The nearest value of the support (PBT multiplies values by 0.8/1.2 and may step outside the box)."""
        return value

    def describe(self) -> str:
        spec = self.spec()
        head = f"{self.kind} {spec[self.kind]}"
        return head + "".join(f", {k} {v}" for k, v in spec.items() if k != self.kind)


def _number(key: str, spec: Any, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"space.{key}", spec, f"{what} as a finite number, got {value!r}")
    return value


def _bounds(key: str, spec: dict, kind: str, *, integer: bool = False) -> tuple[Any, Any]:
    bounds = spec[kind]
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ConfigError(f"space.{key}", spec, f"{{{kind}: [low, high]}}, a list of two numbers")
    low, high = (_number(key, spec, b, "each bound") for b in bounds)
    if integer and not all(isinstance(b, int) or float(b).is_integer() for b in (low, high)):
        raise ConfigError(f"space.{key}", spec, f"integer bounds for {kind}, got low={low}, high={high}")
    if low > high:
        raise ConfigError(f"space.{key}", spec, f"`low <= high` to hold, but got (low={low}, high={high})")
    return (int(low), int(high)) if integer else (float(low), float(high))


def _step(key: str, spec: dict, *, integer: bool) -> Any:
    step = spec.get("step")
    if step is None:
        return 1 if integer else None
    step = _number(key, spec, step, "step")
    if step <= 0 or (integer and not float(step).is_integer()):
        raise ConfigError(f"space.{key}", spec, f"a step > 0{' and integral' if integer else ''}, got step={step}")
    return int(step) if integer else float(step)


@_distribution
@dataclass(frozen=True)
class Uniform(Distribution):
    """Float in [low, high]; with `step`, on the lattice low, low+step, ... (Optuna's discrete float)."""

    kind: ClassVar[str] = "uniform"
    low: float
    high: float
    step: float | None = None

    @classmethod
    def parse(cls, key: str, spec: dict) -> "Uniform":
        return cls(*_bounds(key, spec, cls.kind), step=_step(key, spec, integer=False))

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step)

    def corners(self) -> list[float]:
        return sorted({self.low, self.high})

    def clip(self, value: Any) -> float:
        value = min(max(float(value), self.low), self.high)
        return value if self.step is None else min(self.low + round((value - self.low) / self.step) * self.step, self.values()[-1])

    def values(self) -> list[float] | None:
        if self.step is None:
            return None
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def spec(self) -> dict[str, Any]:
        return {self.kind: [self.low, self.high], **({"step": self.step} if self.step is not None else {})}


@_distribution
@dataclass(frozen=True)
class LogUniform(Distribution):
    """Float in [low, high] with log density: the right prior for weights and rates spanning decades."""

    kind: ClassVar[str] = "loguniform"
    low: float
    high: float

    @classmethod
    def parse(cls, key: str, spec: dict) -> "LogUniform":
        if "step" in spec:
            raise ConfigError(f"space.{key}", spec, "no step with loguniform (Optuna cannot combine log and step)",
                              hint="Use {uniform: [a, b], step: s} or a {choice: [...]} of values.")
        low, high = _bounds(key, spec, cls.kind)
        if low <= 0:
            raise ConfigError(f"space.{key}", spec, f"`low > 0` for a log scale, but got low={low}")
        return cls(low, high)

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=True)

    def corners(self) -> list[float]:
        return sorted({self.low, self.high})

    def clip(self, value: Any) -> float:
        return min(max(float(value), self.low), self.high)

    def values(self) -> None:
        return None

    def spec(self) -> dict[str, Any]:
        return {self.kind: [self.low, self.high]}


@_distribution
@dataclass(frozen=True)
class IntRange(Distribution):
    """Integer in [low, high] (both included), on the lattice low, low+step, ..."""

    kind: ClassVar[str] = "int"
    low: int
    high: int
    step: int = 1

    @classmethod
    def parse(cls, key: str, spec: dict) -> "IntRange":
        return cls(*_bounds(key, spec, cls.kind, integer=True), step=_step(key, spec, integer=True))

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step)

    def corners(self) -> list[int]:
        return sorted({self.low, self.values()[-1]})

    def clip(self, value: Any) -> int:
        return min(max(self.low + round((value - self.low) / self.step) * self.step, self.low), self.values()[-1])

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def spec(self) -> dict[str, Any]:
        return {self.kind: [self.low, self.high], **({"step": self.step} if self.step != 1 else {})}


def _choices(key: str, spec: dict, kind: str) -> tuple[Scalar, ...]:
    if "step" in spec:
        raise ConfigError(f"space.{key}", spec, f"no step with {kind} (the values are listed)")
    values = spec[kind]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"space.{key}", spec, f"{{{kind}: [v1, v2, ...]}}, a non-empty list")
    for value in values:
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"space.{key}", spec, f"scalar values (numbers, strings, booleans, null), got {value!r}",
                              hint="Optuna's categorical parameters hold scalars only.")
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"space.{key}", spec, "distinct values")
    return tuple(values)


@_distribution
@dataclass(frozen=True)
class Choice(Distribution):
    """One of the listed values, chosen by the sampler (TPE learns which one pays)."""

    kind: ClassVar[str] = "choice"
    options: tuple[Scalar, ...]

    @classmethod
    def parse(cls, key: str, spec: dict) -> "Choice":
        return cls(_choices(key, spec, cls.kind))

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, self.options)

    def corners(self) -> list[Any]:
        return list(self.options)

    def values(self) -> list[Any]:
        return list(self.options)

    def spec(self) -> dict[str, Any]:
        return {self.kind: list(self.options)}


@_distribution
@dataclass(frozen=True)
class Grid(Choice):
    """Every listed value is run: each cell of the grid keys' product gets `num_samples` trials."""

    kind: ClassVar[str] = "grid"
    enumerated: ClassVar[bool] = True


def parse_distribution(key: str, spec: Any) -> Distribution:
    """`{uniform: [a, b]}`, `{loguniform: [a, b]}`, `{int: [a, b]}`, `{choice: [...]}`, `{grid: [...]}`; optional step."""
    kinds = [k for k in spec if k in DISTRIBUTIONS] if isinstance(spec, dict) else []
    if len(kinds) != 1:
        raise ConfigError(f"space.{key}", spec, f"one distribution: a mapping with exactly one of {sorted(DISTRIBUTIONS)} "
                          "(and an optional step), e.g. {loguniform: [0.01, 1.0]}")
    extra = [k for k in spec if k not in (kinds[0], "step")]
    if extra:
        raise ConfigError(f"space.{key}.{extra[0]}", spec[extra[0]], f"no other key beside '{kinds[0]}' than 'step'")
    return DISTRIBUTIONS[kinds[0]].parse(key, spec)


def _is_distribution(spec: Any) -> bool:
    return isinstance(spec, dict) and any(k in DISTRIBUTIONS for k in spec)


def flatten_space(raw: Any) -> dict[str, Any]:
    """Nested or dotted keys -> {dotted key: spec}, later entries winning (what `--set space.a.b=...` adds);
    a null drops the key and everything under it (`--set space.optim.lr=null`)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("space", raw, "a mapping of dotted config keys to distributions, e.g. space: {optim.lr: {loguniform: [0.01, 0.2]}}")
    out: dict[str, Any] = {}
    for dotted, spec in _entries(raw, ""):
        for existing in [k for k in out if k == dotted or k.startswith(dotted + ".")]:
            del out[existing]
        if spec is not None:
            out[dotted] = spec
    return out


def _entries(raw: dict, prefix: str) -> Iterator[tuple[str, Any]]:
    for key, spec in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(spec, dict) and not _is_distribution(spec):
            yield from _entries(spec, dotted)
        else:
            yield dotted, spec


# ------------------------------------------------------------------------------------------ the space
@dataclass(frozen=True)
class Condition:
    """`key` (a selector such as augmenter.name) must equal `value` for a parameter to be sampled."""

    key: str
    value: str


@dataclass(frozen=True)
class Param:
    """One searched key: its distribution, and the condition under which a trial samples it (None: always)."""

    key: str
    dist: Distribution
    condition: Condition | None = None


def _section_selectors() -> dict[str, str]:
    """{'augmenter': 'augmenter.name', 'loss': 'loss.name'}: config sections whose sub-sections belong to a chosen plug-in.

    Read from the config tree (sections backed by a registry), so a new kind of plug-in section needs no edit here.
    """
    hints = typing.get_type_hints(RunConfig)
    return {f.name: f"{f.name}.name" for f in dataclasses.fields(RunConfig) if hasattr(hints[f.name], "__sections__")}


def _condition_of(key: str, selectors: dict[str, str]) -> Condition | None:
    parts = key.split(".")
    if len(parts) < 3 or parts[0] not in selectors:
        return None
    hints = typing.get_type_hints(RunConfig)
    section_cls = hints[parts[0]]
    if parts[1] not in section_cls.__sections__.names():
        return None
    return Condition(selectors[parts[0]], parts[1])


@dataclass(frozen=True)
class SearchSpace:
    """Parameters in sampling order (selectors first, so conditions are decided before they are read).

    `fixed` holds the base config's value of every selector that is not searched, so a condition on
    it is known at parse time. The object is picklable: Ray Tune pickles the searcher (and with it
    `sample`) into the experiment checkpoint that `--resume` restores.
    """

    params: tuple[Param, ...]
    fixed: tuple[tuple[str, Any], ...] = ()

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def _active(self, param: Param, point: Point) -> bool:
        if param.condition is None:
            return True
        selected = point.get(param.condition.key, dict(self.fixed).get(param.condition.key))
        return selected == param.condition.value

    def sample(self, trial: Any) -> Point:
        """Optuna define-by-run: suggest every key whose condition holds, in order; no compute here."""
        point: Point = {}
        for param in self.params:
            if self._active(param, point):
                point[param.key] = param.dist.suggest(trial, param.key)
        return point

    def product(self, values: Callable[[Param], list[Any]], keep: Callable[[Param], bool] = lambda p: True) -> list[Point]:
        """Every combination of `values(param)` over the kept, active parameters (conditions respected, no duplicates)."""
        points: list[Point] = [{}]
        for param in self.params:
            if not keep(param):
                continue
            grown: list[Point] = []
            for point in points:
                if self._active(param, point):
                    grown.extend({**point, param.key: value} for value in values(param))
                else:
                    grown.append(point)
            points = grown
        return points

    def corners(self) -> list[Point]:
        return self.product(lambda p: p.dist.corners())

    def grid_cells(self, *, exhaustive: bool) -> list[Point]:
        """Cells that are run in full: the grid keys' product, or with `exhaustive` every key's values."""
        if exhaustive:
            for param in self.params:
                if param.dist.values() is None:
                    raise ConfigError(f"space.{param.key}", param.dist.spec(),
                                      "a distribution with finitely many values, since sampler 'grid' runs every combination",
                                      hint="Use {grid: [...]}, {choice: [...]}, {int: [a, b]} or {uniform: [a, b], step: s}, or another sampler.")
            return self.product(lambda p: p.dist.values())
        if not any(p.dist.enumerated for p in self.params):
            return []
        return self.product(lambda p: p.dist.values(), keep=lambda p: p.dist.enumerated)

    def describe(self) -> list[tuple[str, str, str]]:
        """(key, distribution, condition) rows for `ltsearch check`."""
        return [(p.key, p.dist.describe(), f"if {p.condition.key} = {p.condition.value}" if p.condition else "")
                for p in self.params]


def parse_space(raw: Any, base: dict, *, source: str | None = None) -> SearchSpace:
    """Build the space from the `space:` mapping; `base` is the raw run config it samples into (must be valid itself)."""
    specs = flatten_space(raw)
    full = to_dict(build_run_config(base, source=source))  # every key with its value, sections included
    selectors = _section_selectors()
    selector_keys = set(selectors.values())
    params = []
    for key, spec in specs.items():
        try:
            get_dotted(full, key)
        except KeyError:
            close = difflib.get_close_matches(key, _dotted_keys(full), n=1, cutoff=0.6)
            raise ConfigError(f"space.{key}", spec, "a key of the run config (a typo would be sampled into a key nothing reads)",
                              hint=(f"Did you mean '{close[0]}'? " if close else "") +
                              "Check the spelling; a method's parameters live under augmenter.<method>.<key>.",
                              source=source) from None
        params.append(Param(key, parse_distribution(key, spec), _condition_of(key, selectors)))
    params.sort(key=lambda p: p.key not in selector_keys)  # stable: selectors first, then file order
    searched = {p.key: p for p in params}
    fixed = tuple((key, get_dotted(full, key)) for key in sorted(selector_keys) if key not in searched)
    space = SearchSpace(tuple(params), fixed)
    for param in params:
        _check_condition(param, space, searched)
    return space


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    """Every leaf key of a plain config tree, dotted (`optim.schedule.milestones`)."""
    if not isinstance(tree, dict):
        return [prefix] if prefix else []
    keys = []
    for name, value in tree.items():
        keys += _dotted_keys(value, f"{prefix}.{name}" if prefix else str(name))
    return keys


def _check_condition(param: Param, space: SearchSpace, searched: dict[str, Param]) -> None:
    condition = param.condition
    if condition is None:
        return
    selector = searched.get(condition.key)
    possible = selector.dist.values() if selector is not None else [dict(space.fixed)[condition.key]]
    if condition.value not in possible:
        raise ConfigError(f"space.{param.key}", param.dist.spec(),
                          f"a key that some trial uses, but it is only sampled when {condition.key} = {condition.value} "
                          f"and {condition.key} is {possible[0] if selector is None else possible}",
                          hint=f"Set {condition.key}: {condition.value} in the base config, add it to the search, or drop the key.")
    if param.dist.enumerated and selector is not None and not selector.dist.enumerated:
        raise ConfigError(f"space.{param.key}", param.dist.spec(),
                          f"a grid key whose condition is decided by a grid too, but {condition.key} is sampled ({selector.dist.describe()})",
                          hint=f"Make {condition.key} a {{grid: [...]}}, or make {param.key} a {{choice: [...]}}.")


# ---------------------------------------------------------------------------------------- applying
def apply_point(base: dict, point: Point) -> dict:
    """The raw run config of one trial: the base with the sampled values written into their dotted keys."""
    raw = copy.deepcopy(base)
    for key, value in point.items():
        set_dotted(raw, key, value)
    return raw


@dataclass(frozen=True)
class SpaceCheck:
    """What validating a space found: how many corners were built and checked, the longest run among them,
    and the most epochs any run trains after its method's start epoch (what schedulers count)."""

    corners: int
    max_epochs: int
    max_active_epochs: int


def validate_space(space: SearchSpace, base: dict, *, source: str | None = None) -> SpaceCheck:
    """Build and check every corner of the space with the run config's own rules.

    Raises ConfigError naming the space key whose range reaches outside what the config accepts.
    """
    from ltsearch.engine import active_epochs, check_compatible  # backbone-dependent checks; imports torch, so only when validating

    corners = space.corners()
    max_epochs = max_active = 0
    for point in corners:
        try:
            config = build_run_config(apply_point(base, point))
            check_compatible(config)
        except ConfigError as error:
            blamed = error.key if error.key in point else next(iter(point), error.key)
            param = next((p for p in space.params if p.key == blamed), None)
            at = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"space.{blamed}", param.dist.spec() if param else point.get(blamed),
                              f"a range the run config accepts everywhere, but at ({at}) it rejects "
                              f"'{error.key}' = {error.value!r}, which must be {error.expected}",
                              hint=f"Narrow the range of {blamed} (or change the base config).", source=source) from None
        max_epochs = max(max_epochs, config.train.epochs)
        max_active = max(max_active, active_epochs(config, config.train.epochs))
    return SpaceCheck(corners=len(corners), max_epochs=max_epochs, max_active_epochs=max_active)


__all__ = ["DISTRIBUTIONS", "Distribution", "Uniform", "LogUniform", "IntRange", "Choice", "Grid", "Condition", "Param",
           "SearchSpace", "SpaceCheck", "parse_distribution", "parse_space", "flatten_space", "apply_point", "validate_space"]
