"""Tests of the SimCLR example: data, the learned warp, NT-Xent, hypersteps and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

import metaopt
from examples.simclr.augment import FixedAugment, LearnedWarp, smooth_warp
from examples.simclr.data import Splits, load_images, split_images
from examples.simclr.model import CompactEncoder, SimCLRModel, nt_xent, small_resnet18
from examples.simclr.pretrain import (
    PretrainConfig,
    ViewStream,
    build_meta_optimizer,
    contrastive_loss,
)
from examples.simclr.train import main


@pytest.fixture
def one_thread():
    """Run torch on one CPU thread, which is faster for tiny tensors on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image_keys(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


# ----- data -----


@pytest.mark.parametrize("name, count", [("mnist", 5000), ("digits", 1797)])
def test_load_images_shapes(name: str, count: int) -> None:
    images, labels = load_images(name)
    assert images.shape == (count, 1, 28, 28)
    assert images.dtype == torch.float32
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_split_sizes_disjoint_stratified() -> None:
    images, labels = load_images("digits")
    splits = split_images(images, labels, 100, 0.2, 0.3, seed=0)
    sizes = splits.sizes()
    assert sizes == {"pt": 1337, "ft_train": 70, "ft_val": 30, "test": 360}
    parts = [splits.pt_images, splits.ft_train[0], splits.ft_val[0], splits.test[0]]
    keys = [_image_keys(part) for part in parts]
    assert sum(len(k) for k in keys) == len(set().union(*keys)) == len(images)
    assert splits.ft_train[1].unique().numel() == 10
    assert splits.ft_val[1].unique().numel() == 10


def test_split_depends_only_on_seed() -> None:
    images, labels = load_images("digits")
    first = split_images(images, labels, 100, 0.2, 0.3, seed=3)
    again = split_images(images, labels, 100, 0.2, 0.3, seed=3)
    other = split_images(images, labels, 100, 0.2, 0.3, seed=4)
    assert torch.equal(first.test[0], again.test[0])
    assert not torch.equal(first.test[0], other.test[0])


def test_split_rejects_tiny_ft_set() -> None:
    images, labels = load_images("digits")
    with pytest.raises(ValueError, match="Raise --ft-labels"):
        split_images(images, labels, 20, 0.2, 0.3, seed=0)


# ----- augmentations -----


def test_fixed_augment_reproducible() -> None:
    images = torch.rand(6, 1, 28, 28)
    augment = FixedAugment(28)
    expected_next = torch.rand(1, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    first = augment(images, seed=11)
    assert torch.equal(torch.rand(1), expected_next)  # caller's RNG untouched
    assert torch.equal(first, augment(images, seed=11))
    assert not torch.equal(first, augment(images, seed=12))
    assert first.shape == images.shape
    assert first.min() >= 0.0
    assert first.max() <= 1.0


@pytest.mark.parametrize("size", [(28, 28), (8, 8), (13, 17)])
def test_warp_identity_at_zero_amplitude(size: tuple[int, int]) -> None:
    images = torch.rand(4, 1, *size)
    generator = torch.Generator().manual_seed(0)
    warped = smooth_warp(images, torch.zeros(4), generator, grid_size=4)
    assert torch.equal(warped, images)


def test_learned_warp_identity_at_zero_magnitude() -> None:
    images = torch.rand(8, 1, 28, 28)
    warp = LearnedWarp(init_magnitude=0.0)
    warped = warp(images, torch.Generator().manual_seed(0))
    assert torch.equal(warped, images)


def test_learned_warp_reproducible_from_generator() -> None:
    images = torch.rand(8, 1, 28, 28)
    warp = LearnedWarp(init_magnitude=0.2)
    first = warp(images, torch.Generator().manual_seed(1))
    again = warp(images, torch.Generator().manual_seed(1))
    other = warp(images, torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert (first - images).abs().max() > 0.05


def test_warp_gradients_match_finite_differences(one_thread) -> None:
    """d NT-Xent / d(every warp parameter) by autograd equals float64 central differences."""
    torch.manual_seed(0)
    warp = LearnedWarp(init_magnitude=0.3, grid_size=3, hidden_channels=2).double()
    model = SimCLRModel(CompactEncoder(width=2), projection_dim=4).double()
    views = torch.rand(6, 1, 8, 8, dtype=torch.float64)  # two views of three images

    def loss() -> torch.Tensor:
        warped = warp(views, torch.Generator().manual_seed(0))
        first, second = model(warped).chunk(2)
        return nt_xent(first, second, temperature=0.5)

    names, params = zip(*warp.named_parameters())
    grads = torch.autograd.grad(loss(), params)
    eps = 1e-6
    for name, param, grad in zip(names, params, grads):
        assert grad.abs().sum() > 0, f"no gradient reaches {name}"
        numeric = torch.zeros_like(param)
        flat, numeric_flat = param.data.view(-1), numeric.view(-1)
        for i in range(flat.numel()):
            original = flat[i].item()
            flat[i] = original + eps
            plus = loss().item()
            flat[i] = original - eps
            minus = loss().item()
            flat[i] = original
            numeric_flat[i] = (plus - minus) / (2 * eps)
        torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8, msg=name)


# ----- model and loss -----


def test_nt_xent_matches_reference_loop() -> None:
    z1, z2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    temperature = 0.3
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        denominator = sum(math.exp(float(z[i] @ z[j]) / temperature) for j in others)
        total += -float(z[i] @ z[positive]) / temperature + math.log(denominator)
    expected = torch.tensor(total / (2 * n), dtype=torch.float64)
    torch.testing.assert_close(nt_xent(z1, z2, temperature), expected)


def test_nt_xent_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="both be"):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)


