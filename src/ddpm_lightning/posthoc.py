"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models", EDM2
Sec. 3 and App. C), its maths: the power-function EMAs that :class:`~ddpm_lightning.callbacks.PostHocEMA` tracks and
stores as snapshots, and the reconstruction, after training, of the EMA of any relative length sigma_rel by least
squares over the snapshots (:func:`reconstruct_posthoc_ema`).

A power-function EMA with exponent gamma averages the weights theta_tau of steps tau <= t with weights proportional
to tau^gamma; it is updated after step t by

    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,    beta_t = (1 - 1/t)^(gamma + 1)    (EDM2 Eq. 3)

(beta_1 = 0: the average starts at the first step's weights). Its relative length, the standard deviation of the
profile over its length, is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2 Eq. 2): gamma is the
largest real root of gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0.

The continuous profile of an average taken at step T is p(tau; T, gamma) = (gamma + 1) tau^gamma / T^(gamma + 1) on
[0, T]. Two profiles have the inner product (EDM2 App. C.2, ``p_dot_p``)

    <p_a, p_b> = (gamma_a + 1) (gamma_b + 1) / (gamma_a + gamma_b + 1) * (T_a / T_b)^e / max(T_a, T_b),
    e = gamma_b if T_a < T_b else -gamma_a,

so the snapshots' coefficients x of a target profile p_r solve the normal equations A x = b with A_ij = <p_i, p_j>
over the snapshots and b_i = <p_i, p_r> (least squares, ``solve_posthoc_coefficients``), and the reconstruction is
sum_i x_i theta_hat_i.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from ddpm_lightning.io import atomic_write

__all__ = [
    "SNAPSHOT_NAME",
    "power_beta",
    "power_profile_inner",
    "reconstruct_posthoc_ema",
    "sigma_rel_to_gamma",
    "solve_posthoc_coefficients",
]

#: a snapshot's file name: ``<step>.pt``
SNAPSHOT_NAME = re.compile(r"^(\d+)\.pt$")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA of relative length ``sigma_rel`` (EDM2 Eq. 2 solved for gamma)."""
    if not 0.0 < sigma_rel < 12**-0.5:
        # gamma -> -1 gives sigma_rel -> sqrt(1/12) (a uniform average over the whole run): nothing longer exists
        raise ValueError(f"sigma_rel must be in (0, {12**-0.5:.4f}) (an EMA shorter than the run), got {sigma_rel}")
    t = sigma_rel**-2
    coefficients = torch.tensor([1.0, 7.0, 16.0 - t, 12.0 - t], dtype=torch.float64)
    companion = torch.zeros(3, 3, dtype=torch.float64)
    companion[0] = -coefficients[1:]
    companion[1, 0] = companion[2, 1] = 1.0
    roots = torch.linalg.eigvals(companion)
    real = roots.real[roots.imag.abs() < 1e-9 * roots.abs().clamp(min=1.0)]
    return float(real.max())


def power_beta(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) of the power-function EMA after optimizer step ``step`` (t >= 1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def power_profile_inner(
    t_a: torch.Tensor, gamma_a: torch.Tensor, t_b: torch.Tensor, gamma_b: torch.Tensor
) -> torch.Tensor:
    """<p(.; t_a, gamma_a), p(.; t_b, gamma_b)>, the integral of the product of two power-function EMA profiles
    (module docstring), elementwise with broadcasting, in float64."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(v, dtype=torch.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    exponent = torch.where(t_a < t_b, gamma_b, -gamma_a)
    numerator = (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent
    return numerator / ((gamma_a + gamma_b + 1) * torch.maximum(t_a, t_b))


def solve_posthoc_coefficients(
    steps: Sequence[float], gammas: Sequence[float], target_step: float, target_gamma: float
) -> torch.Tensor:
    """The least-squares coefficients (float64, one per snapshot) of the snapshots (``steps[i]``, ``gammas[i]``)
    whose weighted sum best approximates the profile of (``target_step``, ``target_gamma``) (EDM2 App. C.2)."""
    t = torch.as_tensor(steps, dtype=torch.float64)
    g = torch.as_tensor(gammas, dtype=torch.float64)
    A = power_profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])  # (N, N)
    b = power_profile_inner(t, g, torch.tensor(float(target_step)), torch.tensor(float(target_gamma)))  # (N,)
    return torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]


def _snapshots(folder: Path) -> list[Path]:
    paths = sorted(p for p in folder.glob("*.pt") if SNAPSHOT_NAME.match(p.name))
    if not paths:
        raise FileNotFoundError(
            f"no post-hoc EMA snapshots (<step>.pt) in {folder}: train with the PostHocEMA callback"
        )
    return paths


def reconstruct_posthoc_ema(
    run: str | Path, sigma_rels: Sequence[float], out: str | Path | None = None, step: int | None = None
) -> list[Path]:
    """Reconstruct the EMA of each of ``sigma_rels`` at ``step`` (default: the last snapshot's) from the snapshots in
    ``<run>/posthoc_ema`` (or ``run`` itself when it holds them) by least squares over every snapshot up to ``step``,
    and write one sampling checkpoint per sigma_rel, ``<out>/posthoc_ema_<sigma_rel>.ckpt`` (default ``out``: the
    snapshot folder), with the layout of a run's checkpoint (``hyper_parameters``; ``state_dict``: the reconstructed
    network and the ``diffusion.*`` buffers), read by ``ddpm sample`` and ``ddpm sampler-sweep --ckpt``."""
    run = Path(run)
    folder = run / "posthoc_ema" if (run / "posthoc_ema").is_dir() else run
    paths = _snapshots(folder)
    heads = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in paths]
    if step is None:
        step = max(int(h["step"]) for h in heads)
    chosen = [(p, h) for p, h in zip(paths, heads, strict=True) if int(h["step"]) <= step]
    if not chosen or int(chosen[-1][1]["step"]) != step:
        raise ValueError(
            f"step {step} is not the step of a snapshot in {folder}; steps: {[int(h['step']) for h in heads]}"
        )
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    # one row per (snapshot, profile), in the order of the snapshots' nets
    nets = [
        (float(h["step"]), float(gamma), net)
        for _, h in chosen
        for gamma, net in zip(h["gammas"], h["nets"], strict=True)
    ]
    coefficients = [solve_posthoc_coefficients([n[0] for n in nets], [n[1] for n in nets], step, g) for g in gammas]
    sums: list[dict[str, torch.Tensor]] = [{} for _ in gammas]
    for row, (_, _, net) in enumerate(nets):
        for x, total in zip(coefficients, sums, strict=True):
            for name, value in net.items():
                if not value.is_floating_point():
                    total[name] = value  # an integer buffer: a constant
                    continue
                term = float(x[row]) * value.to(torch.float64)
                total[name] = term if name not in total else total[name] + term
    last = chosen[-1][1]
    out = Path(out) if out is not None else folder
    written = []
    for sigma_rel, total in zip(sigma_rels, sums, strict=True):
        checkpoint = {
            "hyper_parameters": dict(last["hyper_parameters"]),
            "state_dict": {
                **{f"net.{k}": v.to(torch.float32) if v.is_floating_point() else v for k, v in total.items()},
                **last["diffusion"],
            },
            "pytorch-lightning_version": L.__version__,
            "posthoc_ema": {"sigma_rel": float(sigma_rel), "step": int(step), "snapshots": len(chosen)},
        }
        path = out / f"posthoc_ema_{sigma_rel:g}.ckpt"
        written.append(atomic_write(path, lambda tmp, c=checkpoint: torch.save(c, tmp)))
    return written
