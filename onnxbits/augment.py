"""Random resized crops and mixes of image batches for the fine-tune (``--augment crop|mix``).

Each image of an ``(N, C, H, W)`` batch is replaced by a crop covering a fraction
``s ~ U(scale)`` of its area with aspect ratio ``r = exp(U(log ratio))``: width ``W min(1,
sqrt(s r))``, height ``H min(1, sqrt(s / r))``, placed uniformly at random inside the image,
mirrored left-right with probability 1/2, and resampled bilinearly back to ``H x W``
(:func:`torch.nn.functional.grid_sample`, ``align_corners=False``, border padding). In the
normalized coordinates of :func:`torch.nn.functional.affine_grid` a crop is the map
``x_in = flip * w * x_out + cx``, ``y_in = h * y_out + cy`` with ``|cx| <= 1 - w`` and
``|cy| <= 1 - h`` (``w``, ``h`` the width and height fractions). Cropping a normalized batch
equals normalizing the cropped images: per-channel affine maps commute with bilinear resampling.

``mix`` (mixup of two crops, for distillation, as in "function matching", Beyer et al. 2022): each
image ``i`` of a batch gets a partner ``j_i`` drawn uniformly from all ``n`` fine-tune images and a
weight ``m_i ~ U(0, 1)``; the input is ``m_i crop(x_i) + (1 - m_i) crop'(x_{j_i})`` (two independent
crops), and the float model's output on that input is the teacher. Mixed images have no label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SCALE = (0.25, 1.0)
RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Crops:
    """One crop per image: width/height fractions, centres (in [-1, 1]) and mirror signs."""

    width: Tensor
    height: Tensor
    cx: Tensor
    cy: Tensor
    flip: Tensor     # -1.0 (mirrored) or 1.0

    def rows(self, index: Tensor | slice) -> Crops:
        """The crops of the images ``index`` selects (a process's share of a global batch)."""
        return Crops(self.width[index], self.height[index], self.cx[index], self.cy[index],
                     self.flip[index])

    def theta(self) -> Tensor:
        """The ``(N, 2, 3)`` affine matrices for :func:`torch.nn.functional.affine_grid`."""
        theta = torch.zeros(len(self.width), 2, 3)
        theta[:, 0, 0] = self.flip * self.width
        theta[:, 0, 2] = self.cx
        theta[:, 1, 1] = self.height
        theta[:, 1, 2] = self.cy
        return theta


def sample_crops(n: int, generator: torch.Generator,
                 scale: tuple[float, float] = SCALE,
                 ratio: tuple[float, float] = RATIO) -> Crops:
    """Draw ``n`` crops (on the CPU, from ``generator`` alone) as the module docstring states."""
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, 1])
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - width)
    cy = (2 * u[:, 3] - 1) * (1 - height)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0).double()
    return Crops(*(t.float() for t in (width, height, cx, cy, flip)))


def apply_crops(x: Tensor, crops: Crops) -> Tensor:
    """Resample each image of ``x`` (N, C, H, W) to its crop at the same size."""
    if x.dim() != 4:
        raise ValueError(f"random crops need (N, C, H, W) images, got shape {tuple(x.shape)}")
    theta = crops.theta().to(device=x.device, dtype=torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.to(x.dtype)


@dataclass(frozen=True)
class Mixes:
    """One mix per image: the partner's index among the fine-tune images and the image's weight."""

    partners: Tensor   # int64 indices in [0, n)
    weight: Tensor     # m in [0, 1), float32

    def rows(self, index: Tensor | slice) -> Mixes:
        """The mixes of the images ``index`` selects (a process's share of a global batch)."""
        return Mixes(self.partners[index], self.weight[index])


def sample_mixes(size: int, n_images: int, generator: torch.Generator) -> Mixes:
    """Draw ``size`` mixes over ``n_images`` fine-tune images (on the CPU, from ``generator``)."""
    partners = torch.randint(n_images, (size,), generator=generator)
    weight = torch.rand(size, generator=generator, dtype=torch.float64).float()
    return Mixes(partners, weight)


def apply_mix(x: Tensor, partner: Tensor, weight: Tensor) -> Tensor:
    """``m x + (1 - m) partner`` per image (``weight`` holds ``m``, one per image)."""
    if x.shape != partner.shape:
        raise ValueError(f"mixing needs images of one shape, got {tuple(x.shape)} and "
                         f"{tuple(partner.shape)}")
    m = weight.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return m * x + (1 - m) * partner


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step): a resumed run draws the same crops, and
    processes sharing a global batch draw the whole batch's crops and take their rows."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)
