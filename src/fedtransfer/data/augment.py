"""Seeded image augmentation for (pre-)training: random affine warps drawn from a generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class RandomAffine:
    """Rotate by up to ``degrees``, scale within ``scale``, shift by up to ``shift`` (fraction of
    the image), independently per image. The background (each image's minimum) is preserved.

    >>> import torch
    >>> from fedtransfer.seeding import generator
    >>> RandomAffine()(torch.zeros(2, 1, 28, 28), generator(0)).shape
    torch.Size([2, 1, 28, 28])
    """

    degrees: float = 12.0
    scale: tuple[float, float] = (0.85, 1.1)
    shift: float = 0.12

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        n = x.shape[0]
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(self.degrees)
        lo, hi = self.scale
        s = lo + torch.rand(n, generator=gen) * (hi - lo)
        t = (torch.rand(n, 2, generator=gen) * 2 - 1) * self.shift * 2
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.stack(
            [torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        background = x.amin(dim=(1, 2, 3), keepdim=True)
        warped = F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros")
        return warped + background
