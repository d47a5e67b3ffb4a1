"""RSG, the rare-class sample generator (Wang et al., CVPR 2021), as a feature-map augmenter.

RSG sits at a stage boundary. Three small modules act on the feature maps there:
- centre estimation (Eq. 1): K learnable centres per class, with a soft assignment γ;
- a contrastive module (Eq. 2): a pair classifier that tells whether two maps share a class;
- vector transformation (Eq. 3-4): a 3x3 conv T.

A frequent-class sample minus its closest centre is a "feature displacement": pose, light, etc.
T maps that displacement and adds it to a real rare-class sample, so the rare classes gain the
head classes' intra-class variation. Before T_th, RSG only learns its centres and its contrastive
module (L_CESC, Eq. 5). From T_th on, the contrastive module is frozen and RSG appends
s_new = max(⌊β·s_freq/s_rare⌋, 1)·s_rare generated tail samples to the batch. T is trained by the
classification loss and by L_MV (Eq. 6): align T's output with the rare sample's own displacement,
keep its length, and make it look unlike its source class. The total loss is
L_cls + λ1·L_CESC + λ2·L_MV (Eq. 7).

Gradients follow Algorithm 1. L_CESC reaches only the centres, the assignment and (before T_th)
the contrastive module. L_MV reaches only T. L_cls on the generated samples reaches T and the
backbone through the real samples, unless `detach_inputs` is set (the reference code's behaviour).

Scale. Eq. 5 sums over D·H·W and Eq. 6 over H·W, each averaged over samples; the reference code
does the same, and λ1 = 0.1, λ2 = 0.01 were tuned with these sums, so they stay. No term reaches the
backbone, and the sums set how fast RSG's own parts learn: a centre's SGD contraction per step is
about lr·λ1·2·H·W·(share of its class in the batch) ≈ 1.5 at lr 0.1 and 0.015 at lr 0.001 at the
paper's boundary (16×16), so centres fit within about an epoch even when RSG is switched on over a
trained network; a per-element mean would make that 8,192× slower. What makes the logged value huge
is mostly the spread of each map around its own mean (a constant of the detached maps, no
gradient, ~90% of the literal value once the centres fit); it is left out of `cesc_center`
(`cesc_literal: true` keeps it). The total loss stays dominated by λ1·L_CESC: read `train/cls_loss`.

Magnitudes measured on CIFAR-10-LT (ρ = 100, slice of ≤ 500 images per class, ResNet-32, boundary
-2 = 32×16×16, batch 128, no grad clip), first → 12th step after activation:
- from scratch (lr warm-up from 0.1/5), CE / Balanced Softmax / LDAM-DRW: cesc_center ≈ 24,000 →
  4,000-16,000 (literal, with the spread: ≈ 49,000 → 34,000), mv_direction ≈ 250 (256 pixels ×
  1 − cos ≈ 1; 220 after 3 epochs), mv_length ≈ 1,400 → 3,400 (240 after 3 epochs), mv_contrastive ≈
  0.5-0.8; L_cls 6-16 → 3-14. With λ: 0.1·L_CESC ≈ 400-2,400, 0.01·L_MV ≈ 5-35.
- over a trained network (10-epoch baseline, lr 0.001, centres from zero): CE cesc_center ≈ 8,700 →
  6,300, mv_length ≈ 980 → 460; LDAM-DRW (cosine head) cesc_center ≈ 49,000 → 30,000, mv_length ≈
  2,400 → 900; mv_direction ≈ 250 → 220, mv_contrastive ≈ 0.4-0.75; L_cls 1.6 (CE), 13-14 (LDAM).
Diagnostics: `generated` (tail samples appended per epoch), `generating_share` (share of batches
that held both frequent and rare samples), `displacement_norm` and `transformed_norm` (per-pixel
channel norms of x_fd-freq and of what Eq. 4 adds; Eq. 6 asks T to keep the first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch import _checks as check
from ltsearch.augmenters.base import AugmentOutput, Augmenter, AugmenterContext, BeforeStart, TrainState, rows
from ltsearch.registry import AUGMENTERS

CESC_TERMS = ("cesc_center", "cesc_contrastive")
MV_TERMS = ("mv_direction", "mv_length", "mv_contrastive")


@dataclass
class RsgConfig:
    """The `augmenter.rsg` section. Defaults are the paper's CIFAR long-tailed setting (Sec. 4, ablations).

    For step imbalance the paper uses head_ratio 0.5 and transfer_strength 0.01.
    `lambda_cesc` and `lambda_mv` are λ1 and λ2 of Eq. 7. Each term of Eq. 5 and Eq. 6 also has its
    own multiplier, and a multiplier of 0 means the term is not computed. This covers Table 3's
    "MV loss w/o k-th term" ablations.

    Variants:
    - `vector_transform: false` is Table 3's "Direct Addition": the displacement is added as is, with
      no T and no L_MV.
    - `add_to: center` is Table 3's "Adding to Rare-class Centers".

    Reference-code options (the paper's behaviour is the default):
    - `contrastive_first_kernel: 1`: the code's first conv of h is 1x1. The paper uses two 3x3 convs.
    - `mv_pair: frequent_sample`: the code feeds (x_freq, T(x_fd-freq)) to the contrastive module.
      Eq. 6 feeds (T(x_fd-freq), x_fd-rare).
    - `mv_vectors: flat`: the code compares consecutive runs of C values of the flattened C·H·W map.
      Eq. 6 compares the channel vector at each pixel.
    - `detach_inputs: true`: the code detaches the real maps before generating, so L_cls on the
      generated samples never reaches the backbone.

    The code's elementwise product Σ_c |â_c·b̂_c − 1| of unit vectors equals C − cos(a, b). Its
    gradient is therefore the cosine's, so it needs no switch.

    `cesc_literal: true` logs Eq. 5's centre term with the spread Σ(x − up(ave x))² of each map
    around its own mean. That part is a constant of the detached maps: it has no gradient and
    leaves the optimisation unchanged, but it is most of the value (see the module docstring).
    """

    num_centers: int = 15
    contrastive_channels: int = 256
    contrastive_first_kernel: int = 3
    transfer_strength: float = 1.0
    lambda_cesc: float = 0.1
    lambda_mv: float = 0.01
    cesc_center: float = 1.0
    cesc_contrastive: float = 1.0
    mv_direction: float = 1.0
    mv_length: float = 1.0
    mv_contrastive: float = 1.0
    vector_transform: bool = True
    add_to: Literal["sample", "center"] = "sample"
    mv_pair: Literal["rare_displacement", "frequent_sample"] = "rare_displacement"
    mv_vectors: Literal["pixel", "flat"] = "pixel"
    detach_inputs: bool = False
    cesc_literal: bool = False

    def validate(self, where: str) -> None:
        check.integer(f"{where}.num_centers", self.num_centers)
        check.number(f"{where}.num_centers", self.num_centers, low=1)
        check.integer(f"{where}.contrastive_channels", self.contrastive_channels)
        check.number(f"{where}.contrastive_channels", self.contrastive_channels, low=1)
        check.choice(f"{where}.contrastive_first_kernel", self.contrastive_first_kernel, (1, 3))
        check.number(f"{where}.transfer_strength", self.transfer_strength, low=0.0, high=1.0, low_open=True,
                     what="β of Algorithm 1")
        for key in ("lambda_cesc", "lambda_mv", *CESC_TERMS, *MV_TERMS):
            check.number(f"{where}.{key}", getattr(self, key), low=0.0, what="a loss weight; 0 removes the term")


def num_generated(transfer_strength: float, s_freq: int, s_rare: int) -> int:
    """s_new = max(⌊β·s_freq/s_rare⌋, 1)·s_rare (Sec. 3, workflow).

    The 1e-9 keeps ⌊0.29·100⌋ = 29 despite binary rounding (0.29·100 = 28.999...).
    """
    return max(math.floor(transfer_strength * s_freq / s_rare + 1e-9), 1) * s_rare


def mean_of_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """ave(conv(x)) for a 3x3, stride-1, padding-1 conv, without the H×W output map.

    The conv is linear, so the spatial mean of its output is the kernel applied to the sums of x over
    the rows (columns) each tap sees. Zero padding hides the last row from the top taps and the
    first row from the bottom taps. On the contrastive module's 256-channel maps this costs
    O(N·C·H·W + N·C·O·9) instead of O(N·C·O·9·H·W).
    """
    height, width = x.shape[-2:]
    sums = torch.einsum("uh,nchw,vw->ncuv", _tap_windows(height, x), x, _tap_windows(width, x))
    pooled = F.conv2d(sums, conv.weight).flatten(1) / (height * width)
    return pooled + conv.bias if conv.bias is not None else pooled


def _tap_windows(size: int, like: torch.Tensor) -> torch.Tensor:
    """(3, size) 0/1 matrix: row u marks the input positions that kernel tap u reads."""
    windows = torch.ones(3, size, dtype=like.dtype, device=like.device)
    windows[0, -1] = 0
    windows[2, 0] = 0
    return windows


class CenterEstimation(nn.Module):
    """Eq. 1: γ = softmax(A^l·ave(x) + b^l) over the K centres C^l of the sample's class l."""

    def __init__(self, num_classes: int, num_centers: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, num_centers, channels))
        self.bias = nn.Parameter(torch.zeros(num_classes, num_centers))
        self.centers = nn.Parameter(torch.zeros(num_classes, num_centers, channels))

    def logits(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, K) assignment logits, from the sample's own class row only (A^l, b^l)."""
        return torch.einsum("nd,nkd->nk", pooled, rows(self.weight, labels)) + rows(self.bias, labels)

    def loss(self, x: torch.Tensor, pooled: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor,
             with_spread: bool = False) -> torch.Tensor:
        """First term of Eq. 5: ⟨Σ_i γ_i Σ_{d,j,k} (x − up(C_i))²⟩_s, up to a constant unless `with_spread`.

        Σ_{d,j,k}(x − up(c))² = Σ(x − up(ave x))² + H·W·‖ave x − c‖², because the cross term sums to
        zero (and Σ_i γ_i = 1). So the (N, K, D, H, W) difference tensor is never built. The spread
        Σ(x − up(ave x))² depends on the detached maps only: no parameter can change it, it adds
        nothing to any gradient, and on CIFAR-10 it is ~90% of the literal value once the centres fit.
        """
        distance = x.shape[-2] * x.shape[-1] * (pooled[:, None, :] - rows(self.centers, labels)).square().sum(-1)
        fit = (logits.softmax(1) * distance).sum(1)
        if with_spread:
            fit = fit + (x - pooled[:, :, None, None]).square().sum((1, 2, 3))
        return fit.mean()


