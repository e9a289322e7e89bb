"""Synthetic bilevel problems for timing: a multitask GIN on random graphs, a SimCLR conv net.

Both problems have the shape of the two settings of Raghu et al. (2021), multitask PT with task
weights and SimCLR with a learned augmentation, but random data, because only the cost of a step
matters here. The data are fixed at build time (a pool of batches drawn from a seeded
generator), so two builds with the same arguments hold identical models, batches and
meta-parameters.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GINConv, global_mean_pool

import metaopt

__all__ = [
    "ATOM_FEATURES",
    "Problem",
    "GINSize",
    "ConvSize",
    "build_gin",
    "build_conv",
    "count_parameters",
    "make_meta",
]

logger = logging.getLogger(__name__)

ATOM_FEATURES = 9
IMAGE_SIZE = 28
FT_CLASSES = 10


@dataclasses.dataclass
class Problem:
    """A PT model with meta-parameters, an FT head, batch pools and the two losses.

    Attributes:
        name: a label for tables, e.g. ``"gin-3x64"``.
        model: the module trained by PT; ``model.encoder`` maps a batch to features.
        head: the FT head on the encoder features.
        meta_params: the meta-parameters ``phi``.
        pt_batches: the pool of PT batches, used in turn.
        ft_train: meta-FT train batches.
        ft_val: meta-FT val batches.
        pt_loss: ``pt_loss(batch)``, the PT loss reading ``model`` and ``meta_params``.
        ft_loss: ``ft_loss(model, head, batch)``, the FT loss in metaopt's signature.
        pt_lr: the PT learning rate (Adam), also the Neumann step size ``alpha``.
        ft_lr: the FT head learning rate (SGD).
    """

    name: str
    model: nn.Module
    head: nn.Module
    meta_params: list[torch.Tensor]
    pt_batches: list[Any]
    ft_train: list[Any]
    ft_val: list[Any]
    pt_loss: Callable[[Any], torch.Tensor]
    ft_loss: Callable[[nn.Module, nn.Module, Any], torch.Tensor]
    pt_lr: float = 1e-3
    ft_lr: float = 0.1

    def pt_batch(self, index: int) -> Any:
        """Return PT batch ``index`` of the pool, cycling."""
        return self.pt_batches[index % len(self.pt_batches)]

    def pt_closure(self, index: int) -> Callable[[], torch.Tensor]:
        """Return a closure computing the PT loss on PT batch ``index`` (for ``hyperstep``)."""
        batch = self.pt_batch(index)
        return lambda: self.pt_loss(batch)

    def pt_step(self, optimizer: Any, index: int, *, record: bool = False) -> None:
        """Take one PT step on batch ``index`` with ``optimizer`` (a torch or metaopt optimizer).

        ``record=True`` passes the loss closure to ``MetaPTOptimizer.step``, as ``UnrolledPT``
        needs.
        """
        optimizer.zero_grad()
        closure = self.pt_closure(index)
        closure().backward()
        if record:
            optimizer.step(loss_fn=closure)
        else:
            optimizer.step()

    @property
    def theta(self) -> list[torch.Tensor]:
        """The PT parameters."""
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclasses.dataclass(frozen=True)
class GINSize:
    """Size of the molecular problem: GIN depth and width, PT tasks, graphs per batch.

    ``task_rank > 0`` replaces the linear PT head by a trained ``hidden -> task_rank`` layer
    followed by a fixed random ``task_rank -> tasks`` projection, so the number of PT parameters
    does not depend on the number of tasks (used when scaling the meta-parameter count).
    """

    layers: int = 3
    hidden: int = 64
    tasks: int = 128
    graphs: int = 32
    nodes: int = 25
    task_rank: int = 0

    @property
    def label(self) -> str:
        return f"gin-{self.layers}x{self.hidden}"


@dataclasses.dataclass(frozen=True)
class ConvSize:
    """Size of the SimCLR problem: conv width, conv layers, images per batch (per view)."""

    width: int = 32
    layers: int = 3
    images: int = 64

    @property
    def label(self) -> str:
        return f"conv-{self.layers}x{self.width}"


def count_parameters(module: nn.Module) -> int:
    """Return the number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class GIN(nn.Module):
    """GINConv layers (MLP ``h -> 2h -> h``) with BatchNorm, mean-pooled per graph."""

    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Linear(ATOM_FEATURES, hidden)
        self.convs = nn.ModuleList(
            GINConv(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(),
                                  nn.Linear(2 * hidden, hidden)))
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))

    def forward(self, batch: Batch) -> torch.Tensor:
        h = self.embed(batch.x)
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h, batch.edge_index))
            if index < len(self.convs) - 1:
                h = torch.relu(h)
        return global_mean_pool(h, batch.batch)


