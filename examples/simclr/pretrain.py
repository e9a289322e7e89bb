"""SimCLR pre-training of one arm: fixed augmentation network, or one learned by hypersteps.

Both arms draw the same PT batches, fixed augmentations and warp noise from generators
seeded alike, and start from the same weights. The meta arm draws the fresh PT batches of
its hypersteps from a second, separately seeded stream, so the main stream matches the
fixed arm's step for step.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import metaopt

from .augment import FixedAugment, LearnedWarp
from .data import IMAGE_SIZE, NUM_CLASSES, Splits
from .model import SimCLRModel, build_encoder, nt_xent

__all__ = [
    "ARMS",
    "PretrainConfig",
    "PretrainResult",
    "ViewStream",
    "build_meta_optimizer",
    "contrastive_loss",
    "pretrain",
    "warmup_steps",
]

logger = logging.getLogger(__name__)

ARMS = ("fixed", "meta")
# Offset between the seeds of the main PT stream and the hyperstep stream.
HYPERSTEP_STREAM_OFFSET = 7919


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of one PT run. All learning rates are Adam step sizes."""

    encoder: str = "compact"
    encoder_width: int = 16
    projection_dim: int = 64
    steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    temperature: float = 0.5
    init_magnitude: float = 0.1
    warp_grid: int = 4
    warmup_steps: int | None = None
    hyper_interval: int = 10
    hyper_lr: float = 1e-2
    ft_steps: int = 1
    ft_mode: str = "head"
    ft_lr: float = 1e-2
    ft_batch_size: int = 64
    device: str = "cpu"


@dataclass
class PretrainResult:
    """Trained model and warp network of one arm, with per-step and per-hyperstep history."""

    model: SimCLRModel
    warp: LearnedWarp
    initial_warp_state: dict[str, torch.Tensor]
    history: dict[str, list[Any]] = field(default_factory=dict)


class ViewStream:
    """Endless stream of PT batches, each as two fixed-augmented views of every image.

    Images are drawn without replacement in epochs shuffled by a generator seeded with
    ``seed``. The fixed augmentation and the warp noise have their own generators
    derived from the same seed, so two streams with one seed yield identical batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        seed: int,
        fixed: FixedAugment,
        device: torch.device,
    ) -> None:
        if not 2 <= batch_size <= len(images):
            raise ValueError(
                f"batch_size must be in [2, {len(images)}] for {len(images)} PT images, "
                f"got {batch_size}"
            )
        self.images = images
        self.batch_size = batch_size
        self.fixed = fixed
        self.device = device
        self._order_generator = torch.Generator().manual_seed(seed)
        self._augment_generator = torch.Generator().manual_seed(seed + 1)
        self.warp_generator = torch.Generator().manual_seed(seed + 2)
        self._pending = torch.empty(0, dtype=torch.long)

    def next_views(self) -> torch.Tensor:
        """Return the next ``[2B, C, H, W]`` batch on the stream's device.

        Rows ``0..B-1`` are first views of B images, rows ``B..2B-1`` their second views.
        """
        if len(self._pending) < self.batch_size:
            order = torch.randperm(len(self.images), generator=self._order_generator)
            self._pending = torch.cat([self._pending, order])
        index, self._pending = self._pending[: self.batch_size], self._pending[self.batch_size :]
        batch = self.images[index]
        seed = int(torch.randint(2**62, (1,), generator=self._augment_generator))
        return self.fixed(torch.cat([batch, batch]), seed).to(self.device)


def contrastive_loss(
    model: SimCLRModel,
    warp: LearnedWarp,
    stream: ViewStream,
    temperature: float,
    through_warp: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute NT-Xent on the stream's next batch after the learned warp.

    With ``through_warp`` False the warp runs under ``torch.no_grad()``, so the loss
    reaches only the model. Returns the loss and the per-view warp amplitudes ``[2B]``.
    """
    views = stream.next_views()
    if through_warp:
        warped, amplitudes = warp.warp_with_amplitudes(views, stream.warp_generator)
    else:
        with torch.no_grad():
            warped, amplitudes = warp.warp_with_amplitudes(views, stream.warp_generator)
    first, second = model(warped).chunk(2)
    return nt_xent(first, second, temperature), amplitudes.detach()