@pytest.mark.parametrize("width", [8, 64])
def test_small_resnet18_feature_shape(width: int) -> None:
    encoder = small_resnet18(in_channels=1, width=width)
    features = encoder(torch.rand(2, 1, 28, 28))
    assert features.shape == (2, 8 * width)
    assert encoder.feature_dim == 8 * width
    assert encoder.conv1.kernel_size == (3, 3)


# ----- hypersteps (need the metaopt core) -----


def _tiny_meta_setup() -> tuple:
    images = torch.rand(48, 1, 28, 28)
    labels = torch.arange(48) % 10
    splits = Splits(
        pt_images=images[:32],
        ft_train=(images[32:40], labels[32:40]),
        ft_val=(images[40:], labels[40:]),
        test=(images[40:], labels[40:]),
    )
    config = PretrainConfig(encoder_width=4, batch_size=8, ft_batch_size=8, hyper_lr=1e-2)
    model = SimCLRModel(CompactEncoder(width=4), projection_dim=8)
    warp = metaopt.mark_module(LearnedWarp(init_magnitude=0.1), name="warp")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta = build_meta_optimizer(config, model, optimizer, warp, splits, torch.device("cpu"))
    stream = ViewStream(splits.pt_images, 8, seed=0, fixed=FixedAugment(28),
                        device=torch.device("cpu"))
    return model, warp, meta, stream


def _buffers(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{index}.{name}": buffer.clone()
        for index, module in enumerate(modules)
        for name, buffer in module.named_buffers()
    }


def test_hyperstep_keeps_batchnorm_running_stats() -> None:
    model, warp, meta, stream = _tiny_meta_setup()
    meta.zero_grad()
    contrastive_loss(model, warp, stream, 0.5, through_warp=False)[0].backward()
    meta.step()
    before = _buffers(model, warp, meta.finetune.head)
    magnitude = warp.magnitude.item()

    record = meta.hyperstep(lambda: contrastive_loss(model, warp, stream, 0.5, True)[0])

    assert record.applied
    assert warp.magnitude.item() != magnitude
    after = _buffers(model, warp, meta.finetune.head)
    for name, value in before.items():
        assert torch.equal(after[name], value), f"hyperstep changed buffer {name}"


def test_plain_pt_forward_updates_running_stats() -> None:
    model, warp, _, stream = _tiny_meta_setup()
    before = _buffers(model, warp)
    with torch.no_grad():
        contrastive_loss(model, warp, stream, 0.5, through_warp=False)
    after = _buffers(model, warp)
    for name in ("0.encoder.net.1.running_mean", "1.strength_net.1.running_mean"):
        assert not torch.equal(after[name], before[name]), f"{name} did not change"


# ----- command line -----


def test_main_end_to_end_tiny(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = [
        "--dataset", "digits", "--ft-labels", "100", "--encoder-width", "4",
        "--projection-dim", "8", "--steps", "6", "--batch-size", "16", "--warmup-steps", "2",
        "--hyper-interval", "2", "--ft-batch-size", "16", "--probe-epochs", "5",
        "--finetune-epochs", "1", "--seeds", "0", "1", "--out", str(out), "--quiet",
        "--threads", "1",
    ]
    assert main(args) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["steps"] == 6
    assert len(results["seeds"]) == 2
    for name in ("test_metrics.png", "magnitude.png", "augmentations.png"):
        assert (out / name).stat().st_size > 0, name
    for arm in ("fixed", "meta"):
        for evaluation in ("linear", "finetune"):
            for metric in ("accuracy", "auroc"):
                mean = results["summary"][arm][evaluation][metric]["mean"]
                assert 0.0 <= mean <= 1.0, (arm, evaluation, metric, mean)
    for record in results["seeds"]:
        assert record["arms"]["fixed"]["final_magnitude"] == pytest.approx(0.1)
        assert record["arms"]["meta"]["final_magnitude"] != pytest.approx(0.1)
        assert len(record["arms"]["meta"]["history"]["hypersteps"]) == 2
    assert "mean ± std over 2 seed(s)" in capsys.readouterr().out
