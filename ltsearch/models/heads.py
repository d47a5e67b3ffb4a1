"""Classification heads, and loading a weights file into a backbone whose head may not match.

The cosine head is the one LDAM-DRW (Cao et al. 2019, Sec. 3.1 and App. C) puts on top of the
backbone: with unit-norm features and class vectors the logits are cosines, so LDAM's margin Δ_y is
subtracted on a fixed scale and the loss multiplies the logits by s.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ltsearch.errors import ConfigError

WEIGHTS_KEY = "model.weights"


class NormedLinear(nn.Module):
    """logits[:, c] = cos(x, W_c): x and each class vector W_c are L2-normalised, so logits lie in [-1, 1].

    `weight` is stored (num_classes, D), the layout of `nn.Linear.weight`, so code that reads class
    vectors (classifier re-balancing, feature/weight norms) treats both heads alike. There is no bias:
    a bias would shift the cosines and break the bounded range the LDAM margin is defined on.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1, 1) then each class vector rescaled to unit norm (LDAM's initialisation)."""
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def create_classifier(dim: int, num_classes: int, cosine: bool) -> nn.Module:
    """The head on pooled features: cosine (`NormedLinear`, for LDAM) or a plain `nn.Linear`."""
    return NormedLinear(dim, num_classes) if cosine else nn.Linear(dim, num_classes)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local state-dict file (bare, or wrapped as {"state_dict": ...} like LDAM checkpoints)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on a foreign file; each is the user's to fix
        raise ConfigError(WEIGHTS_KEY, str(path), "a readable PyTorch state-dict file", hint=str(exc)) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(WEIGHTS_KEY, str(path), "a file holding a state dict (parameter name -> tensor)")
    return state


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load `state` (keys already in the model's layout) into `model`; the trunk must match exactly.

    The head is task-specific: the file's `classifier.*` entries are used only when they match the
    model's head in names and shapes (same class count, same head kind) and are ignored otherwise,
    so ImageNet weights initialise a 10-class trunk. Any other missing, unexpected or mis-shaped
    entry is an error naming the file and the first offending keys.
    """
    own = model.state_dict()
    state = _without_foreign_head(state, own)
    problems = _trunk_mismatches(state, own)
    if problems:
        raise ConfigError(WEIGHTS_KEY, str(path), f"a state dict matching the backbone ({type(model).__name__})",
                          hint="Mismatches: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    model.load_state_dict(state, strict=False)


def _is_head(key: str) -> bool:
    return key.startswith("classifier.")


def _without_foreign_head(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    file_head = {k: v for k, v in state.items() if _is_head(k)}
    own_head = {k: v for k, v in own.items() if _is_head(k)}
    head_matches = file_head.keys() == own_head.keys() and all(v.shape == own_head[k].shape for k, v in file_head.items())
    return state if head_matches else {k: v for k, v in state.items() if not _is_head(k)}


def _trunk_mismatches(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    trunk = [k for k in own if not _is_head(k)]
    missing = [f"missing {k}" for k in trunk if k not in state]
    unexpected = [f"unexpected {k}" for k in state if k not in own]
    shapes = [f"{k} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    return missing + unexpected + shapes
