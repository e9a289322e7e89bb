"""Configuration of one experiment: data, model, PT, meta-learning and evaluation settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ARMS", "ESTIMATORS", "FT_MODES", "ExperimentConfig"]

ARMS = ("uniform", "meta")
ESTIMATORS = ("neumann", "cg", "unrolled", "first-order")
FT_MODES = ("head", "full", "implicit")


@dataclass
class ExperimentConfig:
    """Every setting of a run. The defaults are those of `python -m examples.molecules`."""

    out: Path = Path("results/molecules")
    cache_dir: Path | None = Path.home() / ".cache" / "metaopt" / "molecules"
    device: str = "cpu"
    threads: int = 1
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = dataclasses.field(default_factory=lambda: list(ARMS))
    # data
    max_ft_molecules: int | None = None
    max_pt_molecules: int | None = None
    moses: int = 0
    noise_tasks: int = 10
    min_prevalence: float = 0.01
    max_prevalence: float = 0.99
    split_seed: int | None = None
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # model
    layers: int = 3
    hidden: int = 64
    dropout: float = 0.0
    pooling: str = "mean"
    # PT
    pt_steps: int = 1000
    pt_batch_size: int = 64
    pt_lr: float = 1e-3
    # meta-learning
    warmup_steps: int = 200
    hyper_interval: int = 10
    meta_lr: float = 0.05
    pt_estimator: str = "neumann"
    neumann_terms: int = 1
    cg_iterations: int = 10
    cg_damping: float = 0.0
    unroll_steps: int = 5
    ft_mode: str = "head"
    ft_steps: int = 1
    meta_ft_lr: float = 1e-2
    meta_ft_batch_size: int = 128
    # evaluation
    eval_batch_size: int = 128
    linear_steps: int = 300
    linear_lr: float = 1e-2
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3

    def validate(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        for arm in self.arms:
            if arm not in ARMS:
                raise ValueError(f"unknown arm {arm!r}, expected one of {ARMS}")
        if self.pt_estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown PT estimator {self.pt_estimator!r}, expected one of {ESTIMATORS}"
            )
        if self.ft_mode not in FT_MODES:
            raise ValueError(f"unknown FT mode {self.ft_mode!r}, expected one of {FT_MODES}")
        if not self.seeds:
            raise ValueError("no seeds given: pass at least one, e.g. --seeds 0")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0 keeps torch's default), got {self.threads}")
        positive = {
            "pt_steps": self.pt_steps,
            "pt_batch_size": self.pt_batch_size,
            "hyper_interval": self.hyper_interval,
            "ft_steps": self.ft_steps,
            "meta_ft_batch_size": self.meta_ft_batch_size,
            "eval_batch_size": self.eval_batch_size,
            "layers": self.layers,
            "hidden": self.hidden,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 <= self.warmup_steps <= self.pt_steps:
            raise ValueError(
                f"warmup_steps must be in [0, pt_steps={self.pt_steps}], got {self.warmup_steps}"
            )
        if self.pt_estimator == "unrolled" and self.unroll_steps > self.hyper_interval:
            raise ValueError(
                f"unroll_steps ({self.unroll_steps}) must be <= hyper_interval "
                f"({self.hyper_interval}), because older PT steps used older task weights and "
                "their replay with the current weights would not match"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_json(self) -> dict[str, object]:
        """Return the settings as JSON-compatible values (paths as strings)."""
        values = dataclasses.asdict(self)
        return {
            key: str(value) if isinstance(value, Path) else value for key, value in values.items()
        }
