"""M2m (Kim, Jeong & Shin, CVPR 2020): translate majority seeds into minority samples in input space.

After the deferral epoch the loader draws class-balanced batches (weights 1/n_c, the reference's
oversampled loader). Each sample (x_i, y_i) of such a batch is, with probability 1 − n_{y_i}/n_max
(Sec. 2.3, "Practical implementation via re-sampling"), replaced by a synthetic sample of class y_i
translated from a seed of a more frequent class k0 found in the same batch:

    k0 ~ Q(k0 | k) ∝ 1 − β^{(n_k0 − n_k)+}                          (Eq. 5)
    x* = argmin_{x = x0 + δ}  CE(g(x), k) + λ·f_k0(x)               (Eq. 2)
    keep x* iff  Bernoulli(1 − β^{(n_k0 − n_k)+}) = 1  and  L(g; x*, k) ≤ γ   (Eq. 3, Alg. 1 line 12)

solved by T normalised gradient steps of size η from a seed perturbed by zero-mean noise δ
(Algorithm 1). g is a classifier trained by plain ERM on the same imbalanced data, f the network
being trained; a rejected generation keeps the real oversampled sample, which is what Algorithm 1
falls back to.

γ thresholds g's cross-entropy L(g; x*, k), as in Sec. 2.3 and Algorithm 1 (paper candidates γ ∈
{0.9, 0.99}: g's confidence on k must reach e^{-γ} ≈ 0.37-0.41). The reference code instead keeps x*
iff softmax(g(x*))_k ≥ γ, a far stricter rule at γ = 0.99; `acceptance: confidence` selects it.

The whole batch is translated in one batched optimisation: every step is one forward of g and f on
all generating samples, and the gradient is taken w.r.t. the inputs only (torch.autograd.grad), so
no parameter gradient is created. g lives outside the module tree: it is neither trained by the
engine's optimiser nor written to checkpoints, and it is fetched lazily, so runs (or trials pruned)
before the deferral epoch never train or load it.

M2m adds no loss term: its only effect is on the batch, so the per-epoch diagnostics say what it
did. `attempts` and `accepted` count generations tried and kept; `acceptance_rate` is their ratio;
`g_pass_rate` is the share of attempts that passed g's γ test (whatever the β draw said);
`g_confidence` and `accepted_confidence` are softmax(g(x*))_k averaged over attempts and over the
kept ones. An `acceptance_rate` of 0 means the run is plain class-balanced re-sampling.

Measured on CIFAR-10-LT (ρ = 100, slice of ≤ 500 train images per class, ResNet-32, paper defaults
T = 10, η = 0.1, λ = 0.5, β = 0.999, γ = 0.99, no grad clip): loss finite throughout.
- over a trained network (lr 0.001), g = the 15-epoch ERM baseline (val 38.9%): g_confidence 0.21
  (max 0.83), g_pass_rate 0.24, acceptance_rate 0.043 with accepted_confidence 0.57. With the
  reference rule (confidence ≥ 0.99) nothing passes. g after 10 epochs: g_pass_rate 0.07; with η = 0.5,
  0.45. The β draw (Eq. 3) is what rejects most here: on this slice n_k0 − n_k ≤ 495, so
  1 − β^Δ ≤ 0.39 (on the full ρ = 100 set it reaches 0.99).
- from scratch, g = a 2-epoch ERM: g_confidence 0.055, nothing accepted (re-sampling only).
A g near chance cannot be translated to in T·η = 1 of L2 distance; the paper's g is a fully trained
ERM network.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch import _checks as check
from ltsearch.augmenters.base import AugmentOutput, Augmenter, AugmenterContext, BeforeStart, TrainState
from ltsearch.errors import ConfigError
from ltsearch.registry import AUGMENTERS

Classifier = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class M2mConfig:
    """The `augmenter.m2m` section, with the paper's defaults (Sec. 3, "Details on M2m").

    `gamma` is the largest cross-entropy L(g; x*, k) a translation may keep (Sec. 2.3, Algorithm 1
    line 12); the paper searches γ ∈ {0.9, 0.99}. The reference `config.py` default is 0.99 while its
    README / run.sh use 0.9. `acceptance: confidence` is the reference code's rule instead, keep iff
    softmax(g(x*))_k ≥ γ; it needs γ ≤ 1 and at γ = 0.99 rejects nearly every translation of a
    g that is not trained to saturation. `noise_radius` is the L2 norm of the random start δ (0.5 in
    the reference).
    `reference_path` is a local checkpoint of g (a state dict of the same backbone, bare or under
    the key 'model'); without it g is trained by plain ERM for `reference_epochs` (None: as many as
    `train.epochs`) and cached on disk per (data, model, seed).
    """

    beta: float = 0.999
    lam: float = 0.5
    gamma: float = 0.99
    acceptance: Literal["loss", "confidence"] = "loss"
    steps: int = 10
    step_size: float = 0.1
    noise_radius: float = 0.5
    reference_path: str | None = None
    reference_epochs: int | None = None

    def validate(self, where: str) -> None:
        check.number(f"{where}.beta", self.beta, low=0.0, high=1.0, high_open=True, what="β of Eq. 3; 0 accepts every seed from a more frequent class")
        check.number(f"{where}.lam", self.lam, low=0.0, what="λ of Eq. 2; 0 is the paper's ablation without the f_k0 term")
        check.choice(f"{where}.acceptance", self.acceptance, ("loss", "confidence"))
        if self.acceptance == "loss":
            check.number(f"{where}.gamma", self.gamma, low=0.0, low_open=True, what="the largest CE of g on the target class that is kept")
        else:
            check.number(f"{where}.gamma", self.gamma, low=0.0, high=1.0, what="the minimum softmax confidence of g on the target class")
        check.number(f"{where}.steps", self.steps, low=1, what="T, gradient steps per generation")
        check.number(f"{where}.step_size", self.step_size, low=0.0, low_open=True, what="η, the L2 length of one step in input space")
        check.number(f"{where}.noise_radius", self.noise_radius, low=0.0, what="L2 norm of the random start δ")
        if self.reference_epochs is not None:
            check.number(f"{where}.reference_epochs", self.reference_epochs, low=1)
        if self.reference_path is not None and not Path(self.reference_path).is_file():
            raise ConfigError(f"{where}.reference_path", self.reference_path,
                              "a path to an existing checkpoint of g (a state dict of the same backbone)",
                              hint="Leave it null to train g by plain ERM once and reuse it from the cache.")


# ------------------------------------------------------------------------------------ closed forms
def acceptance_matrix(class_counts: torch.Tensor, beta: float) -> torch.Tensor:
    """P_accept[k0, k] = 1 − β^{(n_k0 − n_k)+} (one minus the rejection probability of Eq. 3).

    It is 0 whenever k0 is not more frequent than k (including k0 = k): a seed never comes from a
    rarer class. Computed in float64 so that β^Δ stays exact for differences of thousands.
    """
    counts = class_counts.to(torch.float64)
    gap = (counts[:, None] - counts[None, :]).clamp_min(0.0)
    return (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64, device=counts.device), gap)).float()


def generation_probability(class_counts: torch.Tensor) -> torch.Tensor:
    """1 − n_y / n_max per class: on a class-balanced batch this simulates generating n_max − n_y samples of y (Sec. 2.3)."""
    counts = class_counts.to(torch.float64)
    return (1.0 - counts / counts.max()).float()


def draw_seeds(labels: torch.Tensor, accept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every batch position i, the index of a seed in the batch, and whether one exists.

    The paper draws k0 ~ Q(k0 | y_i) restricted to classes present in the batch (Eq. 5), then a
    sample of class k0 uniformly inside the batch; weighting candidate j by
    P_accept[y_j, y_i] / (number of y_j in the batch) is that two-stage draw in one multinomial.
    """
    per_class = torch.bincount(labels, minlength=accept.shape[0])
    weights = accept[labels[None, :], labels[:, None]] / per_class[labels][None, :]
    has_seed = weights.sum(dim=1) > 0
    weights = torch.where(has_seed[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(weights, 1).squeeze(1), has_seed


def random_start(seeds: torch.Tensor, radius: float, value_range: tuple[float, float]) -> torch.Tensor:
    """x0 + δ, δ a uniformly random direction of L2 norm `radius` per sample, clamped to the input range (Alg. 1, line 7).

    δ is zero-mean ("a small noise"): the reference's uniform [0, 1) noise has a positive mean, which
    brightens every seed before the translation starts.
    """
    noise = torch.randn_like(seeds)
    norms = noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (seeds.dim() - 1)))
    return (seeds + noise * (radius / norms)).clamp(*value_range)


