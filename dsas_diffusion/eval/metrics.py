"""CLIP metrics for steered images: CLIP score, zero-shot concept presence, image similarity.

Any open_clip model works (``ClipScorer("ViT-B-32", pretrained="openai")`` where the user
has its weights); ``ClipScorer("shapes-clip")`` loads the shipped Shapes model offline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_CONCEPT_TEMPLATE",
    "DEFAULT_NEUTRAL_CAPTION",
    "ClipScorer",
    "default_clip_for",
    "dilate",
    "pixel_change",
    "pixel_change_by_region",
]

DEFAULT_CONCEPT_TEMPLATE = "a picture of a {concept}"
DEFAULT_NEUTRAL_CAPTION = "a picture of something"


def pixel_change(image: Image.Image, reference: Image.Image) -> float:
    """Mean absolute difference of two images' RGB values, on the 0-255 scale.

    Examples:
        >>> pixel_change(Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (30, 0, 0)))
        10.0
    """
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    b = np.asarray(reference.convert("RGB"), dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"images of sizes {a.shape[:2]} and {b.shape[:2]} cannot be compared pixel by pixel")
    return float(np.abs(a - b).mean())


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels in every direction (a square structuring element).

    Examples:
        >>> mask = np.zeros((5, 5), dtype=bool); mask[2, 2] = True
        >>> int(dilate(mask, 1).sum())
        9
    """
    if radius <= 0:
        return mask.copy()
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.max_pool2d(tensor, 2 * radius + 1, stride=1, padding=radius)[0, 0].numpy() > 0


def pixel_change_by_region(image: Image.Image, reference: Image.Image, mask: np.ndarray) -> tuple[float, float]:
    """``(inside, outside)``: the mean absolute RGB difference (0-255) of two images over the
    pixels of ``mask`` and over the rest (NaN for an empty region).

    Examples:
        >>> mask = np.zeros((4, 4), dtype=bool); mask[:2] = True
        >>> pixel_change_by_region(Image.new("RGB", (4, 4), (30, 30, 30)), Image.new("RGB", (4, 4)), mask)
        (30.0, 30.0)
    """
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    b = np.asarray(reference.convert("RGB"), dtype=np.float32)
    if a.shape[:2] != mask.shape or b.shape != a.shape:
        raise ValueError(f"images of sizes {a.shape[:2]} and {b.shape[:2]} and a mask of {mask.shape} do not match")
    difference = np.abs(a - b).mean(-1)
    inside = float(difference[mask].mean()) if mask.any() else float("nan")
    outside = float(difference[~mask].mean()) if (~mask).any() else float("nan")
    return inside, outside


def default_clip_for(model: str) -> tuple[str, str | None]:
    """The ``(open_clip model, pretrained tag)`` used to score images of ``model`` by default:
    ``shapes-clip`` for the Shapes models, OpenAI's ViT-B/32 otherwise."""
    from ..shapes import is_shapes_world

    return ("shapes-clip", None) if is_shapes_world(model) else ("ViT-B-32", "openai")


class ClipScorer:
    """Scores images with an open_clip model.

    Args:
        model_name: an open_clip model name (``"ViT-B-32"``), an open_clip ``local-dir:`` /
            ``hf-hub:`` identifier, or ``"shapes-clip"``.
        pretrained: the open_clip pretrained tag or checkpoint file (ignored for shapes-clip).
        device: where the model runs.
        batch_size: images encoded per forward pass.

    Examples:
        >>> from dsas_diffusion.shapes.data import parse_caption, render_scene
        >>> scorer = ClipScorer("shapes-clip")
        >>> image = render_scene(parse_caption("a red star on a white background")).image
        >>> own, wrong = scorer.clip_score([image, image], ["a red star on a white background",
        ...                                                  "a blue square on a black background"])
        >>> bool(own > wrong)
        True
    """

    def __init__(
        self,
        model_name: str = "shapes-clip",
        pretrained: str | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        import open_clip

        self.model_name, self.pretrained, self.device, self.batch_size = model_name, pretrained, device, batch_size
        if model_name == "shapes-clip":
            from ..shapes import load_shapes_clip

            model, preprocess, tokenizer = load_shapes_clip(device)
        else:
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained, device=device
                )
            except RuntimeError as error:
                raise RuntimeError(
                    f"open_clip could not build {model_name!r} with pretrained={pretrained!r}: {error}. "
                    "Offline, pass a local checkpoint file as pretrained, or use 'shapes-clip'."
                ) from error
            tokenizer = open_clip.get_tokenizer(model_name)
            model = model.eval()
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def identity(self) -> str:
        """A string naming the scoring model, for result files and caches."""
        return self.model_name if self.pretrained is None else f"{self.model_name}:{self.pretrained}"

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Unit-norm image embeddings, ``(N, D)`` float32 on the CPU."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack(
                [self.preprocess(image.convert("RGB")) for image in images[start : start + self.batch_size]]
            )
            chunks.append(self.model.encode_image(batch.to(self.device), normalize=True).float().cpu())
        if not chunks:
            return torch.empty(0, 0)
        return torch.cat(chunks)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings, ``(N, D)`` float32 on the CPU (cached per text)."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._text_cache]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            features = self.model.encode_text(tokens, normalize=True).float().cpu()
            self._text_cache.update(zip(missing, features, strict=True))
        if not texts:
            return torch.empty(0, 0)
        return torch.stack([self._text_cache[text] for text in texts])

    def clip_score(
        self, images: Sequence[Image.Image], prompts: Sequence[str], image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CLIPScore of each image against its own prompt: ``100 * max(cos, 0)``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        features = self.image_features(images) if image_features is None else image_features
        return 100.0 * (features * self.text_features(prompts)).sum(-1).clamp_min(0.0)

    def concept_presence(
        self,
        images: Sequence[Image.Image],
        concept: str,
        *,
        template: str = DEFAULT_CONCEPT_TEMPLATE,
        neutral: str = DEFAULT_NEUTRAL_CAPTION,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Zero-shot probability that the concept is shown: the softmax (at CLIP's learned
        temperature) of ``template.format(concept=...)`` against the ``neutral`` caption."""
        features = self.image_features(images) if image_features is None else image_features
        texts = self.text_features([template.format(concept=concept), neutral])
        scale = self.model.logit_scale.detach().exp().float().cpu() if hasattr(self.model, "logit_scale") else 100.0
        logits = scale * features @ texts.T
        return logits.softmax(-1)[:, 0]

    def image_similarity(
        self,
        images: Sequence[Image.Image] | torch.Tensor,
        references: Sequence[Image.Image] | torch.Tensor,
    ) -> torch.Tensor:
        """Cosine similarity of each image's embedding to its reference's (e.g. the
        unsteered image of the same prompt and seed); images or precomputed features."""
        a = images if isinstance(images, torch.Tensor) else self.image_features(images)
        b = references if isinstance(references, torch.Tensor) else self.image_features(references)
        if a.shape != b.shape:
            raise ValueError(f"{a.shape[0]} images but {b.shape[0]} references: give one reference per image")
        return (a * b).sum(-1)
