"""``shapes-clip``: an open_clip model trained contrastively on Shapes scenes and captions,
the judge of the Shapes world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..dataset import SceneStream
from ..models import CLIP_MODEL_CONFIG
from .common import cosine_lr, training_device

__all__ = ["train_clip"]


def train_clip(
    out: Path, steps: int = 2000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, distorted: float = 0.5
) -> Path:
    """Contrastive training on Shapes scenes and their captions; a ``distorted`` fraction of each
    batch is drawn imperfectly (``dataset.distort``) so that the judge also reads generated images."""
    import open_clip

    from ..clip import CLIP_PREPROCESS, register_shapes_clip
    from ..dataset import distort

    torch.manual_seed(seed)
    device = training_device()
    register_shapes_clip()
    model = open_clip.create_model("shapes-clip").to(device).train()
    tokenizer = open_clip.get_tokenizer("shapes-clip")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    scheduler = cosine_lr(optimizer, steps)
    stream = SceneStream(seed=seed + 5)
    generator = torch.Generator().manual_seed(seed + 6)
    bar = tqdm(range(steps), desc="shapes-clip")
    for _ in bar:
        images, captions = stream.next_batch(batch_size)
        images = distort(images, generator, fraction=distorted)
        # open_clip's preprocessing (CLIP_PREPROCESS: 64 px, mean = std = 0.5) maps [0, 1] pixels to
        # the [-1, 1] range our images are already in
        image_features = model.encode_image(images.to(device), normalize=True)
        text_features = model.encode_text(tokenizer(captions).to(device), normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        # captions repeat within a batch: count every identical caption as a positive
        same = torch.tensor([[a == b for b in captions] for a in captions], device=device, dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    target = out / "shapes-clip"
    target.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(target / "open_clip_model.safetensors"))
    config = {"model_cfg": CLIP_MODEL_CONFIG, "preprocess_cfg": CLIP_PREPROCESS}
    (target / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"shapes-clip -> {target}")
    return target