class ContrastiveModule(nn.Module):
    """Eq. 2: γ* = softmax(A*·ave(h(cat[x1, x2])) + b*). Index 1 means "same class", index 0 "different".

    h is conv-ReLU-conv with `channels` filters (3x3 and 3x3 in the paper). Two shortcuts, both exact:
    - conv(cat[x1, x2]) is run as conv_1(x1) + conv_2(x2) on the two halves of the kernel. There is
      no concatenated copy, and L_MV back-propagates only into the input that needs it (T's output).
    - The last conv and the average pool are fused by `mean_of_conv3x3`.
    """

    def __init__(self, in_channels: int, channels: int, first_kernel: int):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * in_channels, channels, first_kernel, padding=first_kernel // 2)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(channels, 2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        weight, padding = self.conv1.weight, self.conv1.padding
        half = x1.shape[1]
        hidden = F.conv2d(x1, weight[:, :half], self.conv1.bias, padding=padding) + F.conv2d(x2, weight[:, half:], padding=padding)
        hidden = F.relu(hidden)
        return self.fc(mean_of_conv3x3(hidden, self.conv2)).float()


def _vectors(z: torch.Tensor, grouping: str) -> torch.Tensor:
    """(N, G, C) float32 vectors that Eq. 6 compares: the channel vector at each pixel, or the reference's flat runs."""
    n, c = z.shape[:2]
    if grouping == "pixel":
        return z.float().flatten(2).transpose(1, 2)
    return z.float().reshape(n, -1, c)