class TaskHead(nn.Module):
    """Multitask PT head: linear, or low-rank with a fixed random task projection."""

    def __init__(self, hidden: int, tasks: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, rank if rank > 0 else tasks)
        projection = torch.randn(rank, tasks, generator=generator) / max(rank, 1) ** 0.5
        self.register_buffer("projection", projection if rank > 0 else None)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features)
        return out if self.projection is None else out @ self.projection


def _random_molecule(nodes: int, generator: torch.Generator) -> Data:
    """Draw a connected sparse graph like a small molecule: a random tree plus a few rings."""
    count = int(torch.randint(nodes - 5, nodes + 6, (1,), generator=generator))
    parents = [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, count)]
    edges = list(zip(range(1, count), parents))
    for _ in range(max(1, count // 10)):
        a, b = torch.randint(0, count, (2,), generator=generator).tolist()
        if a != b:
            edges.append((a, b))
    pairs = torch.tensor(edges, dtype=torch.long).T
    edge_index = torch.cat([pairs, pairs.flip(0)], dim=1)
    x = torch.bernoulli(torch.full((count, ATOM_FEATURES), 0.3), generator=generator)
    return Data(x=x, edge_index=edge_index)


def _graph_batch(size: GINSize, generator: torch.Generator, device: torch.device) -> Batch:
    graphs = [_random_molecule(size.nodes, generator) for _ in range(size.graphs)]
    return Batch.from_data_list(graphs).to(device)


def build_gin(
    size: GINSize,
    device: torch.device | str = "cpu",
    seed: int = 0,
    pools: tuple[int, int, int] = (8, 4, 2),
) -> Problem:
    """Build the multitask-PT GIN problem with ``2 * sigmoid(logit)`` task weights.

    Args:
        size: model and batch sizes.
        device: where the model, the meta-parameters and the batches live.
        seed: seeds the weights and the data.
        pools: the numbers of PT, meta-FT train and meta-FT val batches.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = GIN(size.layers, size.hidden)
    model = nn.ModuleDict({
        "encoder": encoder,
        "pt_head": TaskHead(size.hidden, size.tasks, size.task_rank, generator),
    }).to(device)
    head = nn.Linear(size.hidden, 1).to(device)
    logits = metaopt.Param(torch.zeros(size.tasks, device=device), name="task_logits")

    def labelled(count: int, columns: int) -> list[tuple[Batch, torch.Tensor]]:
        out = []
        for _ in range(count):
            graphs = _graph_batch(size, generator, device)
            labels = torch.bernoulli(torch.full((size.graphs, columns), 0.5), generator=generator)
            out.append((graphs, labels.to(device)))
        return out

    def pt_loss(batch: tuple[Batch, torch.Tensor]) -> torch.Tensor:
        graphs, labels = batch
        logit_out = model["pt_head"](model["encoder"](graphs))
        bce = F.binary_cross_entropy_with_logits(logit_out, labels, reduction="none")
        return (2 * torch.sigmoid(logits) * bce).mean()

    def ft_loss(model: nn.Module, head: nn.Module, batch: tuple[Batch, torch.Tensor]):
        graphs, labels = batch
        return F.binary_cross_entropy_with_logits(head(model["encoder"](graphs)), labels)

    n_pt, n_train, n_val = pools
    return Problem(
        name=size.label, model=model, head=head, meta_params=[logits],
        pt_batches=labelled(n_pt, size.tasks), ft_train=labelled(n_train, 1),
        ft_val=labelled(n_val, 1), pt_loss=pt_loss, ft_loss=ft_loss,
    )


class ConvEncoder(nn.Module):
    """3x3 conv layers with BatchNorm and ReLU, stride 2 after the first, average-pooled."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels = 1
        for index in range(layers):
            out = width * 2 ** min(index, 3)
            stride = 1 if index == 0 else 2
            modules += [nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False),
                        nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.net = nn.Sequential(*modules, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class StrengthNet(nn.Module):
    """Augmentation network: a per-image strength in (0, 1) times a learned global magnitude."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1),
        )
        self.log_magnitude = nn.Parameter(torch.tensor(-1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(images)).view(-1, 1, 1, 1) * self.log_magnitude.exp()


def _smooth_noise(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Draw low-frequency noise: a 7x7 grid of normal draws upsampled bilinearly to the image."""
    coarse = torch.randn(shape[0], 1, 7, 7, generator=generator)
    return F.interpolate(coarse, size=tuple(shape[-2:]), mode="bilinear", align_corners=False)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Compute NT-Xent over ``2N`` anchors, where row ``i`` of ``z1`` and of ``z2`` pair up."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(self_pairs, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def build_conv(
    size: ConvSize,
    device: torch.device | str = "cpu",
    seed: int = 0,
    pools: tuple[int, int, int] = (8, 4, 2),
) -> Problem:
    """Build the SimCLR problem: NT-Xent PT on two views warped by a learned strength network.

    Each PT batch contains 28x28 images and two fixed smooth-noise fields; view ``k`` is
    ``image + strength(image) * noise_k``, so the PT loss reads the meta-parameters (the
    strength network) through the inputs. FT is 10-class classification with a linear head.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = ConvEncoder(size.width, size.layers)
    dim = encoder.feature_dim
    projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 64))
    model = nn.ModuleDict({"encoder": encoder, "projector": projector}).to(device)
    head = nn.Linear(dim, FT_CLASSES).to(device)
    augment = metaopt.mark_module(StrengthNet().to(device), name="augment")
    shape = (size.images, 1, IMAGE_SIZE, IMAGE_SIZE)

    def images() -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    pt_batches = [
        tuple(t.to(device) for t in (images(), _smooth_noise(shape, generator),
                                     _smooth_noise(shape, generator)))
        for _ in range(pools[0])
    ]

    def labelled(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _ in range(count):
            labels = torch.randint(0, FT_CLASSES, (size.images,), generator=generator)
            out.append((images().to(device), labels.to(device)))
        return out

    def pt_loss(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        image, noise1, noise2 = batch
        strength = augment(image)
        z1 = model["projector"](model["encoder"](image + strength * noise1))
        z2 = model["projector"](model["encoder"](image + strength * noise2))
        return nt_xent(z1, z2)

    def ft_loss(model: nn.Module, head: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
        image, labels = batch
        return F.cross_entropy(head(model["encoder"](image)), labels)

    return Problem(
        name=size.label, model=model, head=head, meta_params=list(augment.parameters()),
        pt_batches=pt_batches, ft_train=labelled(pools[1]), ft_val=labelled(pools[2]),
        pt_loss=pt_loss, ft_loss=ft_loss, pt_lr=1e-3, ft_lr=0.1,
    )


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a detached copy of the gradients it last stepped with."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float) -> None:
        super().__init__(params, lr=lr)
        self.last_grads: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"]]
        self.last_grads = [p.grad.detach().clone() for p in params]
        return super().step(closure)


def make_meta(
    problem: Problem,
    estimator: metaopt.PTEstimator,
    *,
    ft_steps: int = 1,
    ft_mode: str = "head",
    meta_lr: float = 1e-3,
) -> metaopt.MetaPTOptimizer:
    """Wrap ``problem`` in a ``MetaPTOptimizer`` (Adam PT, SGD FT head, ``RecordingSGD`` meta).

    The meta-optimizer records each hypergradient in ``meta.meta_optimizer.last_grads``.
    """
    finetune = metaopt.FineTune(
        problem.head, torch.optim.SGD(problem.head.parameters(), lr=problem.ft_lr),
        loss=problem.ft_loss, train=problem.ft_train, val=problem.ft_val,
        steps=ft_steps, mode=ft_mode,
    )
    return metaopt.MetaPTOptimizer(
        problem.model, torch.optim.Adam(problem.model.parameters(), lr=problem.pt_lr),
        meta_optimizer=RecordingSGD(problem.meta_params, lr=meta_lr),
        finetune=finetune, pt_estimator=estimator, on_divergence="warn",
    )
