"""The RMS of every block's output at initialisation: EDM2's magnitude-preserving U-Net against the GroupNorm U-Net.

    python benchmarks/activation_rms.py                # the CIFAR-10 presets and the demo's networks

Random unit-variance inputs x_t (16 images) and random t; each network's blocks (encoder, middle, decoder) in
forward order. The magnitude-preserving design keeps every block near 1 (its test asserts [0.5, 2]); the GroupNorm
U-Net starts far below 1 (its zero-initialised second convolutions make every residual block an identity at first)
and leaves the magnitudes free to drift in training, which its normalisations hide.
Writes ``benchmarks/results/activation_rms.json`` and ``.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from torch import nn

from ddpm_lightning.models import MPUNet, UNet

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    "cifar10 (3x32x32)": (3, 32, ["unet_cifar10", "mp_unet_cifar10"]),
    "demo (1x28x28)": (1, 28, ["unet_digits28_tiny", "mp_unet_digits28"]),
}


def blocks(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's blocks in forward order."""
    if isinstance(net, MPUNet):
        return [(f"enc.{n}", m) for n, m in net.enc.items()] + [(f"dec.{n}", m) for n, m in net.dec.items()]
    out = [(f"down.{i}", block[-1]) for i, block in enumerate(net.down)]
    out += [(f"mid.{i}", m) for i, m in enumerate(net.mid)]
    return out + [(f"up.{i}", block[-1]) for i, block in enumerate(net.up)]


@torch.no_grad()
def block_rms(net: nn.Module, channels: int, size: int) -> dict[str, float]:
    rms: dict[str, float] = {}
    hooks = [
        module.register_forward_hook(
            lambda m, i, out, name=name: rms.__setitem__(name, out.pow(2).mean().sqrt().item())
        )
        for name, module in blocks(net)
    ]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (16,), generator=generator)
    net.eval()(x, t)
    for hook in hooks:
        hook.remove()
    return rms


def main() -> None:
    torch.manual_seed(0)
    results: dict[str, dict[str, dict[str, float]]] = {}
    lines = ["| network | blocks | min RMS | median | max RMS | last block |", "|---|---|---|---|---|---|"]
    for label, (channels, size, presets) in PRESETS.items():
        for preset in presets:
            spec = yaml.safe_load((REPO / "configs" / "model" / f"{preset}.yaml").read_text())
            cls = MPUNet if spec["class_path"].endswith("MPUNet") else UNet
            net = cls(in_channels=channels, image_size=size, **spec["init_args"])
            rms = block_rms(net, channels, size)
            results[f"{preset} {label}"] = rms
            values = sorted(rms.values())
            last = list(rms.values())[-1]
            lines.append(f"| `{preset}` {label} | {len(values)} | {values[0]:.2f} | {values[len(values) // 2]:.2f} | "
                         f"{values[-1]:.2f} | {last:.2f} |")  # fmt: skip
    out = REPO / "benchmarks" / "results" / "activation_rms"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(f"Command: `python benchmarks/activation_rms.py`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
