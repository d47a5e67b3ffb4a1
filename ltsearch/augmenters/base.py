"""The augmenter interface: one small plug-in base class the engine talks to, and a registry.

The backbone is a sequence of stages; the engine runs stages up to the insertion boundary k, hands
the feature map and labels to the augmenter, and runs the remaining stages on what comes back:

    feats  = model.forward_until(k, x)
    out    = augmenter(feats, labels, state)
    logits = model.forward_from(k, out.feats)
    loss   = cls_weight * cls_loss(logits, out.labels, out.sample_weights)
             + sum(loss_weights[name] * term for name, term in out.aux_losses.items())

An augmenter therefore may append generated samples (RSG, SAFA), replace inputs (M2m at k = 0),
re-weight samples (SMART's ω) and add named auxiliary losses whose weights are config keys, so a
weight of 0 removes the term (ablations) and every λ is searchable. It is an `nn.Module`: learnable
parts are trained by the engine's optimiser, buffers and `get_extra_state` travel in checkpoints.
It is idle before `start_epoch` (T_th); at evaluation only `eval_transform` runs (identity unless the
method's module is part of the test-time network, as LCReg's decoder).

A method registers itself with

    @AUGMENTERS.register("smart", config=SmartConfig,
                         defaults={"insert_at": -1, "start_fraction": 0.0, "head_ratio": 0.5})
    class Smart(Augmenter): ...

`defaults` are the paper's: `insert_at` may count from the end (-1 = the last feature map, before
pooling), `start_fraction` is T_th as a fraction of `train.epochs` (RSG: 160/200 = 0.8).
`before_start=BeforeStart(...)` declares what of the method can change epochs [0, T_th): runs that
agree on everything else share one training prefix (see `ltsearch.prefix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from ltsearch._runtime import RngStream, derived_seed
from ltsearch.errors import ConfigError
from ltsearch.registry import AUGMENTERS

if TYPE_CHECKING:
    from ltsearch.config import RunConfig


@dataclass(frozen=True)
class FeatureSpec:
    """Shape of one sample's feature map at the insertion boundary (the input image when k = 0)."""

    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class BeforeStart:
    """What of a method can change training before its activation epoch T (`start_epoch`).

    `keys` are config keys under `augmenter.` (e.g. "rsg.num_centers", "insert_at", "head_ratio",
    "start_epoch") that change any epoch before T: the loss, the samples, the backbone's gradients, or
    the method's own modules, buffers and random stream. Every other key of the method only acts from
    T on, so runs differing only in those share epochs [0, T) bit for bit and train them once.
    `trains` is True when the method's own state changes before T (RSG's centres learn from epoch 0):
    a forked run then takes the method's modules, optimiser slots and random stream from the prefix,
    otherwise it keeps its own freshly built ones. The exactness tests (tests/test_prefix_exact.py)
    change every key not declared here and fail if that changes a forked run.
    An undeclared method counts every key as pre-T (safe: it only shares with identical configs).
    """

    keys: tuple[str, ...] = ()
    trains: bool = False


@dataclass
class AugmenterContext:
    """Everything an augmenter may need at construction; built once per run by the engine.

    `head_mask[c]` is True for the round(γ·C) most frequent classes (γ = head_ratio, ties broken by
    class index, at least one head and one tail class). `reference_model` builds (or loads from the
    on-disk cache) a classifier trained by plain ERM on the same data, model and seed — M2m's g; it
    is a callable so that only methods that need it pay for it.
    """

    config: "RunConfig"
    insert_at: int
    start_epoch: int
    head_ratio: float
    feature: FeatureSpec
    num_classes: int
    class_counts: torch.Tensor
    head_mask: torch.Tensor
    device: torch.device
    cache_dir: Path
    input_range: tuple[float, float] = (0.0, 1.0)
    reference_model: Any = None


@dataclass
class TrainState:
    """Where training is, handed to the augmenter on every step.

    `model` is the backbone being trained (its `classifier` holds W, b; `forward_from(k, h)` gives
    logits for any features at boundary k). `epoch` and `step` are 0-indexed.
    """

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    model: nn.Module
    class_weights: torch.Tensor | None = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def progress(self) -> float:
        """t / T over all iterations, e.g. for ISDA/LCReg's λ = (t/T)·λ0."""
        return self.step / max(1, self.total_steps)


