"""LCReg (Liu et al., "Long-tailed image classification with latent categories based recognition").

Head and tail classes share parts (legs, textures), so the feature map f (D×H×W) at the insertion
boundary is compared with M learnable, class-agnostic latent categories f'_m. Each position gets a
similarity to every latent (Eq. 1), the maps are normalised over M (Eq. 2) and used to rebuild f
from the latents (Eq. 3), scored by a per-position contrastive reconstruction loss (Eq. 4). The
latent categories are augmented implicitly, ISDA-style, with per-latent covariances estimated online
(Eq. 5–6) and the closed-form upper bound of the expected cross-entropy (Eq. 7–9). The network then
continues from f combined with the similarity maps (the paper's "decoder"); the total loss is
α·L_latent_aug + β·L_Recon + γ·L_cls (Eq. 10). The equations live in `_lcreg_terms.py`.

Why the auxiliary terms sat at chance, why L_Recon then diverged, and the two stabilisations:
- Eq. 2 literally takes a softmax over S = σ(·) ∈ (0, 1) (`assignment: sigmoid`): a softmax over
  a bounded axis, so no latent is ever more than e times as likely as another and with M = 40 the
  assignment stays uniform (entropy ≈ ln M). Eq. 3 then rebuilds every position from the same mean
  latent, so L_Recon cannot prefer the diagonal (chance, ln(H·W) per position), and the per-image
  parts u_{i,m} of the old L_latent_aug were all the same average of f (chance, ln M). The default
  `assignment: logits` takes Eq. 2's softmax over FC(f'_m)ᵀ f before the (monotone) sigmoid: the
  same ranking of latents, but it can commit to one. S = σ(·) stays the decoder's input (Eq. 1).
- Once Ŝ can commit, Eq. 4's literal C_f = f̂ᵀ f (a dot product with ReLU features of norm ≈ 20 per
  position on ResNet-32's last stage) gives the latents a gradient of order β·H·W·|f| per step:
  on CIFAR-10, FC(f') grew from 0.8 to 21 in 11 SGD steps, Eq. 1's logits reached 10⁴ and L_Recon
  climbed to 30× its chance level. The default `recon_temperature: 0.1` correlates unit vectors,
  C_f[j, q] = cos(f̂_j, f_q)/τ: the same diagonal target, logits bounded by 1/τ, invariant to the
  scale of f and FC(f'). `recon_temperature: null` is the literal dot product.

Choices the paper leaves open, made here and kept in one place:
- Eq. 7–9 (`aug_features: latents`, default): the augmented features are the latent features f'_m
  themselves with pseudo label y'_m = m; Eq. 5–6 track their mean and covariance over iterations
  (one sample per latent per step, so Σ'_m = 0 and Σ_m is the spread of f'_m along training). Eq. 9's
  w, b are "a 1×1 convolution": the FC of Eq. 1 maps D→D and cannot score M categories, so they
  are a D→M layer of their own (`latent_classifier`). L = mean over the M latents; it trains the
  latents and that layer, not the backbone (θ of Eq. 8 are the latent-side parameters).
  `aug_features: image_parts` keeps the earlier reading: per-image parts u_{i,m} = Σ_p Ŝ^m_p f_p /
  Σ_p Ŝ^m_p classified by w_j = FC(f'_j) without bias.
- L_Recon (Eq. 4) sums over the H·W positions (`recon_reduction: sum`), mean over images; `mean`
  also averages over positions (β then acts 1/(H·W) as strong). At a 1×1 map the term is 0.
- The decoder is f + Conv1×1(S) (M→D), zero-initialised: the network is unchanged when LCReg
  switches on and the decoder then learns how much of the similarity maps to mix in. It is part of
  the network at evaluation: the engine applies `eval_transform` at the insertion boundary.
- λ0 is not given in the paper; 0.5 is ISDA's CIFAR value (LCReg follows ISDA for λ = (t/T)·λ0).
- The second stage (Sec. 3.4, "following [22]": MiSLAS's decoupled classifier fine-tuning) trains
  only the classifier, on a class-balanced sampler, for the last `second_stage_epochs` epochs. The
  field defaults to 0 because it must be below `train.epochs` (short runs); the CIFAR recipe turns it
  on through `configs/presets/lcreg_cifar.yaml`.

Magnitudes at activation, measured on the real CIFAR-10 files (LT slice of 3,391 images, ResNet-32,
insertion after the last stage so H·W = 64, M = 40, paper defaults, first step; live values are in
the `aug/*` diagnostics):
- L_Recon (sum over H·W, τ = 0.1): 247 from scratch with CE (248 LDAM-DRW); 285 (CE) and 238 (LDAM)
  switched on over a trained network at lr 0.001. Chance H·W·ln(H·W) = 266. So β·L_Recon ≈ 24–28
  against L_cls ≈ 6.4 (CE) / 15.4 (LDAM-DRW) from scratch and 1.3 / 10.7 warm: Eq. 4's sum makes it
  the largest printed term (divide by 64 for `recon_reduction: mean`). After 3 epochs it is at
  0.27–0.32 of chance from scratch and 0.27 (CE) / 0.39 (LDAM) warm.
- L_latent_aug: 3.70 in every regime (chance ln 40 = 3.69; λ = 0 at t = 0), α·L ≈ 0.37. Its gradient
  is α/M per unit-norm latent, so it is a slow regulariser: 0.974 of chance after 3 warm-up epochs
  (81 steps, lr ≤ 0.06), unchanged at lr 0.001; on its own at lr 0.1 it reaches 0.70 after 300 steps
  and 0.05 after 1,000.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from ltsearch import _checks as check
from ltsearch.augmenters._lcreg_terms import (Assignment, OnlineCovariance, Reduction, assignment, assignment_entropy,
                                              implicit_augmentation_loss, latent_features, latent_perplexity,
                                              latents_won, reconstruction_chance, reconstruction_loss,
                                              similarity_logits)
from ltsearch.augmenters.base import AugmentOutput, Augmenter, AugmenterContext, BeforeStart, TrainState
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
    the last that many epochs on `second_stage_sampler`. `assignment` and `recon_temperature` are
    the stabilisations of Eq. 2 and 4 (literal: `sigmoid`, `null`); `aug_features` and
    `recon_reduction` the readings of Eq. 7–9 and 4 (before the audit: `image_parts`, `mean`).
    """

    latent_count: int = 40
    aug_weight: float = 0.1
    recon_weight: float = 0.1
    cls_weight: float = 1.0
    lambda0: float = 0.5
    covariance: Literal["full", "diagonal"] = "full"
    assignment: Assignment = "logits"
    aug_features: Literal["latents", "image_parts"] = "latents"
    recon_reduction: Reduction = "sum"
    recon_temperature: float | None = 0.1
    second_stage_epochs: int = 0
    second_stage_sampler: str = "class_balanced"

    def validate(self, where: str) -> None:
        check.integer(f"{where}.latent_count", self.latent_count)
        check.number(f"{where}.latent_count", self.latent_count, low=2, what="the number M of latent categories (Eq. 9 needs two)")
        check.number(f"{where}.aug_weight", self.aug_weight, low=0.0, what="α of Eq. 10; 0 removes L_latent_aug")
        check.number(f"{where}.recon_weight", self.recon_weight, low=0.0, what="β of Eq. 10; 0 removes L_Recon")
        check.number(f"{where}.cls_weight", self.cls_weight, low=0.0, low_open=True,
                     what="γ of Eq. 10; without L_cls nothing trains the classifier")
        check.number(f"{where}.lambda0", self.lambda0, low=0.0, what="λ0 of λ = (t/T)·λ0")
        if self.recon_temperature is not None:
            check.number(f"{where}.recon_temperature", self.recon_temperature, low=0.0, low_open=True,
                         what="τ of the cosine correlation in Eq. 4; null = the literal dot product")
        check.integer(f"{where}.second_stage_epochs", self.second_stage_epochs)
        check.number(f"{where}.second_stage_epochs", self.second_stage_epochs, low=0)
        if self.second_stage_epochs > 0:
            check.registered(f"{where}.second_stage_sampler", self.second_stage_sampler, SAMPLERS)


