"""What every Shapes training recipe shares: device, schedules, EMA, the optimiser, the
latent bank, the tokenizer, chained training stages and tidying saved pipelines."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..dataset import SceneStream
from ..models import TOKENIZER_MAX_LENGTH

__all__ = [
    "DEFAULT_WORK_DIR",
    "EMA",
    "LatentBank",
    "Optimisation",
    "cosine_lr",
    "shapes_tokenizer",
    "tidy_saved_pipeline",
    "train_stages",
    "training_device",
]

DEFAULT_WORK_DIR = Path("build") / "shapes"


def training_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cosine_lr(optimizer, steps: int, warmup: int = 50):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of parameters with warm-up: decay = min(max_decay, (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, max_decay: float = 0.999) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.max_decay = max_decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.max_decay, (1 + self.updates) / (10 + self.updates))
        for shadow, live in zip(self.shadow.parameters(), module.parameters(), strict=True):
            shadow.lerp_(live.detach(), 1 - decay)


def shapes_tokenizer(work_dir: Path):
    """The CLIP tokenizer of the Shapes models, written to ``work_dir/tokenizer``."""
    from ..tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(work_dir / "tokenizer", model_max_length=TOKENIZER_MAX_LENGTH)


class LatentBank:
    """Scenes rendered and encoded once, then drawn at random for denoiser training.

    Encoding a batch costs about a fifth of a denoiser step on the CPU; a bank of 64k scenes
    (posterior means and standard deviations: 8 KB per scene at float32, 512 MB for 64k) is read four times or so
    by a 4000-step run and saves most of that.
    """

    def __init__(self, vae, count: int, seed: int, device: torch.device, chunk: int = 256) -> None:
        stream = SceneStream(seed=seed)
        means, stds, self.captions = [], [], []
        with torch.no_grad():
            for start in tqdm(range(0, count, chunk), desc="encoding scenes"):
                images, captions = stream.next_batch(min(chunk, count - start))
                posterior = vae.encode(images.to(device)).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
                self.captions += captions
        self.means, self.stds = torch.cat(means), torch.cat(stds)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, size: int) -> tuple[torch.Tensor, list[str]]:
        """Latents drawn from their posteriors, and their captions."""
        index = torch.randint(0, len(self), (size,), generator=self.generator)
        means, stds = self.means[index], self.stds[index]
        noise = torch.randn(means.shape, generator=self.generator).to(means.device)
        return means + stds * noise, [self.captions[i] for i in index.tolist()]


class Optimisation:
    """AdamW with warm-up + cosine decay, gradient clipping and an EMA of every trained module."""

    def __init__(self, modules: list[torch.nn.Module], lr: float, steps: int) -> None:
        self.modules = modules
        self.params = [p for module in modules for p in module.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scheduler = cosine_lr(self.optimizer, steps)
        self.emas = [EMA(module) for module in modules]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        for ema, module in zip(self.emas, self.modules, strict=True):
            ema.update(module)

    def averaged(self) -> list[torch.nn.Module]:
        return [ema.shadow for ema in self.emas]


def train_stages(
    trainer: Callable[..., Path],
    stages: tuple[dict, ...],
    name: str,
    work_dir: Path,
    out: Path,
    seed: int = 0,
    steps: int | None = None,
) -> Path:
    """A shipped checkpoint trained as ``stages`` in turn, each ``trainer`` call starting from
    the previous stage's saved pipeline; the last writes ``out/name``.

    A stage whose checkpoint is already in ``work_dir`` (``{name}-stage1``, ...) is not trained
    again. ``steps`` overrides the last stage's length (for quick trials).
    """
    init_from = None
    for number, stage in enumerate(stages, start=1):
        last = number == len(stages)
        target = out if last else work_dir
        stage_name = name if last else f"{name}-stage{number}"
        if not last and (work_dir / stage_name / "model_index.json").is_file():
            print(f"{name} stage {number}: reusing {work_dir / stage_name}")
        else:
            trainer(
                work_dir,
                target,
                steps=steps if (last and steps is not None) else stage["steps"],
                lr=stage["lr"],
                seed=seed,
                bank_seed=seed + stage["bank_seed"],
                init_from=init_from,
                name=stage_name,
            )
        init_from = target / stage_name
    return out / name


def tidy_saved_pipeline(pipeline_dir: Path) -> None:
    """Slim the tokenizer folders and drop what says where this run loaded things from
    (``_name_or_path`` of a continued stage's models, the offline flag of the tokenizers)."""
    from ..tokenizer import slim_tokenizer_folder

    for folder in pipeline_dir.glob("tokenizer*"):
        slim_tokenizer_folder(folder)
    for config in pipeline_dir.glob("*/*config.json"):
        data = json.loads(config.read_text())
        if {"_name_or_path", "local_files_only"} & data.keys():
            data.pop("_name_or_path", None)
            data.pop("local_files_only", None)
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
