"""Training engine: `fit(config)` yields one result per epoch; checkpoints resume bit-exactly on CPU.

No Ray and no tracking here (those wrap this), and no method names: the augmenter, loss, sampler and
backbone all come from registries by the names in the config. One step is

    feats  = model.forward_until(k, x)            # k = augmenter.insert_at
    out    = augmenter(feats, y, state)           # identity for augmenter.name = none
    logits = model.forward_from(k, out.feats)
    loss   = cls_weight·L_cls(logits, out.labels, ω, class weights of the epoch) + Σ_i λ_i·aux_i
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ltsearch._runtime import (EagerSGD, capture_rng_state, restore_rng_state, learning_rate, resolve_device,
                               seed_everything)
from ltsearch.augmenters.base import (Augmenter, AugmenterContext, FeatureSpec, TrainState, create_augmenter,
                                      head_class_mask, resolve_head_ratio, resolve_insert_at, resolve_start_epoch)
from ltsearch.checkpoints import (CHECKPOINT_FILE, CHECKPOINT_FORMAT, PREVIOUS_CHECKPOINT_FILE, _plain, load_weights,
                                  read_latest_checkpoint, save_state, warm_start)
from ltsearch.config import RunConfig, build_run_config, to_dict
from ltsearch.data import LongTailData, build_dataset, create_train_loader, eval_batches
from ltsearch.divergence import DivergenceGuard
from ltsearch.epochs import SELECTABLE, EpochResult
from ltsearch.errors import CheckpointError, ConfigError
from ltsearch.losses import class_weights_for_epoch, create_loss, sampler_for_epoch
from ltsearch.metrics import classification_metrics
from ltsearch.models import Backbone, create_backbone, num_boundaries
from ltsearch.prefix import SHARED_PREFIX
from ltsearch.registry import AUGMENTERS, LOSSES


def default_cache_dir() -> Path:
    """Where reusable artefacts (M2m's reference classifier g) live; shared by all trials of a machine."""
    return Path(os.environ.get("LTSEARCH_CACHE", Path.home() / ".cache" / "ltsearch"))


# ------------------------------------------------------------------------------------ validation
def check_compatible(config: RunConfig) -> None:
    """Checks that need the backbone's shape (insert_at); run before any data is read or model built."""
    boundaries = num_boundaries(config.model.name)
    augmenter = AUGMENTERS.get(config.augmenter.name).obj
    resolve_insert_at(config.augmenter.name, config.augmenter.insert_at, boundaries, augmenter.input_only)
    start = resolve_start_epoch(config.augmenter.name, config.augmenter.start_epoch, config.train.epochs)
    if config.augmenter.name != "none" and start >= config.train.epochs:
        raise ConfigError("augmenter.start_epoch", start, f"an epoch index below train.epochs={config.train.epochs}, otherwise the method never runs",
                          hint="Lower augmenter.start_epoch or raise train.epochs.")


def method_start_epoch(config: RunConfig) -> int:
    """The epoch T the run's method switches on (0 without a method): where the schedulers' count starts."""
    name = config.augmenter.name
    return 0 if name == "none" else resolve_start_epoch(name, config.augmenter.start_epoch, config.train.epochs)


def active_epochs(config: RunConfig, epochs_done: int) -> int:
    """Epochs of `epochs_done` that come after the method's start epoch T (<= 0 before it; all of them without a
    method). Schedulers count these, so ASHA's grace period starts at T whether or not the prefix was shared."""
    return epochs_done - method_start_epoch(config)


def _feature_spec(model: Backbone, k: int, data: LongTailData) -> FeatureSpec:
    info = model.feature_info[k]
    side = max(1, math.ceil(data.image_size / info.reduction))
    return FeatureSpec(channels=info.channels, height=side, width=side)


def _build_model(config: RunConfig, data: LongTailData) -> Backbone:
    loss_cls = LOSSES.get(config.loss.name).obj
    cosine = config.model.classifier == "cosine" or (config.model.classifier == "auto" and loss_cls.needs_cosine_classifier)
    return create_backbone(config.model.name, num_classes=data.num_classes, in_chans=data.in_chans, mean=data.mean, std=data.std,
                           cosine_classifier=cosine, width=config.model.width, weights=config.model.weights)


# ----------------------------------------------------------------------------- reference model g
def reference_config(config: RunConfig, epochs: int | None) -> RunConfig:
    """Plain-ERM run on the same data, model, optimiser and seed: cross-entropy, no re-weighting, no augmenter.

    g is trained from a random initialisation even when the run itself warm-starts (`train.init_from`):
    M2m's g is an independent ERM classifier, not a copy of the network being trained. A run that
    continues at a decayed lr should pass `augmenter.m2m.reference_path` (a trained ERM checkpoint) instead.
    """
    raw = to_dict(config)
    raw["loss"] = {"name": "ce"}
    raw["augmenter"] = {"name": "none"}
    raw["train"]["init_from"] = None
    if epochs is not None:
        raw["train"]["epochs"] = epochs
    return build_run_config(raw)


REFERENCE_FORMAT = 2


def reference_key(config: RunConfig) -> str:
    """Cache key of g: everything that changes what plain ERM learns (data, model, optim, train), and the format:
    format 2 builds the data from exact long-tail counts, so a g cached from CPU-dependent counts is never reused."""
    raw = to_dict(config)
    payload = {"format": REFERENCE_FORMAT, **{k: raw[k] for k in ("data", "model", "optim", "train")}}
    payload["train"] = {k: v for k, v in payload["train"].items() if k not in ("device", "eval_batch_size", "threads")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_reference_model(config: RunConfig, data: LongTailData, cache_dir: Path, *, epochs: int | None = None,
                          path: str | None = None) -> Backbone:
    """Return g in eval mode: loaded from `path`, else from the on-disk cache, else trained once and cached.

    A file lock makes concurrent trials on one machine train g once and share it.
    """
    ref_config = reference_config(config, epochs)
    device = resolve_device(config.train.device)
    model = _build_model(ref_config, data).to(device)
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError("augmenter reference_path", path, "an existing checkpoint file of the same backbone")
        load_weights(model, path, "augmenter.m2m.reference_path")
        return model.eval().requires_grad_(False)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"reference-{config.model.name}-{reference_key(ref_config)}.pt"
    with open(cache_dir / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            saved = capture_rng_state()  # training g reseeds every RNG; the calling run must not notice
            trainer = Trainer(ref_config, data=data, cache_dir=cache_dir)
            for _ in trainer.run():
                pass
            restore_rng_state(saved)
            save_state({"model": trainer.model.state_dict(), "config": to_dict(ref_config)}, target, "M2m's reference classifier g")
    load_weights(model, target, "M2m's cached reference classifier g", hint=f"Delete {target} to train g again.")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns model, augmenter, optimiser, loader and the running best; `run()` trains the remaining epochs."""

    def __init__(self, config: RunConfig, *, data: LongTailData | None = None, cache_dir: str | Path | None = None):
        check_compatible(config)
        self.config = config
        self.device = resolve_device(config.train.device)
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        self.data = data if data is not None else build_dataset(config.data)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        seed_everything(config.train.seed)
        self.class_counts = self.data.class_counts.clone().long()
        self.model = _build_model(config, self.data)
        if config.train.init_from:
            warm_start(self.model, config.train.init_from)
        self.model = self.model.to(self.device)
        if self.device.type == "cuda" and config.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.augmenter = self._build_augmenter().to(self.device)
        self.loss_fn = create_loss(config.loss, self.class_counts).to(self.device)
        self._clip_parts = [params for params in (list(self.model.parameters()), list(self.augmenter.parameters())) if params]
        self.optimizer = EagerSGD(list(self.model.parameters()) + list(self.augmenter.parameters()), lr=config.optim.lr, momentum=config.optim.momentum,
                                  weight_decay=config.optim.weight_decay, nesterov=config.optim.nesterov)
        self.loader = create_train_loader(self.data, config.data, batch_size=config.optim.batch_size, device=self.device,
                                          seed=config.train.seed, head_mask=self.augmenter.head_mask.cpu())
        self.epoch = 0  # next epoch to run
        self.step = 0
        self.best: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.autocast_dtype = torch.bfloat16 if (self.device.type == "cuda" and config.train.amp) else None
        self.restore_note: str | None = None  # set by `restore` when it fell back to the previous checkpoint

    def _build_augmenter(self) -> Augmenter:
        cfg = self.config.augmenter
        name = cfg.name
        cls = AUGMENTERS.get(name).obj
        insert_at = resolve_insert_at(name, cfg.insert_at, self.model.num_boundaries, cls.input_only)
        head_ratio = resolve_head_ratio(name, cfg.head_ratio)
        context = AugmenterContext(
            config=self.config, insert_at=insert_at,
            start_epoch=resolve_start_epoch(name, cfg.start_epoch, self.config.train.epochs),
            head_ratio=head_ratio, feature=_feature_spec(self.model, insert_at, self.data),
            num_classes=self.data.num_classes, class_counts=self.class_counts,
            head_mask=head_class_mask(self.class_counts, head_ratio), device=self.device, cache_dir=self.cache_dir,
            reference_model=lambda epochs=None, path=None: train_reference_model(self.config, self.data, self.cache_dir, epochs=epochs, path=path),
        )
        return create_augmenter(context)

    # ------------------------------------------------------------------------- training
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def begin_epoch(self) -> tuple[str, torch.Tensor | None]:
        """Set the epoch's lr, class weights, sampler and train/frozen modes; returns (sampler, class weights)."""
        epoch, cfg = self.epoch, self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg.optim.schedule, cfg.optim.lr, epoch, cfg.train.epochs)
        class_weights = class_weights_for_epoch(cfg.loss.reweight, self.class_counts, epoch)
        if class_weights is not None:
            class_weights = class_weights.to(self.device)
        sampler = self.augmenter.sampler(epoch) or sampler_for_epoch(cfg.loss.resample, epoch)
        self.model.train()
        self.augmenter.train()
        with self.augmenter.rng.active():
            self.augmenter.on_epoch_start(epoch)
        self._apply_trainable_filter(epoch)
        return sampler, class_weights

    def train_step(self, x: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the step's loss terms and the real samples' correct count (device tensors, no sync)."""
        cfg = self.config
        if self.device.type == "cuda" and cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        k = self.augmenter.insert_at
        state = TrainState(epoch=self.epoch, epochs=cfg.train.epochs, step=self.step, steps_per_epoch=len(self.loader),
                           model=self.model, class_weights=class_weights)
        with self._autocast():
            feats = self.model.forward_until(k, x)
            with self.augmenter.rng.active():
                out = self.augmenter(feats, y, state)
            logits = self.model.forward_from(k, out.feats)
            cls_loss = self.loss_fn(logits.float(), out.labels, sample_weights=out.sample_weights, class_weights=class_weights)
            loss = self.augmenter.cls_weight * cls_loss
            weights = self.augmenter.loss_weights
            for name, term in out.aux_losses.items():
                loss = loss + weights.get(name, 1.0) * term.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip is not None:  # per part: a method's large aux gradients must not shrink the backbone's
            for part in self._clip_parts:
                torch.nn.utils.clip_grad_norm_(part, cfg.optim.grad_clip)
        self.optimizer.step()
        self.step += 1
        batch = y.shape[0]
        terms = {"loss": loss, "cls_loss": cls_loss, **{f"aux/{n}": t for n, t in out.aux_losses.items()}}
        terms = {name: value.detach().float() for name, value in terms.items()}
        # the real samples come first; predicted as val and test predict (post-hoc logit adjustment included)
        terms["correct"] = (self.loss_fn.eval_logits(logits[:batch].detach().float()).argmax(1) == out.labels[:batch]).sum()
        return terms

    def train_epoch(self) -> dict[str, float]:
        sampler, class_weights = self.begin_epoch()
        sums: dict[str, torch.Tensor] = {}
        seen, correct = 0, torch.zeros((), device=self.device)
        guard = DivergenceGuard(self.epoch, self.config.train.epochs, len(self.loader))
        start = time.perf_counter()
        for step_in_epoch, (x, y) in enumerate(self.loader.epoch(sampler)):
            terms = self.train_step(x, y, class_weights)
            guard.observe({name: value for name, value in terms.items() if name != "correct"}, step_in_epoch)
            batch = y.shape[0]
            seen += batch
            correct += terms.pop("correct")
            for name, value in terms.items():
                sums[name] = sums.get(name, torch.zeros((), device=self.device)) + value * batch
        guard.check()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        metrics = {f"train/{name}": float(total) / max(1, seen) for name, total in sums.items()}
        metrics.update({"train/top1": 100.0 * float(correct) / max(1, seen), "lr": self.optimizer.param_groups[0]["lr"],
                        "epoch_seconds": seconds, "images_per_s": seen / max(seconds, 1e-9), "train/sampler": sampler})
        metrics.update({f"aug/{name}": value for name, value in self.augmenter.epoch_diagnostics().items()})
        return metrics

    def _apply_trainable_filter(self, epoch: int) -> None:
        """Freeze backbone parameters the augmenter's stage excludes (e.g. classifier-only fine-tuning)."""
        keep = self.augmenter.trainable_parameters_filter(epoch)
        for name, param in self.model.named_parameters():
            param.requires_grad_(keep is None or keep(name))
        if keep is not None:  # frozen feature layers keep their BatchNorm statistics too
            for name, module in self.model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(keep(f"{name}.{p}") for p, _ in module.named_parameters()):
                    module.eval()

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics on `split` ('val' or 'test'); augmenters only contribute `eval_transform` (identity for most)."""
        self.model.eval()
        self.augmenter.eval()
        preds, labels = [], []
        for x, y in eval_batches(self.data, split, batch_size=self.config.train.eval_batch_size, device=self.device):
            if self.device.type == "cuda" and self.config.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            k = self.augmenter.insert_at
            with self._autocast():
                logits = self.model.forward_from(k, self.augmenter.eval_transform(self.model.forward_until(k, x)))
                preds.append(self.loss_fn.eval_logits(logits.float()).argmax(1))
            labels.append(y)
        if not preds:
            return {}
        result = classification_metrics(torch.cat(preds).cpu(), torch.cat(labels).cpu(), self.data.num_classes, self.class_counts)
        return {f"{split}/{k}": v for k, v in result.items() if v is not None}

    def run(self, until: int | None = None) -> Iterator[EpochResult]:
        """Train from `self.epoch` to the end (or to epoch `until`), yielding after each epoch (train, val and test metrics)."""
        end = self.config.train.epochs if until is None else min(until, self.config.train.epochs)
        while self.epoch < end:
            metrics = {"epoch": self.epoch, **self.train_epoch(), **self.evaluate("val"), **self.evaluate("test")}
            is_best = self._judge(metrics)
            self.history.append(metrics)
            self.epoch += 1
            yield EpochResult(epoch=self.epoch - 1, metrics=metrics, is_best=is_best, trainer=self)

    @property
    def selection_start(self) -> int:
        """The first epoch the run's best may be chosen from (`train.select_epochs`).

        `active`: the method's start epoch T, so a method's result is always an epoch where it acted, never an
        epoch of the trunk it shares with its baseline; 0 for a run without a method. `all`: every epoch.
        """
        return 0 if self.config.train.select_epochs == "all" else self.augmenter.selection_start

    def _judge(self, metrics: dict[str, Any]) -> bool:
        """Mark the epoch `selectable` or not, keep the running best-val epoch among selectable ones and the
        legacy best-test number over all epochs; True when this epoch is the new best."""
        score = metrics.get(self.config.train.select_metric)
        metrics[SELECTABLE] = int(metrics["epoch"] >= self.selection_start)
        is_best = bool(metrics[SELECTABLE]) and score is not None and ("score" not in self.best or score > self.best["score"])
        legacy = max(metrics.get("test/top1", float("-inf")), self.best.get("legacy/best_test_top1", float("-inf")))
        if is_best:
            self.best = {"score": score, "epoch": metrics["epoch"], "metrics": metrics}
        self.best["legacy/best_test_top1"] = legacy
        metrics["legacy/best_test_top1"] = legacy
        return is_best

    # ----------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain containers only (what `torch.load(weights_only=True)` accepts)."""
        return {
            "format": CHECKPOINT_FORMAT, "config": to_dict(self.config), "epoch": self.epoch, "step": self.step,
            "model": self.model.state_dict(), "augmenter": self.augmenter.state_dict(),
            "optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict(),
            "rng": {**capture_rng_state(), "augmenter": self.augmenter.rng.state_dict()}, "best": _plain(copy.deepcopy(self.best)), "history": _plain(copy.deepcopy(self.history)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.augmenter.load_state_dict(state["augmenter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        restore_rng_state(state["rng"])
        if "augmenter" in state["rng"]:  # format 3; older runs keep the freshly seeded stream
            self.augmenter.rng.load_state_dict(state["rng"]["augmenter"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best, self.history = state["best"], state["history"]

    def load_prefix(self, state: dict[str, Any], *, method_trains_before_start: bool) -> None:
        """Continue from a shared prefix's state at its fork epoch T as if this run had trained [0, T) itself.

        The backbone, loader, global RNG, step and history are the prefix's: by the prefix key they are what
        this run would have reached; its best epoch so far is chosen again from that history by this run's
        own selection rule (whichever run trained the trunk, with or without a method, held it idle). The
        method's modules, optimiser slots and random stream are the prefix's only when the method changes
        them before T (`BeforeStart.trains`); otherwise this run keeps its own freshly built ones, which is
        what it would have had at T (a post-T knob may even change their shapes). The prefix's epochs are marked `prefix/shared` in the history.
        """
        self.model.load_state_dict(state["model"])
        self.loader.load_state_dict(state["loader"])
        restore_rng_state(state["rng"])
        if method_trains_before_start:
            self.augmenter.load_state_dict(state["augmenter"])
            self.augmenter.rng.load_state_dict(state["rng"]["augmenter"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            self.optimizer.load_state_dict(_backbone_optimizer_state(state["optimizer"], self.optimizer.state_dict(),
                                                                     len(list(self.model.parameters()))))
        self.epoch, self.step = state["epoch"], state["step"]
        self.best, self.history = {}, []
        for row in state["history"]:  # judged again by this run's own rule: the trunk's method, or none, held it idle
            row = {**row, SHARED_PREFIX: 1}
            self._judge(row)
            self.history.append(row)

    def save_checkpoint(self, directory: str | Path, *, keep_previous: bool = True) -> Path:
        """Durably write `directory/checkpoint.pt` (`save_state`: a crash never leaves a torn one); with `keep_previous`
        the checkpoint it replaces stays as `checkpoint.prev.pt`, which a resume falls back to if the newest cannot be read."""
        directory = Path(directory)
        return save_state(self.state_dict(), directory / CHECKPOINT_FILE, "the checkpoint",
                          keep_previous=directory / PREVIOUS_CHECKPOINT_FILE if keep_previous else None)

    @classmethod
    def restore(cls, path: str | Path, *, data: LongTailData | None = None, cache_dir: str | Path | None = None,
                config: RunConfig | None = None) -> "Trainer":
        """Rebuild from a checkpoint file or directory; the run continues exactly where it stopped.

        Every file is loaded with `weights_only=True` (see `load_checkpoint_file`). In a run directory a
        truncated or corrupt `checkpoint.pt` falls back to `checkpoint.prev.pt` (one epoch earlier), and
        `restore_note` says so. `config` may lengthen the run, never shorten it below the epochs it has run.
        """
        state, loaded, note = read_latest_checkpoint(path)
        try:
            run_config = config or build_run_config(state["config"])
        except ConfigError as error:
            raise CheckpointError(f"checkpoint '{loaded}' holds a config this version rejects: {error}") from None
        if run_config.train.epochs < state["epoch"]:
            raise ConfigError("train.epochs", run_config.train.epochs, f"at least {state['epoch']}, the epochs this run has already finished",
                              hint="A resumed run can be lengthened, never shortened; start a new run for fewer epochs.")
        trainer = cls(run_config, data=data, cache_dir=cache_dir)
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise CheckpointError(f"checkpoint '{loaded}' does not fit this config (were model or augmenter keys changed with --set?): "
                                  f"{' '.join(lines[:2])[:300]}") from None
        trainer.restore_note = note
        return trainer


def _backbone_optimizer_state(prefix: dict[str, Any], own: dict[str, Any], backbone_params: int) -> dict[str, Any]:
    """The optimiser state with the prefix's slots for the backbone's parameters (the first ones) and this
    run's own for the method's (none before T: SGD keeps no state for a parameter that never had a gradient)."""
    state = {index: slots for index, slots in own["state"].items() if index >= backbone_params}
    state.update({index: slots for index, slots in prefix["state"].items() if index < backbone_params})
    return {"state": state, "param_groups": own["param_groups"]}


def fit(config: RunConfig, *, data: LongTailData | None = None, resume_from: str | Path | None = None,
        cache_dir: str | Path | None = None) -> Iterator[EpochResult]:
    """Train `config`, yielding one EpochResult per epoch; `resume_from` continues a saved run exactly."""
    if resume_from is not None:
        trainer = Trainer.restore(resume_from, data=data, cache_dir=cache_dir, config=config)
    else:
        trainer = Trainer(config, data=data, cache_dir=cache_dir)
    yield from trainer.run()


def summarize(trainer: Trainer) -> dict[str, Any]:
    """metrics.json content: final and best-val metrics, the legacy best-test number, the construction."""
    final = trainer.history[-1] if trainer.history else {}
    best = trainer.best.get("metrics", {})
    return {
        "final": final,
        "best": best,
        "best_epoch": trainer.best.get("epoch"),
        "select_metric": trainer.config.train.select_metric,
        "legacy/best_test_top1": trainer.best.get("legacy/best_test_top1"),
        "construction": trainer.data.construction,
        "epochs_run": trainer.epoch,
    }
