"""Figures: the noise schedules and the forward process, reverse chains, the ablation's learning curves and the
sampler sweep's quality against network evaluations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import ticker
from matplotlib.figure import Figure

from ddpm_lightning.data.transforms import to_uint8
from ddpm_lightning.diffusion import SCHEDULES, GaussianDiffusion, make_betas
from ddpm_lightning.io import atomic_write

COLORS = {"linear": "tab:blue", "cosine": "tab:orange"}


def _show(ax: plt.Axes, image: torch.Tensor) -> None:
    """Draw one image in [-1, 1] of shape (C, H, W)."""
    array = to_uint8(image.cpu()).permute(1, 2, 0).numpy()
    ax.imshow(array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def forward_process(
    x0: torch.Tensor, timesteps: Sequence[int], schedule: str, num_timesteps: int = 1000, seed: int = 0
) -> torch.Tensor:
    """x_t for each t in ``timesteps`` (Eq. 4) of one image x0 (C, H, W); the same eps for every schedule and t."""
    diffusion = GaussianDiffusion(make_betas(schedule, num_timesteps))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x0_batch = x0.to(torch.float64).expand(len(timesteps), *x0.shape)  # (N, C, H, W)
    t = torch.tensor(list(timesteps))
    return diffusion.q_sample(x0_batch, t, eps.expand_as(x0_batch)).float()


def schedule_figure(
    image: torch.Tensor | None = None,
    num_timesteps: int = 1000,
    timesteps: Sequence[int] = (0, 100, 250, 500, 750, 900, 999),
    schedules: Sequence[str] = SCHEDULES,
) -> Figure:
    """abar_t and log SNR = log(abar_t / (1 - abar_t)) against t/T (Nichol & Dhariwal's Fig. 5), and x_t of one image.

    ``image`` in [-1, 1] of shape (C, H, W); default: the first embedded MNIST digit.
    """
    if image is None:
        from ddpm_lightning.data import load_digits

        image = load_digits()[0][0]
    fig = plt.figure(figsize=(2 * len(timesteps), 3.2 + 2.0 * len(schedules)), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.2, 2.0 * len(schedules)])
    ax_abar, ax_snr = top.subplots(1, 2)
    for schedule in schedules:
        abar = GaussianDiffusion(make_betas(schedule, num_timesteps)).alphas_cumprod.numpy()
        t = np.arange(1, num_timesteps + 1) / num_timesteps
        ax_abar.plot(t, abar, label=schedule, color=COLORS.get(schedule))
        ax_snr.plot(t, np.log(abar / (1 - abar)), label=schedule, color=COLORS.get(schedule))
    ax_abar.set(xlabel="t / T", ylabel=r"$\bar\alpha_t$", title=r"$\bar\alpha_t$")
    ax_snr.set(xlabel="t / T", ylabel=r"$\log(\bar\alpha_t / (1 - \bar\alpha_t))$", title="log SNR")
    for ax in (ax_abar, ax_snr):
        ax.legend()
        ax.grid(alpha=0.3)
    axes = bottom.subplots(len(schedules), len(timesteps), squeeze=False)
    for row, schedule in enumerate(schedules):
        x_ts = forward_process(image, timesteps, schedule, num_timesteps)
        for ax, t, x_t in zip(axes[row], timesteps, x_ts, strict=True):
            _show(ax, x_t)
            ax.set_title(f"t = {t + 1}", fontsize=9)  # 0-based index t is the paper's t + 1
        axes[row, 0].set_ylabel(schedule)
    return fig


def image_grid_figure(
    images: torch.Tensor, titles: Sequence[str] | None = None, rows: int = 1, size: float = 1.6
) -> Figure:
    """Images in [-1, 1] of shape (N, C, H, W) in a grid of ``rows`` rows, with optional titles."""
    cols = -(-len(images) // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            _show(ax, images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=9)
        else:
            ax.axis("off")
    fig.tight_layout()
    return fig


def chain_figure(chain: Mapping[int, torch.Tensor], x0: torch.Tensor) -> Figure:
    """The reverse chain x_T .. x_0 of the samples in ``x0`` (N, C, H, W), one row per sample.

    ``chain`` maps t to x_t (N, C, H, W), as returned by ``sample(..., return_steps=[...])``.
    """
    steps = sorted(chain, reverse=True)
    columns = [chain[t] for t in steps] + [x0.cpu()]
    titles = [f"t = {t + 1}" for t in steps] + ["x_0"]
    images = torch.stack(columns, dim=1).flatten(0, 1)  # (N * (len(steps) + 1), C, H, W), row-major per sample
    return image_grid_figure(images, titles * len(x0), rows=len(x0))


def smooth(values: Sequence[float], weight: float = 0.9) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing): s_k = sum w^(k-j) (1-w) v_j / (1 - w^(k+1))."""
    out, average = np.empty(len(values)), 0.0
    for k, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out[k] = average / (1 - weight ** (k + 1))
    return out


def curves_figure(runs: Sequence[Mapping], smoothing: float = 0.9) -> Figure:
    """Training loss (smoothed) and, when logged, FID against steps: one colour per setting, one line per seed.

    Each run is a mapping with ``label`` (or ``schedule``), ``seed``, ``loss_steps``, ``loss`` and ``fid_steps``,
    ``fid``.
    """
    has_fid = any(len(run["fid"]) for run in runs)
    fig, axes = plt.subplots(1, 2 if has_fid else 1, figsize=(11 if has_fid else 6, 4), squeeze=False)
    labels = list(dict.fromkeys(run.get("label", run.get("schedule")) for run in runs))
    palette = plt.get_cmap("tab10")
    labelled: set[str] = set()
    for run in runs:
        label = run.get("label", run.get("schedule"))
        color = COLORS.get(label, palette(labels.index(label) % 10))
        style = {"color": color, "label": None if label in labelled else label}
        labelled.add(label)
        axes[0, 0].plot(run["loss_steps"], smooth(run["loss"], smoothing), alpha=0.85, **style)
        if has_fid and len(run["fid"]):
            axes[0, 1].plot(run["fid_steps"], run["fid"], marker="o", **style)
    axes[0, 0].set(xlabel="step", ylabel=f"train/loss (EMA {smoothing})", yscale="log", title="L_simple")
    if has_fid:
        axes[0, 1].set(xlabel="step", ylabel="FID", title="FID (EMA weights)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def figure_image(fig: Figure, dpi: int = 80) -> torch.Tensor:
    """``fig`` rendered as a uint8 (3, H, W) image (for the loggers' image panels); the figure stays open."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG, atomically (creating the folder), and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)


SWEEP_METRICS = {
    "frechet_distance": "Frechet distance (digit classifier)",
    "fid": "FID",
    "class_entropy": "class entropy (nats)",
    "confident_share": "confident > 0.9",
}


def quality_vs_nfe_figure(rows: Sequence[Mapping], floors: Mapping[str, float] | None = None) -> Figure:
    """Each quality figure in ``rows`` against the number of network evaluations, one line per sampler setting.

    ``rows`` are mappings with ``setting``, ``nfe`` and some of :data:`SWEEP_METRICS`; ``floors`` maps a metric to
    the value of real images, drawn as a dashed line.
    """
    metrics = [m for m in SWEEP_METRICS if any(row.get(m) is not None for row in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for setting in settings:
            points = sorted((row["nfe"], row[metric]) for row in rows if row["setting"] == setting)
            ax.plot(*zip(*points, strict=True), marker="o", label=setting)
        if floors and metric in floors:
            ax.axhline(floors[metric], color="gray", ls="--", lw=1, label="real held-out")
        log_y = metric in ("frechet_distance", "fid")
        ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel="network evaluations (NFE)")
        for axis in (ax.xaxis, ax.yaxis) if log_y else (ax.xaxis,):
            axis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(SWEEP_METRICS[metric] + (", lower is better" if log_y else ""), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_weight_figure(curve: Mapping[str, Sequence[float]], step: int) -> Figure:
    """The learned loss weighting's u(t) beside the log of the running mean loss per timestep bin (the curve u
    follows): :meth:`~ddpm_lightning.diffusion.weighting.LearnedLossWeight.curve`."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(curve["t"], curve["u"], label="u(t), learned")
    ax.plot(curve["bin_t"], curve["log_loss"], "o", markersize=3, label="log of the mean loss (running)")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("log loss scale")
    ax.set_title(f"learned loss weighting L_t / exp(u(t)) + u(t), step {step}")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
