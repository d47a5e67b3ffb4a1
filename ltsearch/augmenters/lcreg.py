"""LCReg (Liu et al., "Long-tailed image classification with latent categories based recognition").

Head and tail classes share parts (legs, textures), so the feature map f (D×H×W) at the insertion
boundary is compared with M learnable, class-agnostic latent categories f'_m. Each position gets a
similarity to every latent (Eq. 1), the maps are normalised over M (Eq. 2) and used to rebuild f
from the latents (Eq. 3), scored by a per-position contrastive reconstruction loss (Eq. 4). The
latent categories are augmented implicitly, ISDA-style, with per-latent covariances estimated online
(Eq. 5–6) and the closed-form upper bound of the expected cross-entropy (Eq. 8–9). The network then
continues from f combined with the similarity maps (the paper's "decoder"); the total loss is
α·L_latent_aug + β·L_Recon + γ·L_cls (Eq. 10).

Choices the paper leaves open, made here and kept in one place:
- The "samples" of latent category m (Eq. 5–8 are written over training samples) are per-image
  latent features u_{i,m} = Σ_p Ŝ^m_p f_p / Σ_p Ŝ^m_p: the part of image i that Eq. 2 assigns to m.
  Every image contributes one sample to every category, so n'_m = N for all m.
- The classifier of Eq. 9 over the M latent categories is the similarity layer itself: w_j =
  FC(f'_j), the vectors Eq. 1 correlates with f, so L_latent_aug trains the latents and the FC; the
  similarity has no per-category bias, hence b_j − b_{y'} = 0.
- L_Recon (Eq. 4) is a sum over positions in the paper; it is averaged here (over positions and
  images) so β does not change meaning with H·W. Row j of C_f (reconstruction at j against every
  original position) is the softmax's input. At a 1×1 map the term is identically 0.
- The decoder is f + Conv1×1(S) (M→D), zero-initialised: the network is unchanged when LCReg
  switches on and the decoder then learns how much of the similarity maps to mix in. It is part of
  the network at evaluation: the engine must apply `eval_transform` at the insertion boundary.
- λ0 is not given in the paper; 0.5 is ISDA's CIFAR value (LCReg follows ISDA for λ = (t/T)·λ0).
- The optional second stage (Sec. 3.4, "following [22]": MiSLAS's decoupled classifier
  fine-tuning) trains only the classifier, on a class-balanced sampler, for the last
  `second_stage_epochs` epochs; the engine applies `trainable_parameters_filter`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch import _checks as check
from ltsearch.augmenters.base import AugmentOutput, Augmenter, AugmenterContext, TrainState
from ltsearch.errors import ConfigError
from ltsearch.registry import AUGMENTERS, SAMPLERS

CLASSIFIER_PREFIX = "classifier."


@dataclass
class LcregConfig:
    """`augmenter.lcreg`: the paper's defaults (Sec. 3.4 and 4.3, CIFAR-10-LT).

    `latent_count` M: 40 (CIFAR-10-LT), 50 (CIFAR-100-LT), 100 (ImageNet-LT, Places-LT), 200
    (iNaturalist). `aug_weight`, `recon_weight`, `cls_weight` are α, β, γ of Eq. 10; a weight of 0
    for α or β removes that term (Table 7's ablation rows). `lambda0` is λ0 of λ = (t/T)·λ0.
    `covariance: diagonal` keeps only the variances (ISDA's ImageNet variant) when M·D² floats are too
    many (e.g. D = 2048 on ResNet-50). `second_stage_epochs` > 0 fine-tunes only the classifier in
    the last that many epochs on `second_stage_sampler`.
    """

    latent_count: int = 40
    aug_weight: float = 0.1
    recon_weight: float = 0.1
    cls_weight: float = 1.0
    lambda0: float = 0.5
    covariance: Literal["full", "diagonal"] = "full"
    second_stage_epochs: int = 0
    second_stage_sampler: str = "class_balanced"

    def validate(self, where: str) -> None:
        check.integer(f"{where}.latent_count", self.latent_count)
        check.number(f"{where}.latent_count", self.latent_count, low=1, what="the number M of latent categories")
        check.number(f"{where}.aug_weight", self.aug_weight, low=0.0, what="α of Eq. 10; 0 removes L_latent_aug")
        check.number(f"{where}.recon_weight", self.recon_weight, low=0.0, what="β of Eq. 10; 0 removes L_Recon")
        check.number(f"{where}.cls_weight", self.cls_weight, low=0.0, low_open=True,
                     what="γ of Eq. 10; without L_cls nothing trains the classifier")
        check.number(f"{where}.lambda0", self.lambda0, low=0.0, what="λ0 of λ = (t/T)·λ0")
        check.integer(f"{where}.second_stage_epochs", self.second_stage_epochs)
        check.number(f"{where}.second_stage_epochs", self.second_stage_epochs, low=0)
        if self.second_stage_epochs > 0:
            check.registered(f"{where}.second_stage_sampler", self.second_stage_sampler, SAMPLERS)


# ------------------------------------------------------------------------------------ Eq. 1 – 4
def similarity_maps(encoded: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """S^m = σ(FC(f'_m)ᵀ f) per position (Eq. 1): encoded (M, D), flat (N, D, P) -> (N, M, P) in (0, 1)."""
    return torch.sigmoid(torch.matmul(encoded, flat))


def reconstruction_loss(encoded: torch.Tensor, assign: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """L_Recon (Eq. 3–4): f̂ = Σ_m FC(f'_m) Ŝ^m, C_f = f̂ᵀ f, softmax-CE of each row of C_f to its diagonal.

    Position j of the rebuilt map must match position j of the original better than any other
    position, which pushes each latent to stand for a distinct part. Averaged over positions and images.
    """
    rebuilt = torch.matmul(encoded.t(), assign)                    # (N, D, P), Eq. 3
    correlation = torch.matmul(rebuilt.transpose(1, 2), flat)      # (N, P, P): C_f[j, q] = f̂_jᵀ f_q
    positions = correlation.shape[-1]
    targets = torch.arange(positions, device=flat.device).repeat(flat.shape[0])
    return F.cross_entropy(correlation.reshape(-1, positions), targets)


def latent_features(assign: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """u_{i,m} = Σ_p Ŝ^m_p f_p / Σ_p Ŝ^m_p: image i's feature of latent category m, (N, M, D).

    These are the per-sample latent category features whose class-conditional statistics Eq. 5–6
    track and which Eq. 8–9 augment (pseudo label y'_m = m).
    """
    pooled = torch.matmul(assign, flat.transpose(1, 2))            # (N, M, D)
    return pooled / assign.sum(dim=2, keepdim=True)


# ------------------------------------------------------------------------------------ Eq. 5 – 6
class OnlineCovariance(nn.Module):
    """Per-category mean and (biased, 1/n) covariance of every sample seen so far (Eq. 5–6).

    Merging a batch of n' samples with mean μ' and covariance Σ' into n seen ones, with w = n'/(n+n'):
    μ ← (1−w)μ + wμ', Σ ← (1−w)Σ + wΣ' + w(1−w)(μ−μ')(μ−μ')ᵀ — Eq. 5–6 with the fractions expanded,
    so the result equals the population covariance of the whole stream. Buffers, so checkpoints
    carry them exactly; the count is float64 so long runs stay exact.
    """

    def __init__(self, categories: int, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        cov_shape = (categories, dim, dim) if mode == "full" else (categories, dim)
        self.register_buffer("mean", torch.zeros(categories, dim))
        self.register_buffer("cov", torch.zeros(cov_shape))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, samples: torch.Tensor) -> None:
        """Fold in `samples` (n', categories, D): one sample per category per image."""
        samples = samples.float()
        batch = samples.shape[0]
        batch_mean = samples.mean(dim=0)
        centered = (samples - batch_mean).transpose(0, 1)          # (categories, n', D)
        if self.mode == "full":
            batch_cov = torch.matmul(centered.transpose(1, 2), centered) / batch
            delta = self.mean - batch_mean
            spread = delta.unsqueeze(2) * delta.unsqueeze(1)
        else:
            batch_cov = centered.square().mean(dim=1)
            spread = (self.mean - batch_mean).square()
        w = (batch / (self.count + batch)).float()
        self.cov.mul_(1 - w).add_(w * batch_cov + (w * (1 - w)) * spread)
        self.mean.lerp_(batch_mean, w)
        self.count.add_(batch)


# ------------------------------------------------------------------------------------ Eq. 8 – 9
def implicit_augmentation_loss(features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None, cov: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """ISDA's closed-form upper bound on E_{f̃ ~ N(f, λΣ_y)}[CE(W f̃ + b, y)] (Eq. 8–9 of LCReg).

    By Jensen, E log Σ_j e^{z̃_j − z̃_y} <= log Σ_j E e^{...} = log Σ_j exp(z_j − z_y + λ/2 (w_j−w_y)ᵀ Σ_y (w_j−w_y)),
    i.e. cross-entropy on logits shifted by λ/2·q_{y,j}: infinitely many augmented copies at the
    cost of one matrix per category pair. `cov` is (C, D, D) or, diagonal, (C, D); it is a running
    statistic (no gradient) while W gets gradient through q, as in ISDA. Mean over samples.
    """
    logits = F.linear(features, weight, bias)
    diff = weight.unsqueeze(0) - weight.unsqueeze(1)               # (C_y, C_j, D): w_j − w_y
    if cov.dim() == 3:
        quadratic = (torch.matmul(diff, cov) * diff).sum(dim=2)
    else:
        quadratic = (diff.square() * cov.unsqueeze(1)).sum(dim=2)
    return F.cross_entropy(logits + 0.5 * strength * quadratic[targets], targets)


# ------------------------------------------------------------------------------------ the method
@AUGMENTERS.register("lcreg", config=LcregConfig, defaults={"insert_at": -1, "start_fraction": 0.0, "head_ratio": 0.5})
class Lcreg(Augmenter):
    """Latent categories on the feature map at the insertion boundary, trained by L_Recon and L_latent_aug.

    Defaults: after the last stage (f ∈ R^{D×H×W} is the encoder output before pooling, Sec. 3),
    active from the first epoch (λ's t/T ramp already softens the start). LCReg is class-agnostic,
    so `head_ratio` is unused.
    """

    def __init__(self, context: AugmenterContext):
        super().__init__(context)
        self.cfg: LcregConfig = context.config.augmenter.lcreg
        self.epochs = context.config.train.epochs
        if self.cfg.second_stage_epochs >= self.epochs:
            raise ConfigError("augmenter.lcreg.second_stage_epochs", self.cfg.second_stage_epochs,
                              f"fewer than train.epochs ({self.epochs}): the first stage needs at least one epoch")
        dim, count = context.feature.channels, self.cfg.latent_count
        # random latent embeddings (Sec. 3.1), scaled so FC(f'_m)ᵀ f starts O(1) and the sigmoid is not saturated
        self.latents = nn.Parameter(torch.randn(count, dim) / math.sqrt(dim))
        self.encode = nn.Linear(dim, dim)                          # the paper's 1×1 conv FC on the latents
        self.decode = nn.Conv2d(count, dim, kernel_size=1)          # decoder: mixes S into f
        nn.init.zeros_(self.decode.weight)
        nn.init.zeros_(self.decode.bias)
        self.stats = OnlineCovariance(count, dim, self.cfg.covariance)
        self.to(context.device)

    # ---------------------------------------------------------------- engine hooks
    @property
    def loss_weights(self) -> dict[str, float]:
        return {"latent_aug": self.cfg.aug_weight, "recon": self.cfg.recon_weight}

    @property
    def cls_weight(self) -> float:
        return self.cfg.cls_weight

    def in_second_stage(self, epoch: int) -> bool:
        return self.cfg.second_stage_epochs > 0 and epoch >= self.epochs - self.cfg.second_stage_epochs

    def sampler(self, epoch: int) -> str | None:
        return self.cfg.second_stage_sampler if self.in_second_stage(epoch) else None

    def trainable_parameters_filter(self, epoch: int) -> Callable[[str], bool] | None:
        """Second stage: a predicate on the backbone's `named_parameters()` names (only the classifier trains), else None."""
        if not self.in_second_stage(epoch):
            return None
        return lambda name: name.startswith(CLASSIFIER_PREFIX)

    def on_epoch_start(self, epoch: int) -> None:
        """Freeze the latents, FC and decoder for the second stage (the decoder stays in the network)."""
        self.requires_grad_(not self.in_second_stage(epoch))

    def eval_transform(self, feats: torch.Tensor) -> torch.Tensor:
        """The decoder, f + Conv1×1(S): the network's path at the boundary at evaluation (and in stage 2)."""
        return self._decode(feats, self._similarity(feats)[0])

    # ---------------------------------------------------------------- training step
    def augment(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        if self.in_second_stage(state.epoch):
            return AugmentOutput(self.eval_transform(feats), labels)
        sim, encoded, flat = self._similarity(feats)
        aux: dict[str, torch.Tensor] = {}
        if self.cfg.recon_weight > 0 or self.cfg.aug_weight > 0:
            with torch.autocast(device_type=feats.device.type, enabled=False):
                assign = torch.softmax(sim, dim=1)                 # Ŝ, Eq. 2
                if self.cfg.recon_weight > 0:
                    aux["recon"] = reconstruction_loss(encoded, assign, flat)
                if self.cfg.aug_weight > 0:
                    aux["latent_aug"] = self._latent_aug(encoded, assign, flat, self.cfg.lambda0 * state.progress)
        return AugmentOutput(self._decode(feats, sim), labels, aux_losses=aux)

    def _similarity(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S (N, M, P) in float32, the encoded latents (M, D) and f flattened to (N, D, P)."""
        with torch.autocast(device_type=feats.device.type, enabled=False):
            flat = feats.float().flatten(2)
            encoded = self.encode(self.latents)
            return similarity_maps(encoded, flat), encoded, flat

    def _decode(self, feats: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        maps = sim.view(sim.shape[0], sim.shape[1], *feats.shape[2:])
        return feats + self.decode(maps).to(feats.dtype)

    def _latent_aug(self, encoded: torch.Tensor, assign: torch.Tensor, flat: torch.Tensor, strength: float) -> torch.Tensor:
        """L_latent_aug (Eq. 8–9): each u_{i,m} classified as latent m by w_j = FC(f'_j) under N(u, λΣ_m)."""
        samples = latent_features(assign, flat)                    # (N, M, D)
        self.stats.update(samples.detach())                        # Eq. 5–6, before use as ISDA does
        count = samples.shape[1]
        targets = torch.arange(count, device=samples.device).repeat(samples.shape[0])
        return implicit_augmentation_loss(samples.reshape(-1, samples.shape[2]), targets, encoded, None,
                                          self.stats.cov, strength)
