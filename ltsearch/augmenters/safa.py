"""SAFA: Sample-Adaptive Feature Augmentation (Hong, Zhang, Sun and Yan, ECCV 2022).

Deltas (intra-class variations) are extracted from same-class *head* pairs and re-applied, adapted to
each sample, to *tail* features; the generated tail features are appended to the batch so the later
stages and the classifier see a wider tail-class feature space (Sec. 3.1, Fig. 3). Four small
Conv-BN-ReLU-Conv modules do the work (Sec. 3.1):

    E  delta extractor            Δ^ij   = E(F_h^i - F_h^j)                         (Eq. 2)
    D  sample-specific delta      Δ_t^ij = D(concat(Δ^ij, F_t^i))
    G  sample-adaptive generator  F~_t^j = G(Δ_t^ij + F_t^i)                        (Eq. 3)
    Q  contrastive module (+FC)   β      = Q(F_a^i, F_a^j), the same-class probability (Eq. 6)

and train through Eq. 1's auxiliary terms: recycle reconstruction L_r = L_r^Δ + L_r^F (Eqs. 4-5,
weight λ1), tail and head mode seeking L_ms^t, L_ms^h (Eq. 7, λ2, λ3) and the contrastive L_c (Eq. 6,
λ4). Each λ is a config key and a zero weight skips its term's computation (the ablations of Table 6).

Reading choices where the paper is silent:
- SAFA reads the backbone's features detached, so its auxiliary losses train E, D, G, Q only: the
  numerators of Eq. 7 and the targets of Eqs. 4-5 are real features, and letting those losses reach
  the backbone would reward collapsing real features (the opposite of enlarging the tail space).
  Generated features are *not* detached: the classification loss on them trains E, D and G.
- L_ms^h's pair "generated from the same tail-class feature" uses the two deltas of one head pair,
  Δ^ij and Δ^ji = E(F_h^j - F_h^i), whose inputs differ by 2(F_h^i - F_h^j): that is why Eq. 7's
  numerator is ||F_h^i - F_h^j||_1.
- Per tail pair {F_t^i, F_t^j} (random head pair as the delta source) the Eq. 7 pair {F~_t^i, F~_t^j}
  is generated, so one feature is appended per real tail sample, labelled with its source's class.
- C_Δ equals the feature channels, because Eq. 3 adds Δ_t to F_t.

Numerical stabilisation (found on CIFAR-10, ResNet-32, boundary 2 = 16 x 32 x 32 features): with the
literal forms the run reaches inf within ~6 steps, at lr 0.02 from scratch and at lr 0.001 alike.
Three causes, three switches (defaults stabilise; the other value is the literal/old behaviour):
- `recycle_distance: rms` (Eqs. 4-5). ||·||_2 over C x H x W = 16,384 values measures ~60 and ~260 at
  activation; times λ1 = 100 the gradients on E, D, G are ~1e4, so one SGD step rescales the modules.
  "rms" divides the norm by sqrt(C·H·W): the same L2 distance, per feature value. "l2" = literal.
- `ms_guard: 1` (Eq. 7). The ratio divides by the generated pair's distance f, tiny at activation
  (randomly initialised D, G barely depend on Δ: ratio ~46) and whenever G collapses; d(r/f)/df =
  -r/f^2 then kicks G (λ3 = 100) into features 1e4 x too large, which the next stage's BatchNorm mixes
  into the real batch, and the backbone diverges. The guard floors the denominator by the real
  distance, r / (f + ε·r): same minimiser, equal to Eq. 7 once f >> ε·r, bounded by 1/ε, gradient at
  most 1/(ε^2 r). `ms_guard: 0` = literal (absolute guard 1e-5).
- `module_scale: input` (Eqs. 2-3). Nothing fixes the scale of E's, D's and G's outputs, and Eq. 7
  and L_cls on generated features are both lowered by scaling them up; with λ = 100 at lr >= 0.04
  (training from scratch; the paper only ever trains at its post-decay lr 0.001) SGD runs the modules'
  last convolutions away (1e15 within an epoch). Each module's output is rescaled per sample to the RMS
  of its reference input (Δ to F_h^i - F_h^j, Δ_t to Δ, F~ to F_t^i): directions are learnt, scales
  are the real features', and the losses become scale-invariant in the last conv's weights, whose
  effective step then shrinks as they grow. "free" = the paper's unnormalised modules.

Measured against the paper's gain (the 30-epoch reproduction on the full CIFAR-10-LT, seed 0, LDAM-DRW
60.93 % test top-1; benchmarks/RESULTS.md): + SAFA 56.98, the two rarest classes 9 and 39 % against 15 and
64. The literal modules (`module_scale: free`, `ms_guard: 0`) train without diverging there but reach only
29.42 (the stabilisations stay the default); starting at the decay (T = 24, no epoch at lr 0.1) gives 57.09;
generating at the last map, so that no later BatchNorm sees the generated features, gives 58.67 (classes 8
and 9: 12 and 46 %). None of the three explains the loss on the rarest classes; what does is open
(ablations/diagnose/safa_short.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch import _checks as check
from ltsearch.augmenters.base import AugmentOutput, Augmenter, AugmenterContext, BeforeStart, TrainState
from ltsearch.data.samplers import cycled_permutation
from ltsearch.errors import ConfigError
from ltsearch.registry import AUGMENTERS, SAMPLERS

PAIR_SAMPLER = "same_class_pairs"
#: keeps Eq. 7's literal ratio finite when two generated features coincide (MSGAN adds the same guard)
MODE_SEEKING_EPS = 1e-5
RECYCLE_DISTANCES = ("rms", "l2")
MODULE_SCALES = ("input", "free")


@dataclass
class SafaConfig:
    """The `augmenter.safa` section: Eq. 1's weights (Sec. 4.1: λ1..λ4 = 100, 1e-2, 1e2, 1e-1) and module sizes.

    The paper does not give the modules' widths or kernels: `hidden_channels` (None = the feature
    channels at the insertion point) and `kernel_size` (3, padded so any H x W, 1 x 1 included, works).
    `recycle_distance` is the norm of Eqs. 4-5: "rms" = ||·||_2 / sqrt(C·H·W), "l2" = the literal
    norm over C x H x W. `ms_guard` ε floors Eq. 7's denominator by the real distance, r / (f + ε·r);
    0 = the literal ratio.

    Typical raw terms in the first active epoch (epoch means, measured on CIFAR-10, ResNet-32, boundary
    2, 500/class slice, defaults; warm start from a CE baseline at lr 0.001 | from scratch at the
    recipe's warm-up lr 0.02): recycle_delta 0.92 | 1.59, recycle_feature 1.96 | 2.64, ms_tail ~0.73,
    ms_head ~0.59 (bounded by 1/ε; generated pairs start almost identical), contrastive 0.71 | 0.60
    (ln 2 = Q at chance). Weighted: λ1·L_r ~ 300–400 and λ3·L_ms^h ~ 60 against L_cls ~ 2; they train
    E, D, G, Q only (real features are read detached), so they do not swamp the backbone's gradient.
    At activation the literal forms read ~60 and ~260 (the two L_r terms) and ~46 (Eq. 7's ratio).
    """

    lambda_recycle: float = 100.0
    lambda_ms_tail: float = 1e-2
    lambda_ms_head: float = 1e2
    lambda_contrastive: float = 1e-1
    hidden_channels: int | None = None
    kernel_size: int = 3
    recycle_distance: str = "rms"
    ms_guard: float = 1.0
    module_scale: str = "input"

    def validate(self, where: str) -> None:
        for key in ("lambda_recycle", "lambda_ms_tail", "lambda_ms_head", "lambda_contrastive"):
            check.number(f"{where}.{key}", getattr(self, key), low=0.0, what="a loss weight of Eq. 1; 0 removes the term")
        if self.hidden_channels is not None:
            check.number(f"{where}.hidden_channels", self.hidden_channels, low=1)
        check.integer(f"{where}.kernel_size", self.kernel_size)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"{where}.kernel_size", self.kernel_size, "an odd integer >= 1 (so 'same' padding keeps H x W)")
        check.choice(f"{where}.recycle_distance", self.recycle_distance, RECYCLE_DISTANCES)
        check.choice(f"{where}.module_scale", self.module_scale, MODULE_SCALES)
        check.number(f"{where}.ms_guard", self.ms_guard, low=0.0, what="the relative floor ε of Eq. 7's denominator; 0 = literal")


# ------------------------------------------------------------------------------------------ modules
class _BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that accepts a single value per channel in training (one tail pair on a 1 x 1 map).

    Normalising one value gives x - mean = 0, so the exact output is the shift β; torch refuses the
    case instead, and SAFA's per-pair batches can be that small.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[1]:
            return torch.zeros_like(x) + self.bias.view(1, -1, 1, 1).to(x.dtype)
        return super().forward(x)


def conv_bn_relu_conv(in_chans: int, hidden: int, out_chans: int, kernel_size: int) -> nn.Sequential:
    """The building block of E, D, G and Q (Sec. 3.1: "Conv-BN-ReLU-Conv layers")."""
    pad = kernel_size // 2
    return nn.Sequential(nn.Conv2d(in_chans, hidden, kernel_size, padding=pad, bias=False), _BatchNorm2d(hidden),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden, out_chans, kernel_size, padding=pad))


def euclidean(diff: torch.Tensor, distance: str = "rms") -> torch.Tensor:
    """Batch mean of the per-sample ||·||_2 over C x H x W (Eqs. 4-5), in float32; "rms" divides it by sqrt(C·H·W)."""
    flat = diff.float().flatten(1)
    norm = torch.linalg.vector_norm(flat, dim=1)
    return (norm / flat.shape[1] ** 0.5 if distance == "rms" else norm).mean()


def rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square over C x H x W, in float32."""
    return x.float().flatten(1).square().mean(1).sqrt()


def mean_abs(diff: torch.Tensor) -> torch.Tensor:
    """Per-sample ||·||_1 / (C·H·W), the L1 distance of Eq. 7 per feature value, in float32."""
    return diff.float().flatten(1).abs().mean(1)


def mode_seeking(real_diff: torch.Tensor, fake_diff: torch.Tensor, guard: float = 0.0) -> torch.Tensor:
    """Eq. 7: < ||real_i - real_j||_1 / ||fake_i - fake_j||_1 >, minimised to spread the generated pair.

    Both L1 norms are taken per element (mean, as MSGAN does), which leaves the ratio unchanged. With
    `guard` ε > 0 the denominator is f + ε·r (see the module docstring): bounded by 1/ε, the same
    minimiser, and no 1/f^2 kick when the generated pair starts out (or collapses) nearly identical.
    """
    real, fake = mean_abs(real_diff), mean_abs(fake_diff)
    return (real / (fake + guard * real + MODE_SEEKING_EPS)).mean()


# ------------------------------------------------------------------------------------------ sampler
@SAMPLERS.register(PAIR_SAMPLER)
def same_class_pairs(labels: torch.Tensor, class_counts: torch.Tensor, *, num_samples: int, batch_size: int,
                     generator: torch.Generator, head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batches of same-class pairs (Sec. 4.1: "in each mini-batch, we sample same-class pairs").

    Inside every batch, positions (2j, 2j+1) share a class; an odd batch ends with one unpaired sample.
    Anchors (even positions) follow the instance distribution, without repeats until the data runs
    out; each partner is a uniformly drawn *other* sample of the anchor's class (itself for a class of
    one), so batches keep the class mix of plain training and the loss schedule's choices stay valid.
    """
    labels = labels.long().cpu()
    counts = torch.bincount(labels, minlength=class_counts.numel())
    by_class = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[by_class] = torch.arange(labels.numel()) - starts[labels[by_class]]

    slots = torch.arange(num_samples)
    anchor_slot = (slots % batch_size) % 2 == 0
    num_anchors = int(anchor_slot.sum())
    anchors = cycled_permutation(labels.numel(), num_anchors, generator)

    cls = labels[anchors]
    size = counts[cls]
    offset = (torch.rand(num_anchors, generator=generator) * (size - 1)).long()
    partners = by_class[starts[cls] + (rank[anchors] + 1 + offset) % size]

    out = torch.empty(num_samples, dtype=torch.long)
    out[anchor_slot] = anchors
    partner_slot = ~anchor_slot
    out[partner_slot] = partners[torch.cumsum(anchor_slot.long(), 0)[partner_slot] - 1]
    return out


# ---------------------------------------------------------------------------------------- augmenter
@AUGMENTERS.register("safa", config=SafaConfig,
                     defaults={"insert_at": -3, "start_fraction": 0.795, "head_ratio": 0.2},
                     components={"L_r": {"augmenter.safa.lambda_recycle": 0.0},          # Table 6 rows: each term of Eq. 1 off
                                 "L_ms^t": {"augmenter.safa.lambda_ms_tail": 0.0},
                                 "L_ms^h": {"augmenter.safa.lambda_ms_head": 0.0},
                                 "L_c": {"augmenter.safa.lambda_contrastive": 0.0}},
                     # Before T_th SAFA is the identity: no step, no epoch hook, no loss term, its sampler is
                     # None (the loss schedule's), evaluation is the identity, and E, D, G, Q (built in their
                     # own init stream) get no gradient and update no BatchNorm statistics. The head mask (γ)
                     # reaches epochs [0, T) only through the train loader, which `prefix_of` checks itself.
                     before_start=BeforeStart(keys=(), trains=False))
class Safa(Augmenter):
    """SAFA as a plug-in at boundary k (Fig. 2).

    Defaults (Sec. 4.1): inserted "before the second-to-last down-sampling layer" = boundary -3 (ResNet-32:
    after layer1, before layer2's stride; ResNet-50: after layer2); T_th = 159 of 200 CIFAR epochs
    (start_fraction 0.795); head-class ratio γ = 0.2.
    """

    progress_keys = ("generated", "generated_scale", "recycle_gain")

    def __init__(self, context: AugmenterContext):
        super().__init__(context)
        self.cfg: SafaConfig = context.config.augmenter.safa
        chans = context.feature.channels
        hidden = self.cfg.hidden_channels or chans
        k = self.cfg.kernel_size
        self.extractor = conv_bn_relu_conv(chans, hidden, chans, k)            # E, Eq. 2
        self.delta_generator = conv_bn_relu_conv(2 * chans, hidden, chans, k)  # D
        self.generator = conv_bn_relu_conv(chans, hidden, chans, k)            # G, Eq. 3
        self.contrast = nn.Sequential(conv_bn_relu_conv(2 * chans, hidden, hidden, k),  # Q, Eq. 6
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1))
        self.to(context.device)

    # ------------------------------------------------------------------ engine hooks
    def sampler(self, epoch: int) -> str | None:
        return PAIR_SAMPLER if self.active(epoch) else None

    @property
    def loss_weights(self) -> dict[str, float]:
        cfg = self.cfg
        return {"recycle_delta": cfg.lambda_recycle, "recycle_feature": cfg.lambda_recycle,
                "ms_tail": cfg.lambda_ms_tail, "ms_head": cfg.lambda_ms_head, "contrastive": cfg.lambda_contrastive}

    # ------------------------------------------------------------------ the method
    def translate(self, delta: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """G(D(concat(Δ, F)) + F): Eq. 3, and the feature direction of the recycle (before Eq. 5)."""
        sample_delta = self.rescale(self.delta_generator(torch.cat([delta, source], 1)), delta)
        return self.rescale(self.generator(sample_delta + source), source)

    def extract(self, diff: torch.Tensor) -> torch.Tensor:
        """Δ = E(F^i - F^j), Eq. 2 (and Δ^ of Eq. 4)."""
        return self.rescale(self.extractor(diff), diff)

    def rescale(self, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """With `module_scale: input`, a module's output takes the per-sample RMS of its reference input."""
        if self.cfg.module_scale == "free":
            return out
        return out * (rms(like) / rms(out).clamp_min(1e-6)).view(-1, 1, 1, 1).to(out.dtype)

    def pair_up(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """Indices of the batch's tail pairs, for each a random head pair, and the number of head pairs;
        None if either kind is missing.

        Pair j is (2j, 2j+1) when both share a class. The one host sync of the step is here: how many
        features get appended depends on the labels.
        """
        num_pairs = labels.numel() // 2
        first, second = labels[0:2 * num_pairs:2], labels[1:2 * num_pairs:2]
        valid = first == second
        is_head = self.head_mask[first]
        kind = (valid & is_head).long() + 2 * (valid & ~is_head).long()  # 0 unpaired, 1 head, 2 tail
        order = torch.argsort(kind, stable=True)
        unpaired, heads, tails = torch.bincount(kind, minlength=3).tolist()
        if heads == 0 or tails == 0:
            return None
        head_pairs = order[unpaired:unpaired + heads]
        tail_pairs = order[unpaired + heads:]
        return tail_pairs, head_pairs[torch.randint(heads, (tails,), device=labels.device)], heads

    def augment(self, feats: torch.Tensor, labels: torch.Tensor, state: TrainState) -> AugmentOutput:
        plan = self.pair_up(labels)
        if plan is None:
            return AugmentOutput(feats, labels)
        tail_pairs, head_pairs, num_head_pairs = plan
        real = feats.detach()
        tail_i, tail_j = real[2 * tail_pairs], real[2 * tail_pairs + 1]
        head_i, head_j = real[2 * head_pairs], real[2 * head_pairs + 1]
        tail_labels = labels[2 * tail_pairs]
        cfg, n = self.cfg, tail_pairs.numel()

        with_reverse = cfg.lambda_ms_head > 0
        head_diff = head_i - head_j
        deltas = self.extract(torch.cat([head_diff, -head_diff]) if with_reverse else head_diff)  # Δ^ij (, Δ^ji), Eq. 2
        delta = deltas[:n]
        sources = [tail_i, tail_j] + ([tail_i] if with_reverse else [])
        fakes = self.translate(torch.cat([delta, delta] + ([deltas[n:]] if with_reverse else [])), torch.cat(sources))
        fake_from_i, fake_from_j = fakes[:n], fakes[n:2 * n]  # F~_t^j from F_t^i, F~_t^i from F_t^j (Eq. 3)

        aux: dict[str, torch.Tensor] = {}
        if cfg.lambda_recycle > 0:
            aux.update(self.recycle(delta, fake_from_i, tail_i, head_i, head_j))
        if cfg.lambda_ms_tail > 0:
            aux["ms_tail"] = mode_seeking(tail_i - tail_j, fake_from_i - fake_from_j, cfg.ms_guard)
        if with_reverse:
            aux["ms_head"] = mode_seeking(head_diff, fake_from_i - fakes[2 * n:], cfg.ms_guard)
        generated = torch.cat([fake_from_i, fake_from_j]).to(feats.dtype)
        generated_labels = torch.cat([tail_labels, tail_labels])
        if cfg.lambda_contrastive > 0:
            aux["contrastive"] = self.contrastive(torch.cat([real, generated]), torch.cat([labels, generated_labels]))
        self.record(tail_i, tail_j, num_head_pairs, delta, generated, fake_from_i - fake_from_j)
        return AugmentOutput(torch.cat([feats, generated]), torch.cat([labels, generated_labels]), aux_losses=aux)

    def recycle(self, delta: torch.Tensor, fake: torch.Tensor, tail_i: torch.Tensor, head_i: torch.Tensor,
                head_j: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_r = L_r^Δ + L_r^F: Δ^ij is re-extracted from the fake tail pair (Eq. 4) and re-applied to F_h^i (Eq. 5)."""
        delta_hat = self.extract(fake - tail_i)
        head_j_hat = self.translate(delta_hat, head_i)
        distance = self.cfg.recycle_distance
        with torch.no_grad():  # how much of F_h^j the cycle explains: 1 - L_r^F / ||F_h^j - F_h^i|| (0 = copying F_h^i)
            self.diagnostics.mean("recycle_gain", 1 - rms(head_j_hat - head_j) / rms(head_j - head_i).clamp_min(1e-12))
        return {"recycle_delta": euclidean(delta_hat - delta, distance),
                "recycle_feature": euclidean(head_j_hat - head_j, distance)}

    def contrastive(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Eq. 6: shuffle the batch F_a (real + generated), form s/2 pairs, BCE of β = σ(Q(pair)) vs same-class."""
        order = torch.randperm(feats.shape[0], device=feats.device)[: 2 * (feats.shape[0] // 2)].view(-1, 2)
        logits = self.contrast(torch.cat([feats[order[:, 0]], feats[order[:, 1]]], 1)).squeeze(1).float()
        same = (labels[order[:, 0]] == labels[order[:, 1]]).float()
        self.diagnostics.mean("q_accuracy", ((logits > 0).float() == same).float())
        return F.binary_cross_entropy_with_logits(logits, same)

    @torch.no_grad()
    def record(self, tail_i: torch.Tensor, tail_j: torch.Tensor, num_head_pairs: int, delta: torch.Tensor,
               generated: torch.Tensor, fake_diff: torch.Tensor) -> None:
        """Per-epoch evidence that the modules learn (device tensors only, read once per epoch).

        generated: tail features appended; pairs_tail / pairs_head: tail pairs augmented and head pairs
        available as delta sources; delta_rms: size of Δ^ij (0 = E collapsed); generated_scale:
        RMS of generated over real tail features (1 = on the real scale, >> 1 = G blowing up);
        tail_spread: L1 distance of the generated pair over the real pair's (Eq. 7's inverse ratio).
        """
        meter = self.diagnostics
        meter.add("generated", generated.shape[0])
        meter.add("pairs_tail", tail_i.shape[0])
        meter.add("pairs_head", num_head_pairs)
        meter.mean("delta_rms", rms(delta))
        meter.mean("generated_scale", rms(generated) / rms(torch.cat([tail_i, tail_j])).mean().clamp_min(1e-12))
        meter.mean("tail_spread", mean_abs(fake_diff) / mean_abs(tail_i - tail_j).clamp_min(1e-12))
