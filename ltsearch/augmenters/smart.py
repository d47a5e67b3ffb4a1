"""SMART (Zhang et al., "Semantic Transfer from Head to Tail"): tail features borrow head covariance.

Tail features are re-coloured by a covariance Σ_th built from their own class covariance and that of
a head class (Eq. 4–5), keeping the tail mean (Eq. 6), and their loss is re-weighted by ω (Eq. 11).
Head features pass untouched with ω = 1. Choices the paper leaves open, and how they are made here:

* Per position. The paper flattens a sample's map to F ∈ R^{HW×C}: every spatial position is one
  observation of a C-vector. Statistics are taken over all positions of all images of a class, and
  Eq. 6 moves every position with the same Σ_th. At a 1×1 map this is the pooled-feature case, so
  any boundary works unchanged.
* EMA (Eq. 2–3). With α = M/N ("dynamic") the running mean is the exact mean of everything seen.
  The running covariance is the count-weighted mean of the per-batch covariances (each the biased
  covariance of that batch's positions around that batch's mean): the pooled *within*-batch
  covariance, which lacks the between-batch scatter Σ_b (M_b/N)(μ_b − μ)(μ_b − μ)ᵀ of the covariance
  of all data. Eq. 3 is implemented as written (features drift during training, so scatter between
  old batch means would be stale anyway). "fixed" uses α = momentum (Table 5's ablation); a class's
  first batch always sets α = 1 so the estimate does not start from zero.
* Gradients. The statistics are buffers, so Σ_th, κ and ω are constants for back-propagation; Eq. 6
  is affine in F, so the loss reaches earlier stages through F̃ = κ·((F − μ_t)/σ_t)·Σ_th + μ_t.
* Head choice (Sec. 3.3: "we randomly sample a head class k_h for a given tail class k_t").
  "random" (default): uniform over head classes for every sample and step; "online": a draw with
  probability ∝ exp(τ·cos(μ_t, μ_h)), the similarity of running class means (Fig. 4a's online
  scheme; the offline WordNet/Word2Vec ranking needs class names we do not have); "fixed": one
  random head per tail class drawn once and checkpointed. Only head classes seen so far are
  eligible; a tail sample with no eligible head is left untouched (ω = 1).
* Covariance source (Sec. 4.3, "types of transformation matrix"): Σ̃ = Σ_tᵀΣ_h ("both", the paper's
  method), Σ_hᵀΣ_h ("head") or Σ_tᵀΣ_t ("tail").
* "diagonal" keeps only per-channel variances (C×D memory instead of C×D²: 16.8 GB at 1000 classes ×
  2048 channels in full). It is the full method applied to diagonal covariances, zeros included in
  the softmax of Eq. 4, so both agree exactly when the covariances are diagonal.

Scale (`scale`). The literal equations are not unit-consistent: Σ̃ = Σ_tᵀΣ_h is in variance², so
Eq. 6 maps a whitened z (unitless) to a displacement in variance² and Eq. 11's ω is variance²×C.
Measured on CIFAR-10-LT (ResNet-32, last 8×8×64 map, 500/class slice): at activation on a trained
CE network the literal transfer gives the tail class a total variance of 3.7e6 against the head's
181 (spread ×80–270) and ω ≈ 9–46 (up to 71); the first loss is ~1e3, the gradient into the
backbone scales with Σ_th, features grow, Σ_th grows with their 4th power, and the loss is inf
within 3 steps from a random init (nan by step 4) and 1e3–6e3 at lr 0.001 on a trained one.
Dead channels (σ² ≈ 0, ε = 1e-8) were *not* the trigger there (smallest σ²/mean σ² ≈ 0.02).
`scale: normalized` (default) keeps every equation's structure and fixes only the units:

* Eq. 4–5 on scale-free covariances Σ̂_k = Σ_k / v̄_k, v̄_k = tr(Σ_k)/C (the mean channel variance),
  so τ acts on the same range whatever the feature magnitude (Σ̃ entries ≈ −0.1…65 on CIFAR-10:
  τ = 0.1 leaves Γ near uniform, τ = 1 gives a row entropy of ≈ 1.9 nats of log 64 = 4.2, τ ≥ 10 is
  nearly one-hot).
* Eq. 6 as F̃ = κ·z·Σ_th + μ_t with one scalar κ per pair so that tr Cov(F̃) = tr Σ_h under the
  running moments (Cov(z) = D^{-1/2} Σ_t D^{-1/2}): the tail keeps its mean and takes the head's
  total variance along Σ_th's directions — Sec. 3.3's "covariance akin to Σ_h" — instead of a
  variance² one. σ_t² is floored at VARIANCE_FLOOR·v̄_t so a channel that was dead in the running
  moments but fires now cannot be divided by √ε.
* Eq. 11 as ω = 1 + (1/C²)·Σ_jk Σ_th[j, k] (Σ_th scale-free): the literal mean row sum, divided by
  its value for perfectly co-varying channels (C), is a head–tail co-variation in [0, ~1]; on
  scale-free Σ_th alone it would be < 1 and *shrink* tail samples, against Sec. 3.5's "greater
  emphasis", so a head sample's weight 1 is the base and co-variation adds to it.

`scale: literal` keeps Eq. 4–6 and 11 exactly as printed (ε only; diverges on CIFAR-10 as above).

Magnitudes with the defaults, measured on CIFAR-10-LT (ResNet-32, 500/class slice, 1,695 tail
samples per epoch, all transferred). SMART adds no auxiliary loss term; what it changes is ω and
the spread. Regime (b), CE network activated at lr 0.001: ω mean 1.09 (range 1.03–1.30), spread
of transferred tail features (RMS distance from μ_t) 0.70 → 0.75, ratio mean 1.08 (0.32–5.3),
loss 1.88 → 1.64 over 3 epochs. Regime (a), from a random init with CE: ω mean 1.13 → 1.23
(1.01–1.39), spread 1.63 → 1.87, ratio 1.20–1.38 (0.40–3.5); loss 3.01 → 1.27 in 3 epochs.

Known defect, measured (the 30-epoch reproduction on the full CIFAR-10-LT, benchmarks/RESULTS.md): with
LDAM-DRW, SMART from epoch 0 ends at 32.1 % test top-1 against the baseline's 60.9, with recall 0 on four of
its five tail classes. Every tail sample is *replaced* by its transfer (Eq. 6 as the paper writes it for
{F_t} → {F̃_t}), and Σ_th mixes the channels, so the classifier never sees a real tail feature: on the final
network the same training images are recalled 79–100 % through F̃ and 0–4 % (class 7: 64) through their
real features. The normalised ω (1.2–2.5 during the run) does weigh tail samples above 1 as Sec. 3.5 asks;
the emphasis lands on features the test never produces. `tail_features: append` keeps the real tail features
(weight 1) and adds F̃ of each moved sample (weight ω). Measured on the same recipe (seed 0): 56.0 % instead of
32.1; SMART's tail classes recover (79, 80, 64, 46, 51 % against the baseline's 63, 77, 31, 15, 64) but the two
smallest head classes collapse (11 and 6 % against 52 and 66), so `replace` stays the default until a head ratio
or weighting that keeps them is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch import _checks as check
from ltsearch.augmenters.base import Augmenter, AugmenterContext, AugmentOutput, BeforeStart, TrainState
from ltsearch.errors import ConfigError
from ltsearch.registry import AUGMENTERS

EPS = 1e-8  # ε of Eq. 6
VARIANCE_FLOOR = 1e-3  # normalized scale: σ_t² >= this × the class's mean channel variance in Eq. 6
FULL_COVARIANCE_LIMIT_BYTES = 2 ** 31  # above this the per-class D×D buffers alone would crowd a GPU trial


@dataclass
class SmartConfig:
    """`augmenter.smart`. τ sharpens Γ (Eq. 4: softmax(τ·Σ̃) row-wise, larger τ = sharper) and the online
    head draw; the paper gives no value in its text, so 1 (a plain softmax) is the default to search from.
    `momentum` is used only with `ema: fixed` (Table 5 tries 0.01, 0.05, 0.1; dynamic wins). `scale`:
    "normalized" (unit-consistent Eq. 4–6, 11; see the module docstring) or "literal" (as printed).
    `tail_features`: "replace" (Eq. 6 as printed: {F_t} -> {F̃_t}, the classifier sees no real tail feature) or
    "append" (the real tail features stay in the batch with weight 1 and F̃ is added for each moved sample
    with weight ω; see "Known defect" in the module docstring)."""

    tau: float = 1.0
    ema: Literal["dynamic", "fixed"] = "dynamic"
    momentum: float = 0.1
    weights: bool = True
    source: Literal["both", "head", "tail"] = "both"
    selection: Literal["random", "online", "fixed"] = "random"
    covariance: Literal["full", "diagonal"] = "full"
    scale: Literal["normalized", "literal"] = "normalized"
    tail_features: Literal["replace", "append"] = "replace"

    def validate(self, where: str) -> None:
        check.number(f"{where}.tau", self.tau, low=0.0, low_open=True, what="the softmax sharpness of Eq. 4")
        check.number(f"{where}.momentum", self.momentum, low=0.0, high=1.0, low_open=True,
                     what="the fixed EMA weight α of Eq. 2–3")


# ------------------------------------------------------------------------------------ closed forms
def _per_matrix(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per matrix (or per variance vector) over `like`'s trailing dimensions."""
    return values.view(*values.shape, *([1] * (like.dim() - values.dim())))


