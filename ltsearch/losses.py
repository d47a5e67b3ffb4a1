"""Classification losses for long-tailed training, and the deferred re-weighting / re-sampling switches.

Each loss registers itself in `LOSSES` with its own parameter dataclass (the `loss.<name>` section of
the config), whose defaults are its paper's. All losses share one reduction so that class weights
(DRW) and per-sample weights (augmenters) mean the same thing everywhere:

    loss = Σ_i c_i·ω_i·ℓ_i / Σ_i c_i,   c_i = class_weights[y_i] (1 if None), ω_i = sample_weights[i] (1 if None)

where ℓ_i is the *unweighted* per-sample loss. With ω = 1 this is exactly the mean that
`F.cross_entropy(weight=...)` computes, which is the normalisation LDAM-DRW's deferred re-weighting
relies on. Logits are cast to float32 first, so the loss is the same under float16/bfloat16 autocast.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch import _checks as check
from ltsearch.config import LossConfig, ReweightConfig, ResampleConfig
from ltsearch.errors import DataError
from ltsearch.registry import LOSSES


# ------------------------------------------------------------------------------------ parameters
@dataclass
class FocalConfig:
    """Focal loss (Lin et al. 2017, Eq. 5). γ = 1 is what LDAM-DRW's training script passes; γ = 0 is CE."""

    gamma: float = 1.0

    def validate(self, where: str) -> None:
        check.number(f"{where}.gamma", self.gamma, low=0.0)


@dataclass
class LdamConfig:
    """LDAM (Cao et al. 2019, Eq. 13): the rarest class gets margin `max_m`; logits are scaled by `s`."""

    max_m: float = 0.5
    s: float = 30.0

    def validate(self, where: str) -> None:
        check.number(f"{where}.max_m", self.max_m, low=0.0, low_open=True)
        check.number(f"{where}.s", self.s, low=0.0, low_open=True)


@dataclass
class LogitAdjustConfig:
    """Logit adjustment (Menon et al. 2021): τ scales the log prior π; τ = 1 is the paper's default.

    `mode: posthoc` (Eq. 9, the mode the authors' code runs by default) trains with plain CE and predicts
    argmax_y z_y − τ·log π_y; `mode: loss` (Eq. 10) trains with CE(z + τ·log π) and predicts argmax z.
    """

    tau: float = 1.0
    mode: Literal["posthoc", "loss"] = "posthoc"

    def validate(self, where: str) -> None:
        check.number(f"{where}.tau", self.tau, low=0.0)
        check.choice(f"{where}.mode", self.mode, ("posthoc", "loss"))


# ----------------------------------------------------------------------------------------- base
class ClassificationLoss(nn.Module, abc.ABC):
    """A loss over logits (N, C) and int64 targets (N,), reduced as described in the module docstring.

    Subclasses implement only `per_sample_loss`; the shared reduction keeps DRW and augmenter
    weights comparable across losses. `needs_cosine_classifier` tells `model.classifier: auto`
    to build a normalised (cosine) head, which LDAM's fixed scale `s` assumes.
    """

    needs_cosine_classifier: ClassVar[bool] = False

    def __init__(self, params: Any, class_counts: torch.Tensor | list[int]):
        super().__init__()
        self.params = params
        counts = torch.as_tensor(class_counts, dtype=torch.int64)
        if counts.dim() != 1 or counts.numel() == 0:
            raise ValueError(f"class_counts must be a non-empty 1-D tensor, got shape {tuple(counts.shape)}")
        self.num_classes = counts.numel()
        self.register_buffer("class_counts", counts.clone(), persistent=False)

    @abc.abstractmethod
    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Unweighted loss of each sample, (N,), from float32 logits."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, *,
                sample_weights: torch.Tensor | None = None, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits of shape (N, {self.num_classes}), got {tuple(logits.shape)}")
        per_sample = self.per_sample_loss(logits.float(), targets)
        return weighted_mean(per_sample, targets, sample_weights=sample_weights, class_weights=class_weights)

    def eval_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits that evaluation takes the argmax of; the raw ones except for post-hoc corrections."""
        return logits


def weighted_mean(per_sample: torch.Tensor, targets: torch.Tensor, *,
                  sample_weights: torch.Tensor | None, class_weights: torch.Tensor | None) -> torch.Tensor:
    """Σ c_i·ω_i·ℓ_i / Σ c_i: torch's weighted-CE mean when ω = 1, the plain mean of ω·ℓ when c = 1."""
    if class_weights is None:
        per_class = torch.ones_like(per_sample)
    else:
        per_class = class_weights.to(per_sample)[targets]
    weighted = per_class * per_sample
    if sample_weights is not None:
        weighted = weighted * sample_weights.to(per_sample)
    return weighted.sum() / per_class.sum()