@AUGMENTERS.register("lcreg", config=LcregConfig, defaults={"insert_at": -1, "start_fraction": 0.0, "head_ratio": 0.5},
                     components={"L_latent_aug": {"augmenter.lcreg.aug_weight": 0.0},      # α of Eq. 10 (Table 7's "latent aug")
                                 "L_Recon": {"augmenter.lcreg.recon_weight": 0.0}},        # β of Eq. 10 (Table 7's "latent recon")
                     # Active from epoch 0 by default (nothing to share). With start_epoch > 0 the step is the
                     # identity before T and the latents, FC and decoder get no gradient; evaluation runs
                     # `eval_transform` = f + decoder(S) from epoch 0, but the decoder is zero-initialised and
                     # untrained before T, so it adds exactly 0. Nothing of LCReg's own state changes before T.
                     before_start=BeforeStart(keys=(
                         "lcreg.cls_weight",            # γ: the engine scales L_cls by `cls_weight` on every step, before T too
                         "lcreg.second_stage_epochs",   # the classifier-only stage (trainable filter, frozen BN, sampler)
                                                        # follows train.epochs, not T: it falls before T when
                                                        # start_epoch > epochs - second_stage_epochs
                         "lcreg.second_stage_sampler",  # that stage's sampler, then drawn before T
                         "head_ratio",                  # the head mask goes to the train loader; a DRS schedule with
                                                        # the `head_tail` sampler (loss.resample.sampler) draws from it
                     ), trains=False))