class DiagnosticMeter:
    """Per-epoch diagnostics of an augmenter, accumulated on the device and read once per epoch.

    A method calls `add` (running sum: samples generated, attempts, accepted), `mean` (e.g. mean ω,
    optionally over a mask of the samples it concerns), `low`/`high` (min/max) from its step; values
    stay device tensors and masks are applied with `torch.where`, so recording costs no host sync.
    `collect()` reads them all back in one transfer at the end of the epoch and resets; a name that
    was never recorded this epoch is absent (an idle method reports nothing), and so is a mean over
    no samples, with its extremes (a mean of nothing is not 0).
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._lows: dict[str, torch.Tensor] = {}
        self._highs: dict[str, torch.Tensor] = {}

    @staticmethod
    def _value(value: torch.Tensor | float) -> torch.Tensor:
        return value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))

    @staticmethod
    def _accumulate(store: dict[str, torch.Tensor], name: str, value: torch.Tensor, combine) -> None:
        store[name] = combine(store[name], value) if name in store else value

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Sum `value` (a scalar, or the sum of a tensor) into `name` over the epoch."""
        self._accumulate(self._sums, name, self._value(value).sum(), torch.add)

    def mean(self, name: str, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Average of the elements of `values` (those where `where` is True) recorded under `name` this epoch,
        with `<name>_min` and `<name>_max`."""
        values = self._value(values).reshape(-1)
        mask = torch.ones_like(values, dtype=torch.bool) if where is None else where.reshape(-1).expand_as(values)
        self.add(name, torch.where(mask, values, 0.0))
        self._accumulate(self._counts, name, mask.sum().float(), torch.add)
        if values.numel() == 0:  # nothing to bound; the count stays 0 and collect() leaves the mean out
            return
        self.low(f"{name}_min", torch.where(mask, values, math.inf))
        self.high(f"{name}_max", torch.where(mask, values, -math.inf))

    def low(self, name: str, value: torch.Tensor | float) -> None:
        self._accumulate(self._lows, name, self._value(value).amin(), torch.minimum)

    def high(self, name: str, value: torch.Tensor | float) -> None:
        self._accumulate(self._highs, name, self._value(value).amax(), torch.maximum)

    def collect(self) -> dict[str, float]:
        """Everything recorded since the last call, as floats (one host transfer), then reset."""
        stores = {"sum": self._sums, "count": self._counts, "low": self._lows, "high": self._highs}
        keys = [(kind, name) for kind, store in stores.items() for name in store]
        if not keys:
            return {}
        device = next(iter(stores[keys[0][0]].values())).device
        numbers = torch.stack([stores[kind][name].to(device) for kind, name in keys]).cpu().tolist()
        read = dict(zip(keys, numbers))
        self.__init__()
        empty = {name for (kind, name), value in read.items() if kind == "count" and value == 0}
        empty |= {f"{name}_{end}" for name in empty for end in ("min", "max")}
        result = {}
        for (kind, name), value in read.items():
            if kind == "count" or name in empty:
                continue
            count = read.get(("count", name))
            result[name] = value / count if kind == "sum" and count is not None else value
        return result


@dataclass
class AugmentOutput:
    """What an augmenter returns: features (maybe extended), labels, optional weights, named raw loss terms."""

    feats: torch.Tensor
    labels: torch.Tensor
    sample_weights: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[index]` along dim 0, with a gradient that sums in the same order every run on CPU.

    The backward of `tensor[index]` adds the output gradient into `tensor`'s rows with atomic adds spread over
    torch's threads once the tensor is large enough to split (torch.use_deterministic_algorithms lists it), so
    where `index` repeats (class rows picked by labels, one source used for several samples) the float sum
    changes from run to run on 2+ threads. index_select's backward (index_add) adds in index order. The forward
    values are the same. Use it wherever a parameter or a differentiable map is gathered with repeats.
    """
    return tensor.index_select(0, index)


def head_class_mask(class_counts: torch.Tensor, head_ratio: float) -> torch.Tensor:
    """Boolean mask of head classes: the round(γ·C) most frequent (stable on ties), clipped to [1, C-1]."""
    num_classes = class_counts.numel()
    num_head = min(max(int(round(head_ratio * num_classes)), 1), num_classes - 1)
    order = sorted(range(num_classes), key=lambda c: (-int(class_counts[c]), c))
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[order[:num_head]] = True
    return mask


class Augmenter(nn.Module):
    """Base class: identity everywhere, so a method overrides only what it changes.

    Subclasses implement `augment` (active phase, epoch >= start_epoch) and may override
    `before_start` (e.g. RSG trains its centres before T_th), `sampler` (which training sampler the
    method needs this epoch), `loss_weights` and the epoch hooks.
    """

    #: True for methods that work on images (boundary 0 only); the others sit at any later boundary
    input_only: ClassVar[bool] = False
    #: diagnostics shown on `ltsearch train`'s progress line (all of them go to history and sweep results)
    progress_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: AugmenterContext):
        super().__init__()
        self.context = context
        self.insert_at = context.insert_at
        self.start_epoch = context.start_epoch
        self.num_classes = context.num_classes
        self.register_buffer("class_counts", context.class_counts.clone().long(), persistent=False)
        self.register_buffer("head_mask", context.head_mask.clone().bool(), persistent=False)
        self.diagnostics = DiagnosticMeter()
        #: the method's own random stream: the engine runs the step and the epoch hook inside `rng.active()`
        self.rng = RngStream(derived_seed(context.config.train.seed, "augmenter"), context.device)

    # ------------------------------------------------------------------ what the engine calls
    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch

    @property
    def selection_start(self) -> int:
        """The first epoch where a run's result shows the method (`train.select_epochs: active`): T_th."""
        return self.start_epoch

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        if self.active(state.epoch):
            return self.augment(feats, labels, state)
        return self.before_start(feats, labels, state)

    def sampler(self, epoch: int) -> str | None:
        """Name of the training sampler this method needs in `epoch`, or None to leave the choice to the loss schedule."""
        return None

    @property
    def loss_weights(self) -> dict[str, float]:
        """Weight of each named auxiliary loss term, read from the method's config section."""
        return {}

    @property
    def cls_weight(self) -> float:
        """Weight of the classification loss (LCReg's γ; 1 for the others)."""
        return 1.0

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first step of every training epoch (e.g. to freeze a module after T_th)."""

    def epoch_diagnostics(self) -> dict[str, float]:
        """What the method did this epoch (samples generated, accepted, weights...), read once at its end.

        Default: everything recorded through `self.diagnostics`. Override to add derived values (rates,
        chance levels) on top of `super().epoch_diagnostics()`. The engine stores them as `aug/<name>`.
        """
        return self.diagnostics.collect()

    def eval_transform(self, feats: torch.Tensor) -> torch.Tensor:
        """Features at the insertion point at evaluation time. Identity: most methods are training-only.

        LCReg overrides it because its decoder is part of the network that makes the final prediction.
        """
        return feats

    def trainable_parameters_filter(self, epoch: int) -> Callable[[str], bool] | None:
        """Which backbone parameters (by name) train in `epoch`; None = all. For decoupled second stages."""
        return None

    # ------------------------------------------------------------------ what a method overrides
    def augment(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        return AugmentOutput(feats, labels)

    def before_start(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        return AugmentOutput(feats, labels)


@AUGMENTERS.register("none", defaults={"insert_at": -1, "start_fraction": 0.8, "head_ratio": 0.5},
                     before_start=BeforeStart(keys=(), trains=False))
class NoAugmenter(Augmenter):
    """Plain training: the engine's baseline, so runs with and without a method share one code path.

    It never acts, so its "start epoch" only says where a baseline leaves a shared trunk (`ltsearch.prefix`):
    by default 160/200 of the epochs, the T_th at which the deferred methods (RSG, SAFA, M2m) switch on, so
    the baseline row of an ablation forks from their trunk instead of training [0, T) again. It selects its
    best epoch from all of them (`selection_start` 0): there is no method to wait for.
    """

    @property
    def selection_start(self) -> int:
        return 0


def resolve_insert_at(name: str, insert_at: int | None, num_boundaries: int, input_only: bool) -> int:
    """Turn the configured (or paper-default) boundary into an index in [0, num_boundaries), or fail clearly."""
    value = insert_at if insert_at is not None else AUGMENTERS.get(name).meta["defaults"]["insert_at"]
    index = value + num_boundaries if value < 0 else value
    allowed = [0] if input_only else list(range(1, num_boundaries))
    if index not in allowed:
        raise ConfigError("augmenter.insert_at", value,
                          f"a stage boundary that '{name}' supports on this backbone: one of {allowed} (or counted from the end, -1 = last)",
                          hint="0 is the input; the last index is the final feature map before pooling.")
    return index


def resolve_start_epoch(name: str, start_epoch: int | None, epochs: int) -> int:
    if start_epoch is not None:
        return start_epoch
    return int(math.floor(AUGMENTERS.get(name).meta["defaults"]["start_fraction"] * epochs))


def resolve_head_ratio(name: str, head_ratio: float | None) -> float:
    return head_ratio if head_ratio is not None else AUGMENTERS.get(name).meta["defaults"]["head_ratio"]


def create_augmenter(context: AugmenterContext) -> Augmenter:
    """Build the configured method from the registry; the engine never names a method.

    Construction draws (initial weights) come from a stream of their own, so a method's size (a
    post-T knob such as a hidden width) never shifts the backbone's random numbers.
    """
    name = context.config.augmenter.name
    with RngStream(derived_seed(context.config.train.seed, "augmenter-init"), context.device).active():
        return AUGMENTERS.get(name).obj(context)


def before_start_of(name: str) -> BeforeStart | None:
    """The method's declaration, or None when it declared nothing (then every key counts as pre-T)."""
    return AUGMENTERS.get(name).meta.get("before_start")
