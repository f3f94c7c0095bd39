"""A small MNIST digit classifier, trained on builtin:mnist's train split, to score conditional samples.

Class accuracy of a class-conditional prior = the share of its samples that this classifier assigns
to the digit that was asked for. The classifier sees the same [-1, 1] 3-channel 32x32 digits that
``builtin:mnist`` yields (converted to gray), is trained with small random shifts (samples are
rarely perfectly centred), and reports its held-out accuracy on the eval split so a reader can
judge the instrument. A trained classifier is cached as safetensors (``default_classifier_path``)
so that the demo does not retrain it each time.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from vqgpt.ground.checkpoint import check_file_place
from vqgpt.ground.files import replace_when_whole, umask

MNIST_SOURCE = "builtin:mnist"
INPUT_SIZE = 32
NUM_DIGITS = 10
DEFAULT_STEPS = 800
CACHE_FILE = "mnist_classifier.safetensors"
# bump when the architecture or the training recipe changes, so cached files are retrained
RECIPE_VERSION = "1"


class MnistClassifier(nn.Module):
    """Two conv blocks + MLP: images (B, 3 or 1, H, W) in [-1, 1] -> digit logits (B, 10)."""

    def __init__(self, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3),
            nn.Linear(2 * width * (INPUT_SIZE // 4) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, NUM_DIGITS),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_gray32(images)           # (B, 1, 32, 32)
        x = self.features(x)            # (B, 2w, 8, 8)
        return self.classifier(x)       # (B, 10)


def to_gray32(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> gray (B, 1, 32, 32); other sizes are resized (antialiased)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float().mean(dim=1, keepdim=True)  # samples may tint the channels apart: average them
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


class TrainedClassifier(NamedTuple):
    model: MnistClassifier
    heldout_accuracy: float  # on builtin:mnist's eval split (500 digits)


def _mnist_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """builtin:mnist images (N, 1, 32, 32) in [-1, 1] and labels (N,) of one split."""
    from vqgpt.ground.data import DataConfig, build_dataset

    dataset = build_dataset(DataConfig(source=MNIST_SOURCE, resolution=INPUT_SIZE, random_crop=False, hflip=False), split)
    images = torch.stack([dataset[i][0][:1] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))], dtype=torch.long)
    return images, labels


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each (1, H, W) image by up to ``max_shift`` pixels, filling with background (-1)."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)                    # (B, 1, H + 2m, W + 2m)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)
    rows = dy[:, None] + torch.arange(h)                                      # (B, H)
    cols = dx[:, None] + torch.arange(w)                                      # (B, W)
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train_mnist_classifier(steps: int = DEFAULT_STEPS, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                           progress: bool = False) -> TrainedClassifier:
    """Train on builtin:mnist train (4,500 digits), report accuracy on eval (500); ~98% at 800 steps, seconds on a CPU."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    train_x, train_y = _mnist_split("train")
    eval_x, eval_y = _mnist_split("eval")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seed init and dropout without touching the caller's RNG
        torch.manual_seed(seed)
        model = MnistClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
        model.train()
        for _ in tqdm(range(steps), desc="mnist classifier", disable=not progress):
            rows = torch.randint(0, len(train_y), (batch_size,), generator=generator)
            loss = F.cross_entropy(model(_random_shift(train_x[rows], 2, generator)), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return TrainedClassifier(model, class_accuracy(model, eval_x, eval_y))


@torch.inference_mode()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted digit of each image (B, C, H, W) in [-1, 1], shape (B,)."""
    classifier.eval()
    device = next(classifier.parameters()).device
    return torch.cat([classifier(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(batch_size)])


def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor | list[int]) -> float:
    """Share of images (B, C, H, W) that ``classifier`` assigns to their label (B,)."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
    if labels.numel() != images.shape[0]:
        raise ValueError(f"got {labels.numel()} labels for {images.shape[0]} images")
    if labels.numel() == 0:
        raise ValueError("class_accuracy of an empty set of images")
    return float((predict(classifier, images) == labels).double().mean())


# ----------------------------------------------------------------------------------------- caching


def default_classifier_path() -> Path:
    """$VQGPT_CACHE, else $XDG_CACHE_HOME/vqgpt, else ~/.cache/vqgpt; the file is mnist_classifier.safetensors."""
    root = os.environ.get("VQGPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vqgpt"
    return Path(root) / CACHE_FILE


def save_classifier(path: str | Path, trained: TrainedClassifier, steps: int, seed: int) -> Path:
    """Write the weights as safetensors, with held-out accuracy and recipe in the metadata (atomic rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in trained.model.state_dict().items()}
    meta = {"kind": "mnist_classifier", "recipe": RECIPE_VERSION, "steps": str(steps), "seed": str(seed),
            "heldout_accuracy": repr(float(trained.heldout_accuracy))}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~umask())  # (safetensors writes 0600: a group-shared cache's file stays readable)

    return replace_when_whole(path, write, tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"))


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_classifier(path: str | Path) -> TrainedClassifier:
    """Load a classifier written by ``save_classifier`` (strict); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file not found: {path}")
    try:
        meta = _read_metadata(path)
        state = load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if meta.get("kind") != "mnist_classifier":
        raise ValueError(f"{path}: not an MNIST classifier file (metadata kind={meta.get('kind')!r})")
    model = MnistClassifier()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit MnistClassifier: {exc}") from exc
    return TrainedClassifier(model.eval(), float(meta.get("heldout_accuracy", "nan")))


def load_or_train_mnist_classifier(path: str | Path | None = None, steps: int = DEFAULT_STEPS, seed: int = 0,
                                   progress: bool = False) -> TrainedClassifier:
    """The classifier at ``path`` if steps/seed/recipe match; else train one and write it there.

    ``path`` None: the cache ``default_classifier_path()``, replaced when unreadable or stale. A
    ``path`` the caller names (``--classifier``) is only ever replaced by a classifier: a file there
    that is not one (notes, another model's weights) is an error, not overwritten.
    """
    named = path is not None
    path = Path(path) if named else default_classifier_path()
    if named and path.exists():
        _check_named_classifier(path)
    elif named:  # before training: a path under a file trained for half a minute, then said "File exists"
        check_file_place(path, "classifier ", what="classifier")
    if path.is_file():
        try:
            meta = _read_metadata(path)
        except Exception:
            meta = {}  # unreadable cache: retrain and overwrite
        if (meta.get("recipe"), meta.get("steps"), meta.get("seed")) == (RECIPE_VERSION, str(steps), str(seed)):
            try:
                return load_classifier(path)
            except ValueError:
                if named:
                    raise
                # a damaged cache: retrain and overwrite
    trained = train_mnist_classifier(steps=steps, seed=seed, progress=progress)
    try:
        save_classifier(path, trained, steps, seed)
    except OSError as exc:
        if named:
            raise
        # a read-only or full cache: the classifier is trained, only the next run trains it again
        warnings.warn(f"could not cache the digit classifier ({exc}); using it without caching (set VQGPT_CACHE "
                      "to a writable folder to keep it)", stacklevel=2)
    return trained


def _check_named_classifier(path: Path) -> None:
    """Refuse a named, existing ``path`` that is not a classifier file (which training would overwrite)."""
    how = (f"give a path that does not exist yet to train one there, or leave --classifier out to use the cache "
           f"({default_classifier_path()})")
    if not path.is_file():
        raise ValueError(f"--classifier {path} is not a file: {how}")
    try:
        kind = _read_metadata(path).get("kind")
    except Exception as exc:
        raise ValueError(f"--classifier {path} is not a readable classifier file ({type(exc).__name__}), and is "
                         f"left as it is: {how}") from None
    if kind != "mnist_classifier":
        raise ValueError(f"--classifier {path} holds no MNIST classifier (metadata kind={kind!r}), and is left as "
                         f"it is: {how}")
