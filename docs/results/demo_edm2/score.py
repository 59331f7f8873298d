"""Score demo runs with two independent scorers, unguided and autoguided at several weights.

    python docs/results/demo_edm2/score.py RUN_DIR [RUN_DIR ...] --out scores.json [--weights 1 1.5 2 2.5]

Scorer 1 is the demo report's (the cached digit classifier's Frechet distance, confident share and class entropy).
Scorer 2 is a separately trained, stricter classifier (another seed, 12 epochs): the share of samples it calls a
digit with confidence > 0.9, and precision / recall (Kynkaanniemi et al. 2019, k = 3) in its feature space against
the 500 validation digits. The real row scores 250 held-out digits: scorer 1's half of the validation split, scorer
2's from the test split (disjoint from its reference). Every run's samples are the report's: 250 seeded samples,
DPM-Solver++ 20 steps (or the sampler given), autoguided by the run's checkpoints/guide.ckpt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.evaluation.digit_classifier import DigitScorer, load_or_train_digit_classifier, to_classifier_size
from ddpm_lightning.sampling import iter_samples, load_module


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of fake features inside the union of the
    real k-NN balls, and of real features inside the fake ones."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # the k-th neighbour (itself excluded)

    def coverage(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= r[None]).any(1).float().mean())

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


class StrictScorer:
    """Scorer 2: a second classifier (seed 1, 12 epochs) and its feature space."""

    def __init__(self, digits: EmbeddedDigitsDataModule) -> None:
        train, val = digits.split_arrays("train"), digits.split_arrays("val")
        train = (to_classifier_size(train[0]), train[1])
        val = (to_classifier_size(val[0]), val[1])
        self.classifier, self.accuracy, _ = load_or_train_digit_classifier(train, val, epochs=12, seed=1)
        with torch.no_grad():
            self.real = self.classifier.features(val[0])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        x = to_classifier_size(images.clamp(-1, 1))
        features = self.classifier.features(x)
        top = self.classifier.head(features).softmax(1).max(1).values
        precision, recall = knn_precision_recall(self.real, features)
        return {"strict_confident": float((top > 0.9).float().mean()), "precision": precision, "recall": recall}


def scorers() -> tuple[DigitScorer, StrictScorer, EmbeddedDigitsDataModule]:
    """Scorer 1 (the report's), scorer 2 and the digits they were trained on."""
    digits = EmbeddedDigitsDataModule(image_size=28)
    digits.setup("fit")
    return DigitScorer.from_digits(digits, epochs=6), StrictScorer(digits), digits


def samples(module, guide, sampler: SamplerConfig, num: int = 250) -> torch.Tensor:
    return torch.cat([x.cpu() for _, x in iter_samples(module, range(num), sampler=sampler, seed=0, guide=guide)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guide", default="checkpoints/guide.ckpt", help="the guide, relative to each run")
    args = parser.parse_args()
    report, strict, digits = scorers()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for run in args.runs:
        module = load_module(run / "demo.ckpt", "cpu")
        guide_path = run / args.guide
        guide = load_module(guide_path, "cpu") if guide_path.is_file() else None
        base = SamplerConfig.parse({"name": args.sampler, "steps": args.steps})
        for w in args.weights:
            if w != 1 and guide is None:
                continue
            sampler = dataclasses.replace(base, autoguidance_scale=w)
            images = samples(module, guide if w != 1 else None, sampler)
            key = f"{run.name}|{sampler.label(module.diffusion.num_timesteps)}"
            results[key] = {**report(images), **strict(images)}
            print(key, {k: round(v, 3) for k, v in results[key].items()}, flush=True)
            args.out.write_text(json.dumps(results, indent=1))
    test = digits.split_arrays("test")[0][:250]
    results["real_heldout"] = {**report(report.heldout), **strict(test)}
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
