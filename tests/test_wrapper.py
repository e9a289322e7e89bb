"""The torch.optim surface of MetaPTOptimizer: resume, zero_grad, buffers and modes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import metaopt


class Net(nn.Module):
    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2))
        self.pt_head = nn.Linear(8, tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class Setup:
    """A task-weighting run with Adam everywhere and a BatchNorm augmentation meta-module."""

    def __init__(self, seed: int = 0, estimator: metaopt.PTEstimator | None = None) -> None:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(0)  # the same data for every seed
        self.tasks = 3
        self.model = Net(self.tasks)
        self.head = nn.Linear(8, 1)
        self.aug = metaopt.mark_module(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "aug")
        self.phi = metaopt.Param(torch.zeros(self.tasks), name="logits")
        self.pt_data = [(torch.randn(16, 4, generator=gen), torch.rand(16, self.tasks, generator=gen))
                        for _ in range(12)]
        ft = [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(3)]
        self.meta = metaopt.MetaPTOptimizer(
            self.model,
            torch.optim.Adam(self.model.parameters(), lr=1e-2),
            meta_optimizer=torch.optim.Adam([self.phi, *self.aug.parameters()], lr=0.1),
            finetune=metaopt.FineTune(
                self.head, torch.optim.Adam(self.head.parameters(), lr=1e-2),
                loss=lambda m, h, b: (h(m(b[0])) - b[1]).pow(2).mean(), train=ft, val=ft[:2],
            ),
            pt_estimator=estimator,
        )

    def pt_loss(self, batch) -> torch.Tensor:
        x, y = batch
        x = x + self.aug(x)
        logits = self.model.pt_head(self.model(x))
        bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return (2 * torch.sigmoid(self.phi) * bce).mean()

    def run(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            self.meta.zero_grad()
            self.pt_loss(self.pt_data[step]).backward()
            self.meta.step()
            if step % 2 == 1:
                self.meta.hyperstep(lambda s=step: self.pt_loss(self.pt_data[(s + 1) % 12]))

    def snapshot(self) -> dict:
        return copy.deepcopy({
            "model": self.model.state_dict(), "head": self.head.state_dict(),
            "aug": self.aug.state_dict(), "phi": self.phi.detach(),
            "meta": self.meta.state_dict(), "rng": torch.get_rng_state(),
        })

    def restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.head.load_state_dict(saved["head"])
        self.aug.load_state_dict(saved["aug"])
        with torch.no_grad():
            self.phi.copy_(saved["phi"])
        self.meta.load_state_dict(saved["meta"])
        torch.set_rng_state(saved["rng"])


def _all_tensors(setup: Setup) -> list[torch.Tensor]:
    return [*setup.model.state_dict().values(), *setup.head.state_dict().values(),
            *setup.aug.state_dict().values(), setup.phi.detach()]


def test_resume_is_bit_for_bit() -> None:
    straight = Setup()
    straight.run(0, 10)

    first = Setup()
    first.run(0, 5)
    saved = first.snapshot()
    resumed = Setup(seed=1)  # different initial values, all overwritten by the restore
    resumed.restore(saved)
    resumed.run(5, 10)

    assert resumed.meta.step_count == straight.meta.step_count == 10
    assert resumed.meta.hyperstep_count == straight.meta.hyperstep_count == 5
    for got, expected in zip(_all_tensors(resumed), _all_tensors(straight)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_hyperstep_leaves_buffers_and_modes_unchanged() -> None:
    setup = Setup()
    setup.run(0, 2)
    buffers = [b.clone() for m in (setup.model, setup.aug) for b in m.buffers()]
    modes = [m.training for m in setup.model.modules()]

    setup.meta.hyperstep(lambda: setup.pt_loss(setup.pt_data[3]))

    after = [b for m in (setup.model, setup.aug) for b in m.buffers()]
    for got, expected in zip(after, buffers):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert [m.training for m in setup.model.modules()] == modes


def test_plain_forward_changes_buffers() -> None:
    setup = Setup()
    before = setup.aug[1].running_mean.clone()
    setup.pt_loss(setup.pt_data[0])
    assert not torch.equal(setup.aug[1].running_mean, before)


def test_hyperstep_updates_every_meta_parameter() -> None:
    setup = Setup()
    setup.run(0, 2)
    before = [p.detach().clone() for p in (setup.phi, *setup.aug.parameters())]

    record = setup.meta.hyperstep(lambda: setup.pt_loss(setup.pt_data[3]))

    assert record.applied
    for param, old in zip((setup.phi, *setup.aug.parameters()), before):
        assert not torch.equal(param.detach(), old)
        assert param.grad is None


def test_zero_grad_clears_meta_parameter_grads() -> None:
    setup = Setup()
    setup.pt_loss(setup.pt_data[0]).backward()
    assert setup.phi.grad is not None

    setup.meta.zero_grad()

    assert setup.phi.grad is None
    assert all(p.grad is None for p in setup.model.parameters())


def test_head_is_carried_forward() -> None:
    setup = Setup()
    before = [p.detach().clone() for p in setup.head.parameters()]
    setup.meta.hyperstep(lambda: setup.pt_loss(setup.pt_data[0]))
    assert all(not torch.equal(p, b) for p, b in zip(setup.head.parameters(), before))
    assert len(setup.meta.finetune.optimizer.state) == 2


def test_param_groups_are_shared_with_pt_optimizer() -> None:
    setup = Setup()
    setup.meta.param_groups[0]["lr"] = 0.5
    assert setup.meta.optimizer.param_groups[0]["lr"] == 0.5


def test_loss_tensor_reuses_forward_graph() -> None:
    closure_run, tensor_run = Setup(), Setup()
    batch = closure_run.pt_data[0]
    for setup in (closure_run, tensor_run):
        setup.model.eval()  # no dropout, so both runs see identical PT losses

    closure_run.pt_loss(batch).backward()
    closure_record = closure_run.meta.hyperstep(lambda: closure_run.pt_loss(batch))
    tensor_record = tensor_run.meta.hyperstep(tensor_run.pt_loss(batch))

    assert tensor_record.hypergrad_norm == closure_record.hypergrad_norm
    torch.testing.assert_close(tensor_run.phi, closure_run.phi, rtol=0, atol=0)
    for got, expected in zip(tensor_run.model.parameters(), closure_run.model.parameters()):
        assert got.grad is not None
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-6, atol=1e-8)


def test_loss_tensor_rejected_for_unrolled_pt() -> None:
    setup = Setup(estimator=metaopt.UnrolledPT(steps=1))
    with pytest.raises(ValueError, match="cannot reuse a PT loss tensor"):
        setup.meta.hyperstep(setup.pt_loss(setup.pt_data[0]))


def test_unrolled_pt_replays_dropout_steps() -> None:
    setup = Setup(estimator=metaopt.UnrolledPT(steps=3))
    for step in range(4):
        setup.meta.zero_grad()
        loss = setup.pt_loss(setup.pt_data[step])  # the model has dropout in train mode
        loss.backward()
        setup.meta.step(loss_fn=lambda b=setup.pt_data[step]: setup.pt_loss(b))

    record = setup.meta.hyperstep()  # warnings are errors: a replay mismatch would fail here

    assert record.applied
    assert record.hypergrad_norm > 0


def test_train_head_moves_only_the_head() -> None:
    setup = Setup()
    model_before = [p.detach().clone() for p in setup.model.parameters()]
    head_before = [p.detach().clone() for p in setup.head.parameters()]

    loss = setup.meta.train_head(steps=3)

    assert loss > 0
    assert setup.meta.finetune.train.consumed == 3
    for param, old in zip(setup.model.parameters(), model_before):
        assert torch.equal(param.detach(), old)
        assert param.grad is None
    for param, old in zip(setup.head.parameters(), head_before):
        assert not torch.equal(param.detach(), old)


def test_train_head_rejects_zero_steps() -> None:
    with pytest.raises(ValueError, match="train_head steps must be an integer >= 1, got 0"):
        Setup().meta.train_head(steps=0)


def test_unrolled_pt_window_restarts_after_update() -> None:
    setup = Setup(estimator=metaopt.UnrolledPT(steps=4))
    for step in range(6):
        setup.meta.zero_grad()
        setup.pt_loss(setup.pt_data[step]).backward()
        setup.meta.step(loss_fn=lambda b=setup.pt_data[step]: setup.pt_loss(b))
        if step % 2 == 1:
            # A replay across the previous update would warn, and warnings are errors here.
            assert setup.meta.hyperstep().applied
    assert len(setup.meta._records) == 0
