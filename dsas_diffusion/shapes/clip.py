"""``shapes-clip``: an open_clip model trained on Shapes captions, loaded through open_clip's API."""

from __future__ import annotations

from pathlib import Path

__all__ = ["CLIP_PREPROCESS", "load_shapes_clip", "register_shapes_clip", "shapes_clip_dir"]

CLIP_PREPROCESS = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
_CONFIG_DIR = Path(__file__).resolve().parent / "open_clip_configs"


def shapes_clip_dir() -> Path:
    from .hub import resolve_model_path

    return resolve_model_path("shapes-clip")


def register_shapes_clip() -> None:
    """Make ``open_clip.create_model("shapes-clip")`` / ``get_tokenizer("shapes-clip")`` work."""
    import open_clip

    if "shapes-clip" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR / "shapes-clip.json")


def load_shapes_clip(device: str = "cpu", path: str | Path | None = None):
    """``(model, preprocess, tokenizer)`` of the shipped ``shapes-clip`` (or of the folder
    ``path``, e.g. one written by ``python -m dsas_diffusion.shapes.train clip --out DIR``), via
    open_clip's ``local-dir:`` loading (the same call works for any open_clip model folder).

    Examples:
        >>> model, preprocess, tokenizer = load_shapes_clip()
        >>> tokenizer(["a red circle on a white background"]).shape
        torch.Size([1, 24])
    """
    import open_clip

    identifier = f"local-dir:{path if path is not None else shapes_clip_dir()}"
    model, _, preprocess = open_clip.create_model_and_transforms(identifier, device=device)
    return model.float().eval(), preprocess, open_clip.get_tokenizer(identifier)
