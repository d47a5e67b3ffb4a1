"""Non-finite loss detection without a host sync per step.

Every step folds `isfinite` of each loss term into two device tensors per term: the first step at
which it went non-finite (-1 while finite) and the value it took there. The host reads them only
every `check_every` steps and at the end of the epoch, so a GPU run does not stall on each step,
and the report still names the exact step and terms where the loss first broke.
"""

from __future__ import annotations

import torch

from ltsearch.errors import TrainingDiverged


class DivergenceGuard:
    """Watches the loss terms of one epoch; `check()` raises TrainingDiverged naming the first bad step."""

    def __init__(self, epoch: int, epochs: int, steps_per_epoch: int, check_every: int = 16):
        self.epoch, self.epochs, self.steps_per_epoch, self.check_every = epoch, epochs, steps_per_epoch, check_every
        self._first_step: dict[str, torch.Tensor] = {}
        self._first_value: dict[str, torch.Tensor] = {}
        self._observed = 0

    def observe(self, terms: dict[str, torch.Tensor], step_in_epoch: int) -> None:
        """Record this step's terms (device ops only); check on the host every `check_every` steps."""
        for name, value in terms.items():
            value = value.detach().float()
            previous = self._first_step.get(name)
            if previous is None:
                previous = torch.full((), -1, dtype=torch.int64, device=value.device)
                self._first_value[name] = torch.zeros((), device=value.device)
            first_now = (previous < 0) & ~torch.isfinite(value)
            self._first_step[name] = torch.where(first_now, step_in_epoch, previous)
            self._first_value[name] = torch.where(first_now, value, self._first_value[name])
        self._observed += 1
        if self._observed % self.check_every == 0:
            self.check()

    def check(self) -> None:
        """One host transfer; raises if any term was non-finite at any step observed so far."""
        if not self._first_step:
            return
        names = list(self._first_step)
        steps = torch.stack([self._first_step[n] for n in names]).cpu().tolist()
        bad = [(step, name) for step, name in zip(steps, names) if step >= 0]
        if not bad:
            return
        first = min(step for step, _ in bad)
        terms = {name: float(self._first_value[name]) for step, name in bad if step == first}
        raise TrainingDiverged(self.epoch, self.epochs, first, self.steps_per_epoch, terms)
