"""Batches of Shapes scenes as tensors, for training and evaluation."""

from __future__ import annotations

import numpy as np
import torch

from .data import render_scene, sample_spec, scene_seed

__all__ = ["SceneStream", "images_to_tensor"]


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor (B, 3, H, W) in [-1, 1]."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


class SceneStream:
    """An endless, deterministic stream of random scenes from one split.

    Example:
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
