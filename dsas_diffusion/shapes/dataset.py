"""Batches of Shapes scenes as tensors, for training and evaluation."""

from __future__ import annotations

import numpy as np
import torch

from .data import render_scene, sample_spec, scene_seed
from .detect import _PALETTE  # the judge's palette: object colours, then backgrounds

__all__ = ["SceneStream", "distort", "images_to_tensor"]


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


class SceneStream:
    """An endless, deterministic stream of random scenes from one split.

    Examples:
        >>> images, captions = SceneStream(seed=0).next_batch(4)
        >>> tuple(images.shape), len(captions)
        ((4, 3, 64, 64), 4)
    """

    def __init__(self, split: str = "train", seed: int = 0, two_object_fraction: float = 0.5) -> None:
        self.split = split
        self.index = seed * 10_000_000
        self.two_object_fraction = two_object_fraction
        self.rng = np.random.default_rng(seed)

    def next_batch(self, size: int) -> tuple[torch.Tensor, list[str]]:
        scenes = []
        for _ in range(size):
            count = 2 if self.rng.random() < self.two_object_fraction else 1
            scenes.append(render_scene(sample_spec(scene_seed(self.index, self.split), count)))
            self.index += 1
        return images_to_tensor([s.image for s in scenes]), [s.caption for s in scenes]


def distort(images: torch.Tensor, generator: torch.Generator, fraction: float = 0.5) -> torch.Tensor:
    """Imperfect drawings of the same scenes, for training a judge that reads generated images.

    A random ``fraction`` of the batch (B, 3, H, W, in [-1, 1]) is warped by a small random
    affine map plus a smooth random displacement field (outlines a pixel or two off,
    corners and points softened or bent, as a denoiser draws them); half of those are then
    flattened back to each image's own palette colours (as ``isolate_colour`` shows an object
    to the judge), the other half are blurred (0.3-1 pixel) and get faint pixel noise. The rest
    stay as drawn.

    Examples:
        >>> images, _ = SceneStream(seed=0).next_batch(4)
        >>> distort(images, torch.Generator().manual_seed(0), fraction=1.0).shape
        torch.Size([4, 3, 64, 64])
    """
    import torch.nn.functional as F

    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: give the share of the batch to distort, between 0 and 1")
    count, _, height, width = images.shape
    chosen = torch.rand(count, generator=generator) < fraction
    if not chosen.any():
        return images
    picked = images[chosen]
    n = picked.shape[0]
    theta = torch.eye(2, 3).repeat(n, 1, 1)
    theta[:, :, :2] += 0.07 * torch.randn(n, 2, 2, generator=generator)  # shear / stretch / turn
    theta[:, :, 2] += 0.03 * torch.randn(n, 2, generator=generator)  # about a pixel of shift
    grid = F.affine_grid(theta, [n, 3, height, width], align_corners=False)
    field = 0.025 * torch.randn(n, 2, 5, 5, generator=generator)  # smooth; 0.025 of the half-width is 0.8 px
    grid = grid + F.interpolate(field, size=(height, width), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    warped = F.grid_sample(picked, grid, mode="bilinear", padding_mode="border", align_corners=False)
    sigma = 0.3 + 0.7 * torch.rand(n, generator=generator)  # a Gaussian blur of 0.3-1 pixel, as decoders draw edges
    noise = 0.03 * torch.randn(warped.shape, generator=generator)
    flatten = torch.rand(n, generator=generator) < 0.5
    redrawn = torch.empty_like(warped)
    # flattened: each pixel to the nearest palette colour the image had before
    palette = torch.from_numpy(_PALETTE) / 127.5 - 1.0
    flat_in, flat_out = picked[flatten], warped[flatten]
    own = ((flat_in.permute(0, 2, 3, 1)[..., None, :] - palette) ** 2).sum(-1).argmin(-1)  # palette index per pixel
    present = torch.zeros(len(flat_in), len(palette), dtype=torch.bool)
    present.scatter_(1, own.flatten(1), True)
    distances = ((flat_out.permute(0, 2, 3, 1)[..., None, :] - palette) ** 2).sum(-1)  # (f, H, W, P)
    distances = distances.masked_fill(~present[:, None, None, :], float("inf"))
    redrawn[flatten] = palette[distances.argmin(-1)].permute(0, 3, 1, 2)
    # soft: a 5-tap Gaussian blur per image, then the noise
    soft = ~flatten
    m = int(soft.sum())
    if m:
        taps = torch.arange(-2, 3, dtype=torch.float32)
        kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[soft, None] ** 2))
        kernel = kernel / kernel.sum(1, keepdim=True)
        kernel2d = (kernel[:, :, None] * kernel[:, None, :]).repeat_interleave(3, 0)[:, None]  # (3m, 1, 5, 5)
        padded = F.pad(warped[soft].reshape(1, 3 * m, height, width), (2, 2, 2, 2), mode="replicate")
        blurred = F.conv2d(padded, kernel2d, groups=3 * m).reshape(m, 3, height, width)
        redrawn[soft] = (blurred + noise[soft]).clamp(-1, 1)
    out = images.clone()
    out[chosen] = redrawn
    return out
