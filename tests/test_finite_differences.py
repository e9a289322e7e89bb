"""Float64 central finite differences of the whole PT -> FT -> val pipeline.

The unrolled estimators are exact for the steps they cover, so with ``UnrolledPT(T)`` and an
unrolled FT stage the hypergradient must equal the derivative of "take T PT steps, then K FT
steps, then evaluate L_val" with respect to the meta-parameters.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import nn

import metaopt

pyg = pytest.importorskip("torch_geometric")
from torch_geometric.data import Batch, Data  # noqa: E402
from torch_geometric.nn import GINConv, global_add_pool  # noqa: E402

TASKS = 3
PT_STEPS = 3
EPS = 1e-6


class MLPEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())

    def forward(self, batch) -> torch.Tensor:
        return self.body(batch.x)


class GINEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = GINConv(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6)))
        self.conv2 = GINConv(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5)))

    def forward(self, batch) -> torch.Tensor:
        h = torch.tanh(self.conv1(batch.x, batch.edge_index))
        h = torch.tanh(self.conv2(h, batch.edge_index))
        return global_add_pool(h, batch.batch)


class PTModel(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.pt_head = nn.Linear(5, TASKS)


class Batches:
    """Float64 PT and FT batches: ``x`` rows (MLP) or small random graphs (GIN)."""

    def __init__(self, graphs: bool) -> None:
        self.gen = torch.Generator().manual_seed(1)
        self.graphs = graphs

    def batch(self, size: int):
        if not self.graphs:
            return Batch(x=torch.randn(size, 4, dtype=torch.float64, generator=self.gen))
        data = []
        for _ in range(size):
            nodes = int(torch.randint(3, 6, (1,), generator=self.gen))
            ring = torch.arange(nodes)
            edges = torch.stack([ring, (ring + 1) % nodes])
            edge_index = torch.cat([edges, edges.flip(0)], dim=1)
            x = torch.randn(nodes, 4, dtype=torch.float64, generator=self.gen)
            data.append(Data(x=x, edge_index=edge_index))
        return Batch.from_data_list(data)

    def labelled(self, size: int, outputs: int):
        batch = self.batch(size)
        batch.y = torch.randn(size, outputs, dtype=torch.float64, generator=self.gen)
        return batch


def pt_loss(model: PTModel, batch, phi: torch.Tensor) -> torch.Tensor:
    per_task = (model.pt_head(model.encoder(batch)) - batch.y).pow(2).mean(dim=0)
    return (2 * torch.sigmoid(phi) * per_task).mean()


def ft_loss(model: PTModel, head: nn.Module, batch) -> torch.Tensor:
    return (head(model.encoder(batch)) - batch.y).pow(2).mean()


def _pipeline(
    model: PTModel, head: nn.Module, phi: torch.Tensor, data: dict, mode: str, ft_steps: int
) -> torch.Tensor:
    """Plain torch: T PT steps, then K FT steps, then the validation loss."""
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    pt_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batch in data["pt"]:
        pt_opt.zero_grad()
        pt_loss(model, batch, phi).backward()
        pt_opt.step()

    model.eval()
    groups = [{"params": head.parameters()}]
    if mode == "full":
        groups.append({"params": model.parameters()})
    ft_opt = torch.optim.Adam(groups, lr=0.05)
    for step in range(ft_steps):
        ft_opt.zero_grad()
        ft_loss(model, head, data["ft_train"][step]).backward()
        ft_opt.step()
    with torch.no_grad():
        return ft_loss(model, head, data["ft_val"][0])


def _metaopt_hypergradient(
    model: PTModel, head: nn.Module, phi0: torch.Tensor, data: dict, mode: str, ft_steps: int
) -> torch.Tensor:
    model, head = copy.deepcopy(model), copy.deepcopy(head)
    phi = metaopt.Param(phi0.clone(), name="task_logits")
    meta = metaopt.MetaPTOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        meta_optimizer=torch.optim.SGD([phi], lr=1.0),
        finetune=metaopt.FineTune(
            head, torch.optim.Adam(head.parameters(), lr=0.05), loss=ft_loss,
            train=data["ft_train"], val=data["ft_val"], steps=ft_steps, mode=mode,
        ),
        pt_estimator=metaopt.UnrolledPT(steps=PT_STEPS),
    )
    for batch in data["pt"]:
        meta.zero_grad()
        pt_loss(model, batch, phi).backward()
        meta.step(loss_fn=lambda b=batch: pt_loss(model, b, phi))
    meta.hyperstep()
    return phi0 - phi.detach()


def _central_differences(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    grad = torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros_like(x)
        step[i] = EPS
        grad[i] = (f(x + step) - f(x - step)) / (2 * EPS)
    return grad


@pytest.mark.parametrize("mode, ft_steps", [("head", 1), ("head", 3), ("full", 2)])
@pytest.mark.parametrize("graphs", [False, True], ids=["mlp", "gin"])
def test_unrolled_pipeline_matches_finite_differences(graphs: bool, mode: str, ft_steps: int):
    torch.manual_seed(0)
    encoder = GINEncoder() if graphs else MLPEncoder()
    model = PTModel(encoder).double()
    head = nn.Linear(5, 1).double()
    batches = Batches(graphs)
    data = {
        "pt": [batches.labelled(6, TASKS) for _ in range(PT_STEPS)],
        "ft_train": [batches.labelled(6, 1) for _ in range(ft_steps)],
        "ft_val": [batches.labelled(6, 1)],
    }
    phi0 = 0.3 * torch.randn(TASKS, dtype=torch.float64)

    expected = _central_differences(
        lambda phi: _pipeline(model, head, phi, data, mode, ft_steps), phi0
    )
    got = _metaopt_hypergradient(model, head, phi0, data, mode, ft_steps)

    assert expected.abs().max() > 1e-6  # the check is not vacuous
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