def channel_variances(cov: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """σ² = diag(Σ), (..., D)."""
    return cov if diagonal else cov.diagonal(dim1=-2, dim2=-1)


def unit_covariance(cov: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Σ̂ = Σ / v̄ with v̄ = tr(Σ)/C: the covariance's shape without its scale (mean channel variance 1)."""
    mean_var = channel_variances(cov, diagonal).mean(-1).clamp_min(torch.finfo(cov.dtype).tiny)
    return cov / _per_matrix(mean_var, cov)


def mixing_weights(mixed: torch.Tensor, tau: float) -> torch.Tensor:
    """Γ of Eq. 4: a row-wise softmax of τ·Σ̃, so a larger τ concentrates each row on its largest entries."""
    return torch.softmax(tau * mixed, dim=-1)


def transfer_full(left: torch.Tensor, right: torch.Tensor, tau: float) -> torch.Tensor:
    """Σ_th = Γ ⊙ Σ̃ with Σ̃ = leftᵀ·right, (..., D, D) (Eq. 4–5; left = Σ_t, right = Σ_h in the paper's method)."""
    mixed = left.transpose(-2, -1) @ right
    return mixing_weights(mixed, tau) * mixed


def transfer_diagonal(left: torch.Tensor, right: torch.Tensor, tau: float) -> torch.Tensor:
    """Diagonal of Eq. 4–5 for diagonal covariances given as variance vectors (..., D).

    Row j of Σ̃ holds s_j = left_j·right_j on the diagonal and D − 1 zeros, so
    Γ_jj = e^{τ s_j} / (e^{τ s_j} + D − 1) = sigmoid(τ s_j − log(D − 1)).
    """
    mixed = left * right
    dim = mixed.shape[-1]
    offset = math.log(dim - 1) if dim > 1 else -math.inf
    return torch.sigmoid(tau * mixed - offset) * mixed


def semantic_weight(sigma_th: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """ω of Eq. 11 as printed: (1/C)·Σ_j Σ_k Σ_th[j, k], the total head-tail co-variation per channel."""
    dims = (-1,) if diagonal else (-2, -1)
    return sigma_th.sum(dims) / sigma_th.shape[-1]


def normalized_semantic_weight(sigma_th: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """ω = 1 + (1/C²)·Σ_jk Σ_th[j, k] on scale-free Σ_th (Eq. 11 normalized, see the module docstring)."""
    return 1.0 + semantic_weight(sigma_th, diagonal) / sigma_th.shape[-1]


def colour_gain(sigma_th: torch.Tensor, cov_t: torch.Tensor, var_t: torch.Tensor, cov_h: torch.Tensor,
                diagonal: bool) -> torch.Tensor:
    """κ (B,) of the normalized Eq. 6: tr Cov(κ·z·Σ_th) = tr Σ_h, with Cov(z) = D^{-1/2} Σ_t D^{-1/2}, D = σ_t² + ε.

    tr(Σ_thᵀ Cov(z) Σ_th) = Σ_jk Σ_th[j, k]·(Cov(z)·Σ_th)[j, k]; on diagonal moments Σ_j Σ_th[j]²·Cov(z)[j].
    """
    std = torch.sqrt(var_t + EPS)
    if diagonal:
        spread = (sigma_th.square() * cov_t / std.square()).sum(-1)
    else:
        z_cov = cov_t / (std[:, :, None] * std[:, None, :])
        spread = (sigma_th * (z_cov @ sigma_th)).sum((-2, -1))
    head_total = channel_variances(cov_h, diagonal).sum(-1)
    return torch.sqrt(head_total / spread.clamp_min(EPS))


def transfer_features(x: torch.Tensor, mean_t: torch.Tensor, var_t: torch.Tensor, sigma_th: torch.Tensor,
                      gain: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6: F̃ = (F − μ_t)/sqrt(σ_t² + ε)·Σ_th·κ + μ_t on positions x (B, P, D); Σ_th is (B, D, D) or (B, D)
    diagonal, κ (B,) or None (= 1, the literal form).

    σ_t² = diag(Σ_t) replaces Σ_t^{-1/2}, which the paper avoids as unfriendly to GPUs.
    """
    z = (x - mean_t[:, None]) / torch.sqrt(var_t[:, None] + EPS)
    moved = z @ sigma_th if sigma_th.dim() == 3 else z * sigma_th[:, None]
    if gain is not None:
        moved = moved * gain[:, None, None]
    return moved + mean_t[:, None]


def positions(feats: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B, HW, D): the paper's F ∈ R^{HW×C} per sample."""
    return feats.flatten(2).transpose(1, 2)


def spread(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """RMS distance of each sample's positions (B, P, D) from its class mean (B, D): (B,)."""
    return (x - mean[:, None]).square().mean((1, 2)).sqrt()


# ------------------------------------------------------------------------------------ statistics
class ClassMoments(nn.Module):
    """Running per-class mean and covariance (full D×D or diagonal) and images seen, as buffers (Eq. 2–3)."""

    def __init__(self, num_classes: int, dim: int, diagonal: bool, device: torch.device):
        super().__init__()
        self.diagonal = diagonal
        cov_shape = (num_classes, dim) if diagonal else (num_classes, dim, dim)
        self.register_buffer("mean", torch.zeros(num_classes, dim, device=device))
        self.register_buffer("cov", torch.zeros(cov_shape, device=device))
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.int64, device=device))

    def variance(self, classes: torch.Tensor) -> torch.Tensor:
        """σ² = diag(Σ) of the given classes (Eq. 6)."""
        return channel_variances(self.cov[classes], self.diagonal)

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor, momentum: float | None) -> None:
        """Eq. 2–3 for every class in the batch, from positions x (B, P, D) in float32.

        α_k = M_k/N_k (dynamic, momentum None) or `momentum`. The D×D work touches only the batch's
        samples: μ ← μ + α(μ^B − μ) is scattered as Σ_{i∈k} (α_k/M_k)(x̄_i − μ_k), likewise for Σ.
        """
        # M_k^B by index_add_: torch.bincount reads the max label back to the host on CUDA
        batch_count = torch.zeros_like(self.count).index_add_(0, labels, torch.ones_like(labels))
        seen = self.count + batch_count
        if momentum is None:
            alpha = batch_count / seen.clamp(min=1)
        else:
            alpha = torch.where(self.count > 0, momentum, 1.0) * (batch_count > 0)
        share = (alpha / batch_count.clamp(min=1))[labels]
        sample_mean = x.mean(1)
        batch_mean = torch.zeros_like(self.mean).index_add_(0, labels, sample_mean) / batch_count.clamp(min=1)[:, None]
        centred = x - batch_mean[labels][:, None]
        if self.diagonal:
            sample_cov = centred.square().mean(1)
        else:
            sample_cov = centred.transpose(1, 2) @ centred / x.shape[1]
        cov_share = share.view(-1, *([1] * (sample_cov.dim() - 1)))
        self.cov.index_add_(0, labels, cov_share * (sample_cov - self.cov[labels]))
        self.mean.index_add_(0, labels, share[:, None] * (sample_mean - self.mean[labels]))
        self.count.copy_(seen)


# ------------------------------------------------------------------------------------ the method
@AUGMENTERS.register("smart", config=SmartConfig, defaults={"insert_at": -1, "start_fraction": 0.0, "head_ratio": 0.5},
                     components={"W": {"augmenter.smart.weights": False}},  # Table 4's semantic-aware weights (Eq. 10-11)
                     # Active from epoch 0 by default (nothing to share); with start_epoch > 0, `before_start`
                     # keeps the class moments (Eq. 2-3) current on every step before T (trains=True below)
                     before_start=BeforeStart(keys=(
                         "insert_at",            # which maps the moments are taken of, and their channel count
                         "smart.ema",            # dynamic (α = M/N) or fixed (α = momentum) update of the moments
                         "smart.momentum",       # α of the fixed EMA
                         "smart.covariance",     # full D×D or diagonal moments (the buffers' shape and values)
                         "smart.selection",      # "fixed" adds the `fixed_head` buffer, drawn at construction from the
                                                 # head mask: part of the state a fork takes from the prefix
                         "head_ratio",           # the head mask: `fixed_head`'s draw, and the train loader's (a DRS
                                                 # schedule with the `head_tail` sampler draws from it before T)
                     ), trains=True))
class Smart(Augmenter):
    """Algorithm 1 of SMART: per step, update the class moments from the batch (Eq. 2–3), draw a head
    class for each tail sample, build Σ_th (Eq. 4–5), move tail features (Eq. 6) and weight them (Eq. 11).

    Batches pair a tail-dominated half with a head-dominated half ('head_tail' sampler). Defaults:
    the last map before pooling (Table 5: the 4th layer of ResNet-32 is best), active from the first
    epoch (Algorithm 1); the head/tail split is not stated, so half the classes are head.

    Diagnostics per epoch: `tail_samples`, `transferred` (counts), `transferred_share`; over transferred
    samples `omega`, `spread_before`, `spread_after` (RMS distance of a sample's positions from μ_t),
    `spread_ratio` (after / before, per sample) and, with `scale: normalized`, `kappa` — each mean with
    `_min`/`_max`.
    """

    progress_keys = ("transferred_share", "omega", "spread_ratio")

    def __init__(self, context: AugmenterContext):
        super().__init__(context)
        self.cfg: SmartConfig = context.config.augmenter.smart
        dim = context.feature.channels
        diagonal = self.cfg.covariance == "diagonal"
        if not diagonal and 4 * self.num_classes * dim * dim > FULL_COVARIANCE_LIMIT_BYTES:
            gigabytes = 4 * self.num_classes * dim * dim / 1e9
            raise ConfigError("augmenter.smart.covariance", "full",
                              f"'diagonal' for {self.num_classes} classes x {dim} channels (full needs {gigabytes:.1f} GB)",
                              hint="Set augmenter.smart.covariance=diagonal, or insert SMART at an earlier stage.")
        self.moments = ClassMoments(self.num_classes, dim, diagonal, context.device)
        if self.cfg.selection == "fixed":
            heads = torch.nonzero(self.head_mask).squeeze(1)
            pick = heads[torch.randint(len(heads), (self.num_classes,))]
            self.register_buffer("fixed_head", pick.to(context.device))

    def sampler(self, epoch: int) -> str | None:
        """Algorithm 1, lines 5–6: each batch = a tail-dominated half + a head-dominated half."""
        return "head_tail" if self.active(epoch) else None

    def before_start(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        """Idle before T_th, but keep the moments current so they are warm when augmentation starts."""
        with torch.autocast(feats.device.type, enabled=False):
            self.moments.update(positions(feats.detach().float()), labels, self._momentum)
        return AugmentOutput(feats, labels)

    def augment(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        with torch.autocast(feats.device.type, enabled=False):
            x = positions(feats.float())
            self.moments.update(x.detach(), labels, self._momentum)
            heads = self.choose_heads(labels)
            tail = ~self.head_mask[labels]
            moved = tail & self.head_mask[heads] & (self.moments.count[heads] > 0)
            sigma_th = self.transfer(labels, heads)
            mean_t, var_t = self.moments.mean[labels], self.whitening_variance(labels)
            gain = self.gain(labels, heads, sigma_th, var_t)
            new = transfer_features(x, mean_t, var_t, sigma_th, gain)
            weights = self.weights(sigma_th, moved) if self.cfg.weights else None
            self.record(x.detach(), new.detach(), mean_t, tail, moved, weights, gain)
            if self.cfg.tail_features == "append":
                return self.appended(feats, labels, new, moved, weights)
            x = torch.where(moved[:, None, None], new, x)
        out = x.transpose(1, 2).reshape(feats.shape).to(feats.dtype)
        return AugmentOutput(out, labels, sample_weights=weights)

    @staticmethod
    def appended(feats: torch.Tensor, labels: torch.Tensor, new: torch.Tensor, moved: torch.Tensor,
                 weights: torch.Tensor | None) -> AugmentOutput:
        """`tail_features: append`: the batch as it came (weight 1) followed by F̃ of the moved tail samples
        (weight ω). Appending only the moved ones keeps the loss's Σ c_i free of zero-weight padding."""
        extra = new[moved].transpose(1, 2).reshape(-1, *feats.shape[1:]).to(feats.dtype)
        sample_weights = None
        if weights is not None:
            sample_weights = torch.cat([torch.ones_like(weights), weights[moved]])
        return AugmentOutput(torch.cat([feats, extra]), torch.cat([labels, labels[moved]]), sample_weights=sample_weights)

    def epoch_diagnostics(self) -> dict[str, float]:
        """Adds `transferred_share` = transferred / tail samples."""
        values = super().epoch_diagnostics()
        if "tail_samples" in values:
            values["transferred_share"] = values.get("transferred", 0.0) / max(values["tail_samples"], 1.0)
        return values

    # ------------------------------------------------------------------ pieces of one step
    @property
    def _momentum(self) -> float | None:
        return self.cfg.momentum if self.cfg.ema == "fixed" else None

    @property
    def _normalized(self) -> bool:
        return self.cfg.scale == "normalized"

    def choose_heads(self, labels: torch.Tensor) -> torch.Tensor:
        """One head class per sample (meaningful for tail samples): Gumbel-max over zeros ("random"),
        over τ·cos(μ_y, μ_h) ("online"), or the checkpointed pairing ("fixed"); no host sync."""
        if self.cfg.selection == "fixed":
            return self.fixed_head[labels]
        eligible = self.head_mask & (self.moments.count > 0)
        if self.cfg.selection == "online":
            unit = F.normalize(self.moments.mean, dim=1)
            scores = self.cfg.tau * (unit[labels] @ unit.T)
        else:
            scores = torch.zeros(len(labels), self.num_classes, device=labels.device)
        uniform = torch.rand_like(scores).clamp_min(torch.finfo(scores.dtype).tiny)
        gumbel = -torch.log(-torch.log(uniform))
        return (scores.masked_fill(~eligible, -math.inf) + gumbel).argmax(1)

    def transfer(self, tails: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Σ_th per sample from the configured covariance source (Eq. 4–5), on scale-free Σ̂ when normalized."""
        cov_t, cov_h = self.moments.cov[tails], self.moments.cov[heads]
        if self._normalized:
            cov_t, cov_h = unit_covariance(cov_t, self.moments.diagonal), unit_covariance(cov_h, self.moments.diagonal)
        left, right = {"both": (cov_t, cov_h), "head": (cov_h, cov_h), "tail": (cov_t, cov_t)}[self.cfg.source]
        if self.moments.diagonal:
            return transfer_diagonal(left, right, self.cfg.tau)
        return transfer_full(left, right, self.cfg.tau)

    def whitening_variance(self, tails: torch.Tensor) -> torch.Tensor:
        """σ_t² of Eq. 6, floored at VARIANCE_FLOOR × the class's mean variance when normalized."""
        var = self.moments.variance(tails)
        if not self._normalized:
            return var
        return torch.maximum(var, VARIANCE_FLOOR * var.mean(-1, keepdim=True))

    def gain(self, tails: torch.Tensor, heads: torch.Tensor, sigma_th: torch.Tensor, var_t: torch.Tensor) -> torch.Tensor | None:
        """κ of the normalized Eq. 6 (the head's total variance), None for the literal form."""
        if not self._normalized:
            return None
        return colour_gain(sigma_th, self.moments.cov[tails], var_t, self.moments.cov[heads], self.moments.diagonal)

    def weights(self, sigma_th: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        """ω of Eq. 11 for transferred tail samples, 1 for the others."""
        weight = normalized_semantic_weight if self._normalized else semantic_weight
        return torch.where(moved, weight(sigma_th, self.moments.diagonal), 1.0)

    def record(self, before: torch.Tensor, after: torch.Tensor, mean_t: torch.Tensor, tail: torch.Tensor,
               moved: torch.Tensor, weights: torch.Tensor | None, gain: torch.Tensor | None) -> None:
        """Counts and, over transferred samples only, means and extremes (masked: no boolean indexing, no host sync)."""
        self.diagnostics.add("tail_samples", tail.sum())
        self.diagnostics.add("transferred", moved.sum())
        spread_before, spread_after = spread(before, mean_t), spread(after, mean_t)
        values = {"spread_before": spread_before, "spread_after": spread_after,
                  "spread_ratio": spread_after / spread_before.clamp_min(EPS), "omega": weights, "kappa": gain}
        for name, value in values.items():
            if value is not None:
                self.diagnostics.mean(name, value, where=moved)
