"""The frontier: each recipe's checkpoints at N = 550, 1100, 1650, 2200 steps scored like the search (both scorers),
unguided and autoguided (w = 2) by the same run's checkpoint at 0.3 N, as the demo's GuideCheckpoint does.

    python docs/results/demo_edm2/frontier.py runs/search/frontier_base_s0 runs/search/frontier_mp_s0 \\
        --out docs/results/demo_edm2/frontier.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score import samples, scorers  # noqa: E402

from ddpm_lightning.diffusion import SamplerConfig  # noqa: E402
from ddpm_lightning.sampling import load_module  # noqa: E402

STEPS = (550, 1100, 1650, 2200)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report, strict, _ = scorers()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for run in args.runs:
        for n in STEPS:
            module = load_module(run / "checkpoints" / f"step={n}.ckpt", "cpu")
            guide = load_module(run / "checkpoints" / f"step={n * 3 // 10}.ckpt", "cpu")
            for w, g in ((1.0, None), (2.0, guide)):
                sampler = SamplerConfig.parse({"name": "dpmpp_2m", "steps": 20, "autoguidance_scale": w})
                images = samples(module, g, sampler)
                key = f"{run.name}|{n}|w{w:g}"
                results[key] = {**report(images), **strict(images)}
                print(key, {k: round(v, 3) for k, v in results[key].items()}, flush=True)
                args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