def _positive_counts(counts: torch.Tensor, needed_by: str) -> torch.Tensor:
    """Counts as float64, refusing an empty class: the count-based losses take its log or a negative power."""
    if bool((counts <= 0).any()):
        empty = torch.nonzero(counts <= 0).flatten().tolist()
        raise DataError(f"{needed_by} needs at least one training image per class; classes {empty} have none")
    return counts.to(torch.float64)


# --------------------------------------------------------------------------------------- losses
@LOSSES.register("ce")
class CrossEntropyLoss(ClassificationLoss):
    """Plain softmax cross-entropy (ERM); with DRW class weights it is the CE-DRW baseline of Cao et al."""

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, reduction="none")


@LOSSES.register("focal", config=FocalConfig)
class FocalLoss(ClassificationLoss):
    """Focal loss ℓ_i = (1 − p_i)^γ·CE_i with p_i = exp(−CE_i), the model's probability of the true class.

    p_i comes from the *unweighted* CE (Lin et al.'s p_t), and class weights enter only through the
    shared reduction, so γ = 0 is exactly the (weighted) CE of `ce`. Without class weights this equals
    LDAM-DRW's FocalLoss (mean of (1 − p)^γ·CE). With weights the reference instead sets p = exp(−w_y·CE)
    and takes a plain mean, which is not CE at γ = 0; we do not follow it there.
    """

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cross_entropy = F.cross_entropy(logits, targets, reduction="none")
        # 1 − exp(−CE) via expm1 keeps precision for small CE; the floor keeps the gradient of x^γ
        # finite (0·∞ would be NaN) when γ < 1 and a sample is classified with p == 1 in float32.
        miss_probability = (-torch.expm1(-cross_entropy)).clamp_min(torch.finfo(cross_entropy.dtype).tiny)
        return miss_probability.pow(self.params.gamma) * cross_entropy


@LOSSES.register("ldam", config=LdamConfig)
class LdamLoss(ClassificationLoss):
    """Label-distribution-aware margin loss (Cao et al. 2019, Eq. 13): CE(s·(z − m_y·e_y), y).

    m_c ∝ n_c^(−1/4), rescaled so the rarest class gets exactly `max_m`; the margin is subtracted from
    the true-class logit only. `s` rescales the cosine logits of a normalised head into a range where
    softmax is not flat, hence `needs_cosine_classifier`.
    """

    needs_cosine_classifier = True

    def __init__(self, params: LdamConfig, class_counts: torch.Tensor | list[int]):
        super().__init__(params, class_counts)
        inverse_quartic_root = _positive_counts(self.class_counts, "loss ldam").pow(-0.25)
        margins = inverse_quartic_root * (params.max_m / inverse_quartic_root.max())
        self.register_buffer("margins", margins.float(), persistent=False)

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        true_class_margin = self.margins.to(logits.device)[targets].unsqueeze(1)
        with_margin = logits.scatter_add(1, targets.unsqueeze(1), -true_class_margin)
        return F.cross_entropy(self.params.s * with_margin, targets, reduction="none")


class _ShiftedLogitsLoss(ClassificationLoss):
    """CE on z + b with a fixed per-class offset b from the training counts (prior-corrected softmax)."""

    def __init__(self, params: Any, class_counts: torch.Tensor | list[int]):
        super().__init__(params, class_counts)
        self.register_buffer("offset", self.logit_offset(params).float(), persistent=False)

    @abc.abstractmethod
    def logit_offset(self, params: Any) -> torch.Tensor:
        """Per-class offset b, (C,), from `self.class_counts`, added to every row of logits before the softmax."""

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.offset.to(logits.device), targets, reduction="none")


