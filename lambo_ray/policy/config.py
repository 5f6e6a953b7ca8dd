"""Policy hyperparameters and the named model scales S / M / L.

The scale is chosen by name in every config (pretraining, Tune, Serve), and parameter counts are
checked by building the model on the ``meta`` device: the L model (about 1e9 parameters, the
paper's "large AI model") is counted without allocating its 4 GB of weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from lambo_ray.errors import LamboInputError, reject_unknown_keys


@dataclass(frozen=True)
class PolicyConfig:
    d_model: int = 64
    n_heads: int = 4
    enc_layers: int = 3
    dec_layers: int = 1  # the paper's shallow decoder; >1 stacks identical decoder layers
    ffn_mult: int = 4
    dropout: float = 0.0  # encoder only; > 0 makes train-mode log-probs differ from sampling-time ones
    share_eps: float = 1e-4  # u in [eps, 1 - eps]: keeps Beta log-densities finite
    logit_clip: float = 10.0  # C * tanh(score) on pointer logits (Bello et al.), stabilises RL
    n_prompts: int = 2

    def __post_init__(self) -> None:
        problems = []
        for name in ("d_model", "n_heads", "enc_layers", "dec_layers", "ffn_mult", "n_prompts"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.d_model % max(self.n_heads, 1):
            problems.append(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not (0.0 <= self.dropout < 1.0):
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if not (0.0 < self.share_eps < 0.5):
            problems.append(f"share_eps must be in (0, 0.5) (got {self.share_eps})")
        if problems:
            raise LamboInputError("; ".join(problems), where="policy config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        reject_unknown_keys(cls, data, "policy config")
        return cls(**data)

    def replace(self, **changes: Any) -> PolicyConfig:
        return dataclasses.replace(self, **changes)


SCALES: dict[str, PolicyConfig] = {
    # ~0.2M parameters: trains on 2 CPU cores, used by tests and CI.
    "S": PolicyConfig(d_model=64, n_heads=4, enc_layers=3),
    # ~27M: the paper's LAMBO_M.
    "M": PolicyConfig(d_model=512, n_heads=8, enc_layers=8),
    # ~1.0e9: the paper's LAMBO_L ("large AI model").
    "L": PolicyConfig(d_model=2048, n_heads=16, enc_layers=18),
}


def scale_config(name: str, **overrides: Any) -> PolicyConfig:
    if name not in SCALES:
        raise LamboInputError(f"unknown model scale {name!r}; expected one of {', '.join(SCALES)}", where="scale")
    return SCALES[name].replace(**overrides) if overrides else SCALES[name]


def count_parameters(config: PolicyConfig | str) -> int:
    """Parameters of the policy built on the meta device (no memory is allocated)."""
    from lambo_ray.policy.model import LamboPolicy

    cfg = scale_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        model = LamboPolicy(cfg)
    return sum(p.numel() for p in model.parameters())
