"""LCReg's equations as plain functions on tensors (Liu et al., Eq. 1–9); the module `lcreg.py` wires them.

Shapes: f flattened to (N, D, P) with P = H·W positions, encoded latents FC(f'_m) as (M, D).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch.augmenters.base import rows

Assignment = Literal["logits", "sigmoid"]
Reduction = Literal["sum", "mean"]


# ------------------------------------------------------------------------------------ Eq. 1 – 4
def similarity_logits(encoded: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """FC(f'_m)ᵀ f at every position, the argument of Eq. 1's sigmoid: (M, D), (N, D, P) -> (N, M, P)."""
    return torch.matmul(encoded, flat)


def similarity_maps(encoded: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """S^m = σ(FC(f'_m)ᵀ f) per position (Eq. 1), in (0, 1): the decoder's input."""
    return torch.sigmoid(similarity_logits(encoded, flat))


def assignment(logits: torch.Tensor, mode: Assignment) -> torch.Tensor:
    """Ŝ of Eq. 2, normalised over the M latents (dim 1) of similarity `logits` (N, M, P).

    `sigmoid` is the literal Eq. 2, softmax over S = σ(logits). S lies in (0, 1), so no latent can
    be more than e times as likely as another: with M = 40 every position spreads over all latents
    (entropy ≈ ln M), Eq. 3 rebuilds every position from the same mean latent and both auxiliary
    terms sit at chance. `logits` (default) takes the softmax over FC(f'_m)ᵀ f before the
    sigmoid, which is monotone, so Eq. 2 keeps its meaning (the most similar latent wins) and
    can actually pick one.
    """
    return torch.softmax(torch.sigmoid(logits) if mode == "sigmoid" else logits, dim=1)


def reconstruction_loss(encoded: torch.Tensor, assign: torch.Tensor, flat: torch.Tensor,
                        reduction: Reduction = "sum", temperature: float | None = 0.1) -> torch.Tensor:
    """L_Recon (Eq. 3–4): f̂ = Σ_m FC(f'_m) Ŝ^m, C_f = f̂ᵀ f, softmax-CE of each row of C_f to its diagonal.

    Position j of the rebuilt map must match position j of the original better than any other
    position, which pushes each latent to stand for a distinct part. Eq. 4 sums over the H·W
    positions (`sum`, chance level H·W·ln(H·W)); `mean` divides by H·W (chance ln(H·W)). Mean over
    images either way. At a 1×1 map the term is identically 0.

    `temperature` τ: C_f[j, q] = cos(f̂_j, f_q)/τ, the correlation of unit vectors. `None` is the
    literal f̂_jᵀ f_q, whose scale is |FC(f')|·|f| (≈ 0.8·20 on ResNet-32's last stage): its gradient
    on the latents is ~β·H·W·|f| per step, which inflates FC(f') until C_f and Eq. 1 saturate and
    the loss climbs (diverges). The cosine keeps the same diagonal target with bounded logits.
    """
    rebuilt = torch.matmul(encoded.t(), assign)                    # (N, D, P), Eq. 3
    if temperature is not None:
        rebuilt = F.normalize(rebuilt, dim=1) / temperature
        flat = F.normalize(flat, dim=1)
    correlation = torch.matmul(rebuilt.transpose(1, 2), flat)      # (N, P, P): C_f[j, q] = f̂_jᵀ f_q
    images, positions = flat.shape[0], correlation.shape[-1]
    targets = torch.arange(positions, device=flat.device).repeat(images)
    per_position = F.cross_entropy(correlation.reshape(-1, positions), targets, reduction="none")
    per_image = per_position.view(images, positions)
    return (per_image.sum(1) if reduction == "sum" else per_image.mean(1)).mean()


def reconstruction_chance(positions: int, reduction: Reduction) -> float:
    """L_Recon of a uniform row softmax: ln(H·W) per position, summed (Eq. 4) or averaged."""
    per_position = math.log(positions)
    return per_position * positions if reduction == "sum" else per_position


def latent_features(assign: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """u_{i,m} = Σ_p Ŝ^m_p f_p / Σ_p Ŝ^m_p: image i's part assigned to latent m, (N, M, D).

    Only for `aug_features: image_parts` (the pre-audit reading of Eq. 7–9).
    """
    pooled = torch.matmul(assign, flat.transpose(1, 2))            # (N, M, D)
    return pooled / assign.sum(dim=2, keepdim=True)


def assignment_entropy(assign: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Ŝ over the M latents at every position, (N, P): ln M = no preference."""
    return -(assign * assign.clamp_min(1e-12).log()).sum(dim=1)


def latent_perplexity(assign: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the batch's mean assignment: how many latents the batch uses (1 … M)."""
    usage = assign.mean(dim=(0, 2))
    return torch.exp(-(usage * usage.clamp_min(1e-12).log()).sum())


def latents_won(assign: torch.Tensor) -> torch.Tensor:
    """How many latents are the argmax of Ŝ at one position or more in the batch (device scalar)."""
    won = torch.zeros(assign.shape[1], device=assign.device)
    return won.index_fill_(0, assign.argmax(dim=1).flatten(), 1.0).sum()


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
        """Fold in `samples` (n', categories, D): n' samples of every category."""
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
    return F.cross_entropy(logits + 0.5 * strength * rows(quadratic, targets), targets)