@LOSSES.register("balanced_softmax")
class BalancedSoftmaxLoss(_ShiftedLogitsLoss):
    """Balanced Softmax (Ren et al. 2020, Eq. 4): CE(z + log n_c). Counts or priors give the same loss,
    since CE ignores a shift common to all classes."""

    def logit_offset(self, params: None) -> torch.Tensor:
        return _positive_counts(self.class_counts, "loss balanced_softmax").log()


@LOSSES.register("logit_adjust", config=LogitAdjustConfig)
class LogitAdjustedLoss(_ShiftedLogitsLoss):
    """Logit adjustment (Menon et al. 2021) with π = n / Σn, as a loss (Eq. 10) or post hoc (Eq. 9).

    Loss mode: CE(z + τ·log π_c); τ = 0 is plain CE and τ = 1 equals `balanced_softmax`. Post-hoc mode:
    plain CE in training, and evaluation ranks z − τ·log π_c. The reference adds 1e-12 inside log(π^τ)
    to guard π_c = 0; we refuse empty classes instead and take τ·log π_c exactly.
    """

    def logit_offset(self, params: LogitAdjustConfig) -> torch.Tensor:
        counts = _positive_counts(self.class_counts, "loss logit_adjust")
        return params.tau * (counts / counts.sum()).log()

    def per_sample_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.params.mode == "posthoc":
            return F.cross_entropy(logits, targets, reduction="none")
        return super().per_sample_loss(logits, targets)

    def eval_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.params.mode == "posthoc":
            return logits - self.offset.to(logits.device)
        return logits


def create_loss(loss_cfg: LossConfig, class_counts: torch.Tensor | list[int]) -> ClassificationLoss:
    """Build the loss named `loss_cfg.name` from its section `loss.<name>` (paper defaults if absent)."""
    entry = LOSSES.get(loss_cfg.name)
    params = None
    if entry.config is not None:
        params = loss_cfg.sections.get(loss_cfg.name) or entry.config()
        params.validate(f"loss.{loss_cfg.name}")
    return entry.obj(params, class_counts)


# --------------------------------------------------------------------------- deferred schedules
def _effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Class-balanced weights (Cui et al. 2019, Eq. 8): (1 − β)/(1 − β^{n_c}); β = 0 gives all ones."""
    return (1.0 - beta) / (1.0 - torch.pow(beta, counts))


def _inverse_frequency_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """1/n_c, the other reading of DRW's weights (kaidic/LDAM-DRW#19); β is unused."""
    return 1.0 / counts


_CLASS_WEIGHT_RULES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "effective_number": _effective_number_weights,
    "inverse": _inverse_frequency_weights,
}


def class_weights_for_epoch(reweight_cfg: ReweightConfig, class_counts: torch.Tensor | list[int],
                            epoch: int) -> torch.Tensor | None:
    """Deferred re-weighting (DRW, Cao et al. 2019, Alg. 1): None before `start_epoch` (0-indexed).

    From then on, float32 weights normalised to sum to the number of classes C, on the counts' device.
    LDAM-DRW's recipe is kind `effective_number`, β = 0.9999, start_epoch 160.
    """
    if reweight_cfg.kind == "none" or epoch < reweight_cfg.start_epoch:
        return None
    counts = _positive_counts(torch.as_tensor(class_counts), f"loss.reweight.kind={reweight_cfg.kind}")
    raw = _CLASS_WEIGHT_RULES[reweight_cfg.kind](counts, reweight_cfg.beta)
    return (raw * (counts.numel() / raw.sum())).float()


def sampler_for_epoch(resample_cfg: ResampleConfig, epoch: int) -> str:
    """Deferred re-sampling (DRS, Cao et al. 2019): instance-balanced sampling before `start_epoch`."""
    return resample_cfg.sampler if epoch >= resample_cfg.start_epoch else "instance"