def _ft_loss(model: SimCLRModel, head: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(head(model.encoder(images)), labels)


def _batches(
    data: tuple[torch.Tensor, torch.Tensor], batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut labelled data into near-equal batches of at most ``batch_size`` (no small tail)."""
    images, labels = data
    count = -(-len(labels) // batch_size)
    return [
        (x.to(device), y.to(device))
        for x, y in zip(images.tensor_split(count), labels.tensor_split(count))
    ]


def build_meta_optimizer(
    config: PretrainConfig,
    model: SimCLRModel,
    optimizer: torch.optim.Optimizer,
    warp: LearnedWarp,
    splits: Splits,
    device: torch.device,
) -> metaopt.MetaPTOptimizer:
    """Wrap the PT optimizer so that hypersteps train ``warp``, a module already marked
    with ``metaopt.mark_module``.

    The FT stage fine-tunes a linear head on encoder features for ``config.ft_steps``
    Adam steps on meta-FT train batches (in metaopt's FT mode ``config.ft_mode``) and
    scores it (cross-entropy) on the whole meta-FT val set. The PT stage uses
    metaopt's default estimator.
    """
    head = nn.Linear(model.feature_dim, NUM_CLASSES).to(device)
    finetune = metaopt.FineTune(
        head,
        torch.optim.Adam(head.parameters(), lr=config.ft_lr),
        loss=_ft_loss,
        train=_batches(splits.ft_train, config.ft_batch_size, device),
        # One batch with every meta-FT val image, so that L_val adds no sampling noise.
        val=_batches(splits.ft_val, len(splits.ft_val[1]), device),
        steps=config.ft_steps,
        mode=config.ft_mode,
    )
    return metaopt.MetaPTOptimizer(
        model,
        optimizer,
        meta_optimizer=torch.optim.Adam(warp.parameters(), lr=config.hyper_lr),
        finetune=finetune,
    )


def _warm_up_head(meta: metaopt.MetaPTOptimizer, model: SimCLRModel, batch: Any) -> None:
    """Take one plain FT step of the head on frozen features, encoder in eval mode."""
    finetune = meta.finetune
    was_training = model.training
    model.eval()
    with torch.no_grad():
        features = model.encoder(batch[0])
    model.train(was_training)
    finetune.optimizer.zero_grad()
    F.cross_entropy(finetune.head(features), batch[1]).backward()
    finetune.optimizer.step()


def _record_hyperstep(history: dict[str, list[Any]], record: Any, warp: LearnedWarp) -> None:
    history["hypersteps"].append(dataclasses.asdict(record))
    history["magnitude"].append([record.step, float(warp.magnitude.detach())])


def warmup_steps(config: PretrainConfig, num_pt_images: int) -> int:
    """Return the number of PT steps before the first hyperstep (default: one PT epoch)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return -(-num_pt_images // config.batch_size)


def pretrain(
    config: PretrainConfig, splits: Splits, seed: int, arm: str, quiet: bool = False
) -> PretrainResult:
    """Pre-train a SimCLR model for ``config.steps`` steps in arm ``"fixed"`` or ``"meta"``.

    In the meta arm, ``warmup_steps`` plain PT steps come first, each followed by one
    plain FT-head step. Afterwards a hyperstep with metaopt's default estimator updates
    the warp network every ``hyper_interval`` PT steps.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}, expected one of {ARMS}")
    device = torch.device(config.device)
    torch.manual_seed(seed)
    encoder = build_encoder(config.encoder, 1, config.encoder_width)
    model = SimCLRModel(encoder, config.projection_dim).to(device)
    warp = LearnedWarp(config.init_magnitude, config.warp_grid).to(device)
    initial_warp_state = copy.deepcopy(warp.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    meta = None
    if arm == "meta":
        metaopt.mark_module(warp, name="warp")
        meta = build_meta_optimizer(config, model, optimizer, warp, splits, device)
    else:
        warp.requires_grad_(False)

    fixed = FixedAugment(IMAGE_SIZE)
    stream = ViewStream(splits.pt_images, config.batch_size, seed, fixed, device)
    history = _train_loop(config, model, warp, optimizer, meta, stream, splits, seed, arm, quiet)
    return PretrainResult(model, warp, initial_warp_state, history)


def _train_loop(
    config: PretrainConfig,
    model: SimCLRModel,
    warp: LearnedWarp,
    optimizer: torch.optim.Optimizer,
    meta: metaopt.MetaPTOptimizer | None,
    stream: ViewStream,
    splits: Splits,
    seed: int,
    arm: str,
    quiet: bool,
) -> dict[str, list[Any]]:
    history: dict[str, list[Any]] = {
        "pt_loss": [], "amplitude_mean": [], "magnitude": [], "hypersteps": []
    }
    history["magnitude"].append([0, float(warp.magnitude.detach())])
    warmup = warmup_steps(config, len(splits.pt_images))
    device = torch.device(config.device)
    if meta is not None:
        side_batches = _batches(splits.ft_train, config.ft_batch_size, device)
        hyper_stream = ViewStream(
            splits.pt_images, config.batch_size, seed + HYPERSTEP_STREAM_OFFSET, stream.fixed,
            device,
        )
    # MetaPTOptimizer.zero_grad() also clears the warp's gradients.
    pt_optimizer = meta if meta is not None else optimizer
    model.train()
    warp.train()
    progress = tqdm(range(config.steps), desc=f"seed {seed} {arm}", disable=quiet, leave=False)
    for step in progress:
        pt_optimizer.zero_grad()
        loss, amplitudes = contrastive_loss(model, warp, stream, config.temperature, False)
        loss.backward()
        pt_optimizer.step()
        history["pt_loss"].append(float(loss.detach()))
        history["amplitude_mean"].append(float(amplitudes.abs().mean()))
        if (step + 1) % config.hyper_interval == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", mag=f"{warp.magnitude.item():.4f}")

        if meta is None:
            continue
        if step < warmup:
            _warm_up_head(meta, model, side_batches[step % len(side_batches)])
        elif (step + 1 - warmup) % config.hyper_interval == 0:
            record = meta.hyperstep(
                lambda: contrastive_loss(model, warp, hyper_stream, config.temperature, True)[0]
            )
            _record_hyperstep(history, record, warp)
    return history
