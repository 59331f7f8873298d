"""A small CNN trained on the embedded digits, used to score generated digits.

Three figures per set of images: the share classified with confidence above a threshold (do the samples look like
some digit?), the entropy of the predicted-class histogram (log 10 when all ten digits are equally frequent), and
the Frechet distance to held-out real digits in the classifier's penultimate feature space (FID's formula, Heusel et
al. 2017, with this classifier in place of Inception; computed by torchmetrics).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from ddpm_lightning import io
from ddpm_lightning.data.digits import EmbeddedDigitsDataModule

__all__ = [
    "DigitClassifier",
    "DigitScorer",
    "class_entropy",
    "frechet_distance",
    "load_or_train_digit_classifier",
    "reference_statistics",
    "requested_class_accuracy",
    "score_digits",
    "train_digit_classifier",
]

# bump when the architecture or the training recipe changes, so that cached weights are not reused
RECIPE_VERSION = 1


class DigitClassifier(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 pixels) and a ``feature_dim`` hidden layer; images (B, 1, 32, 32) in
    [-1, 1]."""

    def __init__(self, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.conv = nn.Sequential(block(1, 16), block(16, 32), block(32, 64))
        self.hidden = nn.Linear(64 * 4 * 4, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim): the space of the Frechet distance."""
        return F.relu(self.hidden(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))  # logits (B, num_classes)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small random rotations (+-10 degrees), scalings (0.9-1.1) and shifts (+-2 px), so that the classifier judges
    shapes rather than exact pixel positions."""
    B = x.shape[0]
    angle = (torch.rand(B, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(B, generator=generator)
    shift = (torch.rand(B, 2, generator=generator) * 2 - 1) * (2 / x.shape[-1] * 2)  # in [-1, 1] grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def train_digit_classifier(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[DigitClassifier, float]:
    """Train on ``train`` = (images, labels) with augmentation; returns the model (eval mode) and its accuracy on
    ``val``. Seeded, and the global RNG is left untouched. ``progress``: a bar of the optimizer steps."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    images, labels = train
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        steps = epochs * (len(labels) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        model.train()
        bar = tqdm(total=steps, desc="training the digit classifier (once; cached)", unit="step", leave=False,
                   disable=not progress)  # fmt: skip
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for i in range(len(labels) // batch_size):
                index = order[i * batch_size : (i + 1) * batch_size]
                loss = F.cross_entropy(model(_augment(images[index], generator)), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
        bar.close()
    accuracy = (_predict(model, val[0]).argmax(1) == val[1]).float().mean().item()
    return model.eval(), accuracy


def load_or_train_digit_classifier(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    cache_dir: str | Path | None = None,
    epochs: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> tuple[DigitClassifier, float, Path]:
    """The classifier of :func:`train_digit_classifier`, trained once and then loaded from
    ``cache_dir/digit_classifier-<hash>.pt`` (default: :func:`ddpm_lightning.io.cache_dir`); the hash covers the
    data, the recipe and the seed.

    Returns the model (eval mode), its validation accuracy and the cache file.
    """
    digest = hashlib.sha256(json.dumps({"recipe": RECIPE_VERSION, "epochs": epochs, "seed": seed}).encode())
    for tensor in (*train, *val):
        digest.update(tensor.contiguous().numpy().tobytes())
    folder = Path(cache_dir) if cache_dir is not None else io.cache_dir()
    path = folder / f"digit_classifier-{digest.hexdigest()[:16]}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        model = DigitClassifier()
        model.load_state_dict(stored["state_dict"])
        return model.eval(), float(stored["val_accuracy"]), path
    model, accuracy = train_digit_classifier(train, val, epochs=epochs, seed=seed, progress=progress)
    # atomic: a concurrent or interrupted run never sees half a file
    io.atomic_write(path, lambda tmp: torch.save({"state_dict": model.state_dict(), "val_accuracy": accuracy}, tmp))
    return model, accuracy, path


def class_entropy(predicted: torch.Tensor, num_classes: int = 10) -> float:
    """Entropy (nats) of the histogram of predicted classes: log(num_classes) when every class is equally frequent."""
    p = torch.bincount(predicted, minlength=num_classes).double() / len(predicted)
    p = p[p > 0]
    return float((p * (1 / p).log()).sum())


class _Features(nn.Identity):
    """Features passed through as they are: the "feature extractor" of torchmetrics' FID over features computed
    beforehand (it reads ``num_features``)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


def reference_statistics(features: torch.Tensor) -> FrechetInceptionDistance:
    """torchmetrics' :class:`FrechetInceptionDistance` over features (N, D), holding ``features`` as its real set
    (float64 statistics, kept by ``reset()``); pass it to :func:`frechet_distance` to reuse them."""
    metric = FrechetInceptionDistance(
        feature=_Features(features.shape[1]), normalize=True, reset_real_features=False, sync_on_compute=False
    )
    metric.update(features.detach().double().cpu(), real=True)
    return metric


def frechet_distance(features: torch.Tensor, reference: torch.Tensor | FrechetInceptionDistance) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between the Gaussians fitted to ``features`` (N, D) and to
    the reference features (M, D) (or their :func:`reference_statistics`): FID's formula, computed by torchmetrics."""
    metric = reference if isinstance(reference, FrechetInceptionDistance) else reference_statistics(reference)
    metric.reset()  # drops the previous generated set, keeps the reference
    metric.update(features.detach().double().cpu(), real=False)
    return float(metric.compute())


CLASSIFIER_SIZE = 32


def to_classifier_size(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 1, S, S) in [-1, 1] as the classifier's 32x32 input: native 28x28 digits get the same 2-pixel
    background border that the 32x32 data set has (so they are the very same images), other sizes are resized."""
    size = images.shape[-1]
    if size == CLASSIFIER_SIZE:
        return images
    if size < CLASSIFIER_SIZE and (CLASSIFIER_SIZE - size) % 2 == 0:
        border = (CLASSIFIER_SIZE - size) // 2
        return F.pad(images, (border,) * 4, value=-1.0)
    return F.interpolate(images, size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="bilinear", antialias=True)


@torch.no_grad()
def score_digits(
    classifier: DigitClassifier,
    images: torch.Tensor,
    reference: torch.Tensor | FrechetInceptionDistance,
    confidence: float = 0.9,
) -> dict[str, float]:
    """Scores of images (N, 1, S, S) in [-1, 1] (:func:`to_classifier_size`) against real digits: ``reference`` is
    their classifier features (M, feature_dim) or :func:`reference_statistics` of them.

    Returns ``confident_share`` (share with top softmax probability > ``confidence``), ``class_entropy`` (nats,
    log 10 = 2.303 at most) and ``frechet_distance``.
    """
    classifier.eval()
    images = to_classifier_size(images.clamp(-1, 1))  # samples may overshoot the data range
    features = torch.cat([classifier.features(images[i : i + 500]) for i in range(0, len(images), 500)])
    probs = classifier.head(features).softmax(1)
    top, predicted = probs.max(1)
    return {
        "confident_share": float((top > confidence).float().mean()),
        "class_entropy": class_entropy(predicted, probs.shape[1]),
        "frechet_distance": frechet_distance(features, reference),
    }


@torch.no_grad()
def requested_class_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images (N, 1, S, S) in [-1, 1] (:func:`to_classifier_size`) that the classifier assigns to their
    requested class ``labels`` (N,): how well a class-conditional model follows its labels."""
    classifier.eval()
    x = to_classifier_size(images.clamp(-1, 1))
    predicted = torch.cat([classifier(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((predicted == labels.to(predicted.device)).float().mean())


@dataclass
class DigitScorer:
    """The demo's quality figures (:func:`score_digits`) against the first half of the held-out digits; the second
    half, ``heldout``, scored the same way shows the floor that the finite sample size sets."""

    classifier: DigitClassifier
    reference: FrechetInceptionDistance
    num_reference: int
    heldout: torch.Tensor
    accuracy: float
    path: Path

    @classmethod
    def from_splits(
        cls,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        *,
        epochs: int = 8,
        cache_dir: str | Path | None = None,
        progress: bool = False,
    ) -> DigitScorer:
        """The cached classifier of :func:`load_or_train_digit_classifier` (``progress``: a bar while it trains) and
        the reference statistics."""
        train, val = (to_classifier_size(train[0]), train[1]), (to_classifier_size(val[0]), val[1])
        classifier, accuracy, path = load_or_train_digit_classifier(
            train, val, cache_dir=cache_dir, epochs=epochs, progress=progress
        )
        half = len(val[0]) // 2
        with torch.no_grad():
            reference = reference_statistics(classifier.features(val[0][:half]))
        return cls(classifier, reference, half, val[0][half:], accuracy, path)

    @classmethod
    def from_digits(
        cls,
        digits: EmbeddedDigitsDataModule,
        *,
        epochs: int = 8,
        cache_dir: str | Path | None = None,
        progress: bool = False,
    ) -> DigitScorer:
        """The scorer of the train/validation split of ``digits`` (:meth:`from_splits`)."""
        return cls.from_splits(
            digits.split_arrays("train"),
            digits.split_arrays("val"),
            epochs=epochs,
            cache_dir=cache_dir,
            progress=progress,
        )

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        """Scores of images (N, 1, S, S) in [-1, 1]: see :func:`score_digits`."""
        return score_digits(self.classifier, images, self.reference)
