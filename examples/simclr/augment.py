"""Fixed SimCLR augmentations and the learned smooth-warp augmentation.

Coordinates follow ``torch.nn.functional.grid_sample`` with ``align_corners=False``:
the image spans [-1, 1] on each axis, so a displacement of ``2 / W`` is one pixel.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

__all__ = [
    "FixedAugment",
    "LearnedWarp",
    "smooth_warp",
]

logger = logging.getLogger(__name__)

# align_corners for affine_grid, interpolate and grid_sample alike, so that the
# identity grid samples each pixel centre.
ALIGN_CORNERS = False


class FixedAugment:
    """Fixed SimCLR augmentation: random resized crop, small affine, Gaussian noise.

    Each image gets its own crop and affine draw. Calling the object with a seed
    reseeds torch's global CPU generator, which torchvision's transforms read,
    inside ``torch.random.fork_rng``. The output then depends only on the images
    and the seed, and the caller's random state is untouched.

    Args:
        image_size: output height and width in pixels.
        crop_scale: range of the crop's area as a fraction of the image area.
        degrees: maximum rotation in degrees, either direction.
        translate: maximum shift as a fraction of the image size.
        noise_std: standard deviation of the additive noise, for pixels in [0, 1].
    """

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.7, 1.0),
        degrees: float = 10.0,
        translate: float = 0.1,
        noise_std: float = 0.05,
    ) -> None:
        self.geometric = v2.Compose(
            [
                v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True),
                v2.RandomAffine(
                    degrees=degrees,
                    translate=(translate, translate),
                    interpolation=v2.InterpolationMode.BILINEAR,
                ),
            ]
        )
        # The noise is drawn per pixel, so one call on the whole batch is per-image.
        self.noise = v2.GaussianNoise(sigma=noise_std, clip=True)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """Augment CPU images ``[N, C, H, W]`` with values in [0, 1]; same shape out."""
        threads = torch.get_num_threads()
        # Per-image ops on a 28x28 image gain nothing from intra-op threads. With 2
        # threads on a 2-core machine shared with other jobs, this loop took up to
        # 3 s for 128 images, against 0.05 s with 1 thread (torch 2.14, CPU).
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                geometric = torch.stack([self.geometric(image) for image in images])
                return self.noise(geometric)
        finally:
            torch.set_num_threads(threads)


def smooth_warp(
    images: torch.Tensor,
    amplitudes: torch.Tensor,
    generator: torch.Generator,
    grid_size: int = 4,
) -> torch.Tensor:
    """Warp each image by a smooth random displacement field scaled by its amplitude.

    The field is standard normal noise on a ``grid_size x grid_size`` lattice per
    axis, upsampled bicubically to the image size. Pixels sampled from outside
    the image read as zero.

    Args:
        images: ``[N, C, H, W]``.
        amplitudes: ``[N]``, displacement standard deviation in normalised units
            (2 units span the image). Gradients flow back to it.
        generator: source of the noise; it may live on another device than ``images``.
        grid_size: control points per axis; fewer points give a smoother warp.

    Returns:
        ``[N, C, H, W]``, exactly ``images`` where the amplitude is zero.
    """
    n, _, height, width = images.shape
    if amplitudes.shape != (n,):
        raise ValueError(f"amplitudes must have shape ({n},), got {tuple(amplitudes.shape)}")
    noise = torch.randn(
        (n, 2, grid_size, grid_size),
        generator=generator,
        device=generator.device,
        dtype=images.dtype,
    ).to(images.device)
    field = F.interpolate(
        noise, size=(height, width), mode="bicubic", align_corners=ALIGN_CORNERS
    )
    displacement = field.permute(0, 2, 3, 1) * amplitudes.view(n, 1, 1, 1)
    eye = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(n, 2, 3)
    identity = F.affine_grid(eye, list(images.shape), align_corners=ALIGN_CORNERS)
    warped = _sample(images, identity + displacement)
    # Bilinear resampling on the identity grid is off by up to ~2e-6 in float32
    # because pixel centres are not exact in normalised coordinates. Subtracting
    # that resampling makes a zero displacement return the input bit for bit.
    return images + (warped - _sample(images, identity))


def _sample(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=ALIGN_CORNERS
    )


class LearnedWarp(nn.Module):
    """Smooth random warp whose strength a small conv net predicts for each image.

    The amplitude of image ``i`` is ``magnitude * 2 * sigmoid(net(x_i))``, where
    ``magnitude`` is a learned scalar parameter (normalised units, see
    ``smooth_warp``) and the factor ``2 * sigmoid`` lies in (0, 2). All parameters
    are differentiable through ``forward``, so the whole module can serve as a
    meta-parameter. The sign of ``magnitude`` does not matter in distribution,
    because the noise field is symmetric.
    """

    def __init__(
        self,
        init_magnitude: float = 0.1,
        grid_size: int = 4,
        in_channels: int = 1,
        hidden_channels: int = 8,
    ) -> None:
        super().__init__()
        if grid_size < 2:
            raise ValueError(f"grid_size must be at least 2, got {grid_size}")
        self.grid_size = grid_size
        # Convolutions before BatchNorm carry no bias, because BatchNorm would cancel
        # it and leave a parameter with zero gradient.
        self.strength_net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(),
            nn.Conv2d(hidden_channels, 2 * hidden_channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * hidden_channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * hidden_channels, 1),
        )
        self.magnitude = nn.Parameter(torch.tensor(float(init_magnitude)))

    def amplitudes(self, images: torch.Tensor) -> torch.Tensor:
        """Return the warp amplitude of each image, ``[N]``, normalised units."""
        strength = 2.0 * torch.sigmoid(self.strength_net(images).squeeze(1))
        return self.magnitude * strength

    def warp_with_amplitudes(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp ``[N, C, H, W]`` images and return them with the amplitudes ``[N]`` used."""
        amplitudes = self.amplitudes(images)
        return smooth_warp(images, amplitudes, generator, self.grid_size), amplitudes

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Warp ``[N, C, H, W]`` images with noise drawn from ``generator``."""
        return self.warp_with_amplitudes(images, generator)[0]