def mv_direction_term(transformed: torch.Tensor, rare_displacement: torch.Tensor, grouping: str = "pixel") -> torch.Tensor:
    """First term of Eq. 6: ⟨Σ_{j,k} |cos(T(x_fd-freq), x_fd-rare) − 1|⟩_{s_new}, which equals 1 − cos since cos ≤ 1."""
    cos = F.cosine_similarity(_vectors(transformed, grouping), _vectors(rare_displacement, grouping), dim=-1)
    return (1 - cos).sum(1).mean()


def mv_length_term(transformed: torch.Tensor, displacement: torch.Tensor, grouping: str = "pixel") -> torch.Tensor:
    """Second term of Eq. 6: ⟨Σ_{j,k} |‖T(x_fd-freq)‖ − ‖x_fd-freq‖|⟩_{s_new}. T may turn a displacement but not stretch it."""
    lengths = torch.linalg.vector_norm(_vectors(transformed, grouping), dim=-1)
    target = torch.linalg.vector_norm(_vectors(displacement, grouping), dim=-1)
    return (lengths - target).abs().sum(1).mean()


@AUGMENTERS.register("rsg", config=RsgConfig, defaults={"insert_at": -2, "start_fraction": 0.8, "head_ratio": 0.2},
                     components={"L_CESC": {"augmenter.rsg.lambda_cesc": 0.0},               # λ1 of Eq. 7
                                 "L_MV": {"augmenter.rsg.lambda_mv": 0.0},                   # λ2 of Eq. 7
                                 "L_MV 1st term": {"augmenter.rsg.mv_direction": 0.0},       # Table 3's MV rows
                                 "L_MV 2nd term": {"augmenter.rsg.mv_length": 0.0},
                                 "L_MV 3rd term": {"augmenter.rsg.mv_contrastive": 0.0},
                                 "vector transformation": {"augmenter.rsg.vector_transform": False}},  # = Table 3's "Direct Addition"
                     before_start=BeforeStart(keys=(
                         # Algorithm 1, j < T_th: `before_start` trains the centres, the assignment and the
                         # contrastive module on the maps at the boundary from epoch 0 (trains=True below)
                         "insert_at",                     # which maps L_CESC sees, and the modules' channel count
                         "rsg.num_centers",               # K: shape and random init of the centre estimation
                         "rsg.contrastive_channels",      # width of the contrastive module trained by L_CESC's 2nd term
                         "rsg.contrastive_first_kernel",  # its first conv (shape, init, what it computes)
                         "rsg.lambda_cesc",               # λ1: weight of L_CESC in every step's loss (the modules' step size)
                         "rsg.cesc_center",               # multiplier of L_CESC's centre term (0 skips it)
                         "rsg.cesc_contrastive",          # multiplier of the pair term (0 skips it and its randperm draws)
                         "rsg.cesc_literal",              # the logged centre term (train/loss, train/aux/cesc_center) gains the spread
                         # not the head ratio γ: only the generation (j ≥ T_th) reads the head mask, which is not
                         # checkpointed; the train loader's use of it before T is `prefix_of`'s to check
                     ), trains=True))