class Lcreg(Augmenter):
    """Latent categories on the feature map at the insertion boundary, trained by L_Recon and L_latent_aug.

    Defaults: after the last stage (f ∈ R^{D×H×W} is the encoder output before pooling, Sec. 3),
    active from the first epoch (λ's t/T ramp already softens the start). LCReg is class-agnostic,
    so `head_ratio` is unused.

    Diagnostics per epoch: `recon_term`/`recon_chance`/`recon_ratio` and `aug_term`/`aug_chance`/
    `aug_ratio` (each term against a uniform guess: ratio < 1 means it learns); what the latents do:
    `assign_entropy` (nats of Ŝ per position, ln M = undecided) and its `assign_entropy_ratio`,
    `latent_perplexity` (latents the batch uses, 1…M), `latents_won` (latents that are some position's
    argmax); `isda_lambda` (λ of Eq. 9) and `decoder_gain` (‖decoder weight‖, how much S is mixed in).
    """

    progress_keys = ("recon_ratio", "aug_ratio", "latent_perplexity")

    def __init__(self, context: AugmenterContext):
        super().__init__(context)
        self.cfg: LcregConfig = context.config.augmenter.lcreg
        self.epochs = context.config.train.epochs
        if self.cfg.second_stage_epochs >= self.epochs:
            raise ConfigError("augmenter.lcreg.second_stage_epochs", self.cfg.second_stage_epochs,
                              f"fewer than train.epochs ({self.epochs}): the first stage needs at least one epoch")
        dim, count = context.feature.channels, self.cfg.latent_count
        self.positions = context.feature.height * context.feature.width
        # random latent embeddings (Sec. 3.1), scaled so FC(f'_m)ᵀ f starts O(1) and the sigmoid is not saturated
        self.latents = nn.Parameter(torch.randn(count, dim) / math.sqrt(dim))
        self.encode = nn.Linear(dim, dim)                          # the paper's 1×1 conv FC on the latents
        self.decode = nn.Conv2d(count, dim, kernel_size=1)          # decoder: mixes S into f
        nn.init.zeros_(self.decode.weight)
        nn.init.zeros_(self.decode.bias)
        if self.cfg.aug_features == "latents":
            self.latent_classifier = nn.Linear(dim, count)          # w, b of Eq. 9 over the M latent categories
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
        logits, _, _ = self._similarity(feats)
        return self._decode(feats, torch.sigmoid(logits))

    def epoch_diagnostics(self) -> dict[str, float]:
        """The recorded means plus each term's chance level and term/chance (below 1 = the term learns)."""
        values = super().epoch_diagnostics()
        chances = {"aug": math.log(self.cfg.latent_count),
                    "recon": reconstruction_chance(self.positions, self.cfg.recon_reduction)}
        for term, chance in chances.items():
            if f"{term}_term" in values:
                values[f"{term}_chance"] = chance
                if chance > 0:
                    values[f"{term}_ratio"] = values[f"{term}_term"] / chance
        if "assign_entropy" in values:
            values["assign_entropy_ratio"] = values["assign_entropy"] / math.log(self.cfg.latent_count)
        return values

    # ---------------------------------------------------------------- training step
    def augment(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        if self.in_second_stage(state.epoch):
            return AugmentOutput(self.eval_transform(feats), labels)
        logits, encoded, flat = self._similarity(feats)
        aux: dict[str, torch.Tensor] = {}
        if self.cfg.recon_weight > 0 or self.cfg.aug_weight > 0:
            with torch.autocast(device_type=feats.device.type, enabled=False):
                assign = assignment(logits, self.cfg.assignment)   # Ŝ, Eq. 2
                self._record_assignment(assign)
                if self.cfg.recon_weight > 0:
                    aux["recon"] = reconstruction_loss(encoded, assign, flat, self.cfg.recon_reduction,
                                                        self.cfg.recon_temperature)
                    self.diagnostics.mean("recon_term", aux["recon"])
                if self.cfg.aug_weight > 0:
                    strength = self.cfg.lambda0 * state.progress
                    aux["latent_aug"] = self._latent_aug(encoded, assign, flat, strength)
                    self.diagnostics.mean("aug_term", aux["latent_aug"])
                    self.diagnostics.mean("isda_lambda", torch.tensor(strength, device=feats.device))
        self.diagnostics.mean("decoder_gain", self.decode.weight.norm())
        return AugmentOutput(self._decode(feats, torch.sigmoid(logits)), labels, aux_losses=aux)

    def _similarity(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FC(f'_m)ᵀ f (N, M, P) in float32 (Eq. 1 before σ), the encoded latents (M, D) and f as (N, D, P)."""
        with torch.autocast(device_type=feats.device.type, enabled=False):
            flat = feats.float().flatten(2)
            encoded = self.encode(self.latents)
            return similarity_logits(encoded, flat), encoded, flat

    def _decode(self, feats: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        maps = sim.view(sim.shape[0], sim.shape[1], *feats.shape[2:])
        return feats + self.decode(maps).to(feats.dtype)

    def _record_assignment(self, assign: torch.Tensor) -> None:
        self.diagnostics.mean("assign_entropy", assignment_entropy(assign.detach()))
        self.diagnostics.mean("latent_perplexity", latent_perplexity(assign.detach()))
        self.diagnostics.mean("latents_won", latents_won(assign.detach()))

    def _latent_aug(self, encoded: torch.Tensor, assign: torch.Tensor, flat: torch.Tensor, strength: float) -> torch.Tensor:
        """L_latent_aug (Eq. 7–9) on the configured samples, after folding them into Σ (Eq. 5–6) as ISDA does."""
        if self.cfg.aug_features == "latents":
            samples = self.latents.unsqueeze(0)                    # (1, M, D): f'_m, one sample per latent
            weight, bias = self.latent_classifier.weight, self.latent_classifier.bias
        else:
            samples = latent_features(assign, flat)                # (N, M, D): image i's part of latent m
            weight, bias = encoded, None
        self.stats.update(samples.detach())
        count = samples.shape[1]
        targets = torch.arange(count, device=samples.device).repeat(samples.shape[0])
        return implicit_augmentation_loss(samples.reshape(-1, samples.shape[2]), targets, weight, bias,
                                          self.stats.cov, strength)