def translate(start: torch.Tensor, seed_classes: torch.Tensor, targets: torch.Tensor, f: Classifier, g: Classifier, *,
              steps: int, step_size: float, lam: float, value_range: tuple[float, float]) -> torch.Tensor:
    """T steps x ← clamp(x − η·∇/‖∇‖₂) on CE(g(x), k) + λ·f_k0(x), batched over samples (Eq. 2, Alg. 1 lines 8-10).

    The objective is summed over the batch, so each sample's gradient is that of its own Eq. 2;
    gradients are taken w.r.t. x only, so f and g accumulate nothing.
    """
    x = start.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            objective = F.cross_entropy(g(x).float(), targets, reduction="sum")
            objective = objective + lam * f(x).float().gather(1, seed_classes[:, None]).sum()
            (grad,) = torch.autograd.grad(objective, x)
            norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            x = (x.detach() - step_size * grad / norms).clamp(*value_range)
    return x


@torch.no_grad()
def target_loss(g: Classifier, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L(g; x, k) = −log softmax(g(x))_k per sample; its exp(−·) is g's confidence on k."""
    return -g(x).float().log_softmax(dim=1).gather(1, targets[:, None]).squeeze(1)


def passes_gamma(loss: torch.Tensor, gamma: float, rule: str) -> torch.Tensor:
    """g's test on a translation: L ≤ γ (Algorithm 1 line 12 rejects when L > γ), or softmax_k = e^{−L} ≥ γ (reference code)."""
    return loss <= gamma if rule == "loss" else torch.exp(-loss) >= gamma


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own mode (a frozen BN stays frozen)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


# --------------------------------------------------------------------------------------- augmenter
@AUGMENTERS.register("m2m", config=M2mConfig,
                     defaults={"insert_at": 0, "start_fraction": 160 / 200, "head_ratio": 1 / 3},
                     components={"λ·f_k0": {"augmenter.m2m.lam": 0.0},                    # Table 4's "M2m (λ = 0)"
                                 "deferred scheduling": {"augmenter.start_epoch": 0}},     # Table 4's "M2m-RS"
                     # Before the deferral epoch M2m is the identity: its sampler is None (the loss schedule's),
                     # `on_epoch_start` fetches g only once active (g is trained or loaded at T, never before),
                     # its buffers (acceptance matrix, generation probability) are constants of the class counts
                     # and β that only the active step reads, and it has no parameters and draws nothing.
                     # The head mask (γ; unused by M2m itself) reaches epochs [0, T) only through the train
                     # loader, which `prefix_of` checks itself.
                     before_start=BeforeStart(keys=(), trains=False))
class M2m(Augmenter):
    """Replaces oversampled minority samples by translated majority seeds (Alg. 1 on mini-batches).

    Paper defaults: input space (k = 0), deferral at epoch 160 of 200, and "Major" = the first
    third of the classes (head_ratio 1/3; M2m itself does not use the head mask).
    """

    input_only = True
    progress_keys = ("accepted", "acceptance_rate", "g_confidence")

    def __init__(self, context: AugmenterContext):
        super().__init__(context)
        self.cfg: M2mConfig = context.config.augmenter.m2m
        self.value_range = tuple(context.input_range)
        self.register_buffer("accept", acceptance_matrix(self.class_counts, self.cfg.beta), persistent=False)
        self.register_buffer("gen_prob", generation_probability(self.class_counts), persistent=False)
        object.__setattr__(self, "_g", None)  # outside the module tree: not trained, not checkpointed

    def sampler(self, epoch: int) -> str | None:
        """The reference switches to an oversampled loader (weights 1/n_c) at the deferral epoch."""
        return "class_balanced" if self.active(epoch) else None

    def on_epoch_start(self, epoch: int) -> None:
        """Fetch g when the method becomes active, outside the training step and its autocast."""
        if self.active(epoch):
            self.reference()

    def reference(self) -> Classifier:
        """g, trained (or loaded) on first use only, with torch's RNG left as it was.

        Training g may reseed and consume the global RNG while loading it from the cache does not;
        forking keeps a run and its resumption bit-identical either way.
        """
        if self._g is None:
            if self.context.reference_model is None:
                raise RuntimeError("M2m needs a reference classifier g, but AugmenterContext.reference_model is None")
            cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=cuda_devices):
                g = self.context.reference_model(epochs=self.cfg.reference_epochs, path=self.cfg.reference_path)
            object.__setattr__(self, "_g", g.to(self.class_counts.device).eval())
        return self._g

    def augment(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        seed_index, has_seed = draw_seeds(labels, self.accept)
        generate = (torch.rand(labels.shape, device=labels.device) < self.gen_prob[labels]) & has_seed
        rows = generate.nonzero().squeeze(1)
        self.diagnostics.add("attempts", rows.numel())
        if rows.numel() == 0:
            self.diagnostics.add("accepted", 0)
            return AugmentOutput(feats, labels)
        seeds = seed_index[rows]
        seed_classes, targets = labels[seeds], labels[rows]
        candidates = self._generate(feats[seeds], seed_classes, targets, state.model)
        g_loss = target_loss(self.reference(), candidates, targets)
        g_pass = passes_gamma(g_loss, self.cfg.gamma, self.cfg.acceptance)
        keep = g_pass & (torch.rand(rows.shape, device=rows.device) < self.accept[seed_classes, targets])
        self._record(g_loss, g_pass, keep)
        out = feats.clone()
        out[rows[keep]] = candidates[keep].to(feats.dtype)
        return AugmentOutput(out, labels)

    def _record(self, g_loss: torch.Tensor, g_pass: torch.Tensor, keep: torch.Tensor) -> None:
        """Per-step counts and g's confidence e^{−L} on the attempts and on the kept translations (device tensors)."""
        confidence = torch.exp(-g_loss)
        self.diagnostics.add("accepted", keep.sum())
        self.diagnostics.add("g_passed", g_pass.sum())
        self.diagnostics.mean("g_confidence", confidence)
        self.diagnostics.mean("accepted_confidence", confidence, where=keep)

    def epoch_diagnostics(self) -> dict[str, float]:
        """Adds `acceptance_rate` = accepted / attempts and `g_pass_rate` = g_passed / attempts.

        In an epoch that kept nothing the meter leaves `accepted_confidence` out: a mean of no samples is not 0.
        """
        values = super().epoch_diagnostics()
        attempts = values.get("attempts", 0.0)
        if attempts > 0:
            values["acceptance_rate"] = values["accepted"] / attempts
            values["g_pass_rate"] = values["g_passed"] / attempts
        return values

    def _generate(self, seeds: torch.Tensor, seed_classes: torch.Tensor, targets: torch.Tensor, f: nn.Module) -> torch.Tensor:
        """Eq. 2 from a random start, with f in eval mode (as in the reference) and its modes restored after."""
        start = random_start(seeds.float(), self.cfg.noise_radius, self.value_range)
        with eval_mode(f):
            return translate(start, seed_classes, targets, f, self.reference(), steps=self.cfg.steps,
                             step_size=self.cfg.step_size, lam=self.cfg.lam, value_range=self.value_range)
