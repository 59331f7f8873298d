"""Why Heun is worse than DDIM and DPM-Solver++ at 10 steps on the demo model: the visited noise levels.

    python docs/results/heun/probe.py CKPT --out heun_probe.json

For each setting: the distinct timesteps the Karras levels round to, and the report scorer's Frechet distance and
confident share of 250 seeded samples (the demo report's seeds), beside DPM-Solver++ and DDIM at equal evaluations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch

from ddpm_lightning.data import EmbeddedDigitsDataModule
from ddpm_lightning.diffusion import SamplerConfig, samplers
from ddpm_lightning.evaluation.digit_classifier import DigitScorer
from ddpm_lightning.sampling import iter_samples, load_module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", help="labels starting with these")
    args = parser.parse_args()
    module = load_module(args.ckpt, "cpu")
    digits = EmbeddedDigitsDataModule(image_size=28)
    digits.setup("fit")
    scorer = DigitScorer.from_digits(digits, epochs=6)
    original = samplers.karras_sigmas
    settings = [
        ("dpmpp_2m 19", {"name": "dpmpp_2m", "steps": 19}, None),
        ("ddim 19", {"name": "ddim", "steps": 19}, None),
        ("heun 10 (rho 7, sigma 80..0.006)", {"name": "heun", "steps": 10}, None),
        ("heun 10 rho 3", {"name": "heun", "steps": 10, "rho": 3.0}, None),
        ("heun 10 sigma_min 0.05", {"name": "heun", "steps": 10}, 0.05),
        ("heun 10 rho 3 sigma_min 0.05", {"name": "heun", "steps": 10, "rho": 3.0}, 0.05),
        ("heun 10 sigma_max 20 sigma_min 0.05", {"name": "heun", "steps": 10, "sigma_max": 20.0}, 0.05),
        ("heun 10 sigma_min 0.02", {"name": "heun", "steps": 10}, 0.02),
        ("heun 18 (rho 7)", {"name": "heun", "steps": 18}, None),
        ("dpmpp_2m 35", {"name": "dpmpp_2m", "steps": 35}, None),
        ("dpmpp_2m 9", {"name": "dpmpp_2m", "steps": 9}, None),
        ("ddim 9", {"name": "ddim", "steps": 9}, None),
        ("heun 5 (rho 7, sigma 80..0.006)", {"name": "heun", "steps": 5}, None),
        ("heun 5 sigma_min 0.05", {"name": "heun", "steps": 5}, 0.05),
        ("heun 5 sigma_max 20", {"name": "heun", "steps": 5, "sigma_max": 20.0}, None),
        ("heun 5 sigma_max 20 sigma_min 0.05", {"name": "heun", "steps": 5, "sigma_max": 20.0}, 0.05),
        ("heun 5 sigma_max 10 sigma_min 0.1", {"name": "heun", "steps": 5, "sigma_max": 10.0}, 0.1),
        ("heun 5 rho 3", {"name": "heun", "steps": 5, "rho": 3.0}, None),
    ]
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for label, setting, sigma_min in settings:
        if args.only and not any(label.startswith(prefix) for prefix in args.only):
            continue
        visited = None

        def with_floor(diffusion, num_steps, rho=7.0, sigma_max=None, floor=sigma_min):
            sigmas = diffusion.sigmas
            s_max = min(float(sigmas[-1]), 80.0 if sigma_max is None else float(sigma_max))
            s_min = max(float(sigmas[0]), floor or 0.0)
            ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
            levels = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            return diffusion.round_sigma(levels)

        sampler = SamplerConfig.parse(setting)
        with mock.patch.object(samplers, "karras_sigmas", with_floor if sigma_min else original):
            if sampler.name == "heun":
                visited = samplers._heun_visited(module.diffusion, sampler)
            images = torch.cat([x for _, x in iter_samples(module, range(250), sampler=sampler, seed=0)])
        scores = scorer(images)
        results[label] = {"nfe": sampler.nfe(module.diffusion.num_timesteps), "visited": visited, **scores}
        print(label, results[label], flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