class Rsg(Augmenter):
    """Centres and contrastive module learn before T_th; generation and L_MV run from T_th on (Algorithm 1).

    The paper inserts RSG before the second-to-last down-sampling (Table 5). On ResNet-32 that is
    after layer2, i.e. -2. T_th is the epoch of the first LR decay: 160 of 200 epochs. The frequent
    classes are the head_ratio·C most frequent classes (α = 0.2).
    """

    progress_keys = ("generated", "generating_share", "transformed_norm")

    def __init__(self, context: AugmenterContext):
        super().__init__(context)
        self.cfg: RsgConfig = context.config.augmenter.rsg
        channels = context.feature.channels
        self.center_estimation = CenterEstimation(context.num_classes, self.cfg.num_centers, channels)
        self.contrastive = ContrastiveModule(channels, self.cfg.contrastive_channels, self.cfg.contrastive_first_kernel)
        self.transform = nn.Conv2d(channels, channels, 3, padding=1, bias=False)  # T(z) = conv(z), linear (Eq. 4)
        self.to(context.device)

    @property
    def loss_weights(self) -> dict[str, float]:
        """λ1 times each L_CESC term's multiplier, and λ2 times each L_MV term's multiplier (Eq. 7)."""
        weights = {name: self.cfg.lambda_cesc * getattr(self.cfg, name) for name in CESC_TERMS}
        weights.update({name: self.cfg.lambda_mv * getattr(self.cfg, name) for name in MV_TERMS})
        return weights

    def on_epoch_start(self, epoch: int) -> None:
        """From T_th on, the contrastive module is not updated any more (Sec. 3, workflow).

        Its grads are set to None as well, so SGD skips it: no momentum and no weight-decay drift.
        """
        if self.active(epoch):
            for param in self.contrastive.parameters():
                param.requires_grad_(False)
                param.grad = None

    def before_start(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        """Algorithm 1, j < T_th: L_CESC trains the centres, the assignment and the contrastive module."""
        x, pooled, logits = self._assign(feats, labels)
        aux = self._center_term(x, pooled, labels, logits)
        if self.loss_weights["cesc_contrastive"] > 0 and labels.numel() >= 2:
            aux["cesc_contrastive"] = self._pair_term(x, labels)
        return AugmentOutput(feats, labels, aux_losses=aux)

    def augment(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        """Algorithm 1, j ≥ T_th: centre term of L_CESC, then s_new generated tail samples (Eq. 4) and L_MV."""
        x, pooled, logits = self._assign(feats, labels)
        aux = self._center_term(x, pooled, labels, logits)
        pairs = self._pairs(labels)
        self.diagnostics.add("batches", 1)
        if pairs is None:
            self.diagnostics.add("generated", 0)
            return AugmentOutput(feats, labels, aux_losses=aux)
        freq, rare = pairs
        nearest = self.center_estimation.centers.detach()[labels, logits.argmax(1)][:, :, None, None].to(x.dtype)
        source = x if self.cfg.detach_inputs else feats
        displacement = rows(source, freq) - nearest[freq]  # Eq. 3
        shift = self.transform(displacement) if self.cfg.vector_transform else displacement
        base = rows(source, rare) if self.cfg.add_to == "sample" else nearest[rare].expand_as(shift)
        if self.cfg.vector_transform and any(self.loss_weights[name] > 0 for name in MV_TERMS):
            fixed = displacement.detach()
            transformed = shift if self.cfg.detach_inputs else self.transform(fixed)
            aux.update(self._mv_terms(transformed, fixed, x[freq], x[rare] - nearest[rare]))
        generated = (base + shift).to(feats.dtype)
        self._record_generation(rare.numel(), displacement, shift)
        return AugmentOutput(torch.cat([feats, generated]), torch.cat([labels, labels[rare]]), aux_losses=aux)

    def epoch_diagnostics(self) -> dict[str, float]:
        """Adds `generating_share`: the share of active batches that held both frequent and rare samples."""
        values = super().epoch_diagnostics()
        if values.get("batches", 0) > 0:
            values["generating_share"] = values.get("generating_batches", 0.0) / values["batches"]
        return values

    # ------------------------------------------------------------------ pieces
    def _record_generation(self, count: int, displacement: torch.Tensor, shift: torch.Tensor) -> None:
        """Generated samples, and the per-pixel channel norms of x_fd-freq (Eq. 3) and of what is added (T of it, Eq. 4)."""
        self.diagnostics.add("generated", count)
        self.diagnostics.add("generating_batches", 1)
        with torch.no_grad():
            self.diagnostics.mean("displacement_norm", torch.linalg.vector_norm(displacement.float(), dim=1))
            self.diagnostics.mean("transformed_norm", torch.linalg.vector_norm(shift.float(), dim=1))

    def _assign(self, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Detached maps, their float32 GAP and the Eq. 1 logits. L_CESC never reaches the backbone (Algorithm 1)."""
        x = feats.detach()
        with torch.autocast(x.device.type, enabled=False):
            pooled = x.float().mean((2, 3))
            return x, pooled, self.center_estimation.logits(pooled, labels)

    def _center_term(self, x: torch.Tensor, pooled: torch.Tensor, labels: torch.Tensor,
                     logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.loss_weights["cesc_center"] == 0:
            return {}
        with torch.autocast(x.device.type, enabled=False):
            return {"cesc_center": self.center_estimation.loss(x.float(), pooled, labels, logits, self.cfg.cesc_literal)}

    def _pair_term(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Second term of Eq. 5: binary CE of the contrastive module on s/2 random pairs (y = same class)."""
        order = torch.randperm(labels.numel(), device=labels.device)
        half = labels.numel() // 2
        first, second = order[:half], order[half:2 * half]
        same = (labels[first] == labels[second]).long()
        return F.cross_entropy(self.contrastive(x[first], x[second]), same)

    def _pairs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Indices (frequent source, rare target) of the s_new generated samples, or None if a side is empty.

        Each rare sample gets m = s_new / s_rare new samples, each from a random frequent sample. The
        sources are distinct while s_new ≤ s_freq and are reused evenly otherwise. Reading s_freq is the
        one host sync per step: the size of the output batch depends on it.
        """
        is_head = self.head_mask[labels]
        s_freq = int(is_head.sum())
        s_rare = labels.numel() - s_freq
        if s_freq == 0 or s_rare == 0:
            return None
        order = torch.argsort((~is_head).to(torch.uint8), stable=True)
        s_new = num_generated(self.cfg.transfer_strength, s_freq, s_rare)
        shuffled = torch.randperm(s_freq, device=labels.device)
        freq = order[:s_freq][shuffled[torch.arange(s_new, device=labels.device) % s_freq]]
        rare = order[s_freq:].repeat(s_new // s_rare)
        return freq, rare

    def _mv_terms(self, transformed: torch.Tensor, displacement: torch.Tensor, freq_maps: torch.Tensor,
                  rare_displacement: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. 6. Only T receives gradient: the inputs are detached, and the contrastive module is frozen."""
        weights, grouping, aux = self.loss_weights, self.cfg.mv_vectors, {}
        if weights["mv_direction"] > 0:
            aux["mv_direction"] = mv_direction_term(transformed, rare_displacement, grouping)
        if weights["mv_length"] > 0:
            aux["mv_length"] = mv_length_term(transformed, displacement, grouping)
        if weights["mv_contrastive"] > 0:
            pair = (transformed, rare_displacement) if self.cfg.mv_pair == "rare_displacement" else (freq_maps, transformed)
            different = torch.zeros(transformed.shape[0], dtype=torch.long, device=transformed.device)
            aux["mv_contrastive"] = F.cross_entropy(self.contrastive(*pair), different)
        return aux
