"""FID (and optionally IS and KID) of EMA samples during training, the same on 1 or 64 processes.

Sample ``i`` of every evaluation is seeded by ``seed + i`` and the indices are dealt out to the ranks, so the
generated set does not depend on the number of processes. Features go into torchmetrics' metrics, whose states are
summed (FID) or gathered (IS, KID) across ranks before the value is computed; every rank then logs the same number.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from ddpm_lightning import compat, io
from ddpm_lightning.callbacks.periodic import EveryNSteps, gather_by_index, rank_indices
from ddpm_lightning.callbacks.sampling import MONITORING_SAMPLER
from ddpm_lightning.data import images_of, to_uint8
from ddpm_lightning.diffusion import Sampler, SamplerConfig
from ddpm_lightning.evaluation.inception_weights import build_fid_extractor, resolve_fid_weights
from ddpm_lightning.evaluation.real_stats import real_stats_key, real_stats_name
from ddpm_lightning.sampling import iter_samples

__all__ = ["FIDCallback", "module_digest"]

Split = Literal["train", "val", "test"]
INCEPTION_FEATURE = 2048


class _Precomputed(nn.Module):
    """Identity "extractor": the callback extracts each batch once and hands the features to all metrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state_dict (names, dtypes, shapes and values): identifies the feature extractor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FIDCallback(EveryNSteps):
    """Log ``val/fid`` (and ``val/fid_<label>``, e.g. ``val/fid_ddim50``) every ``every_n_steps`` steps and at the end
    of fit.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this; None: only at the end of fit.
        num_samples: generated images per evaluation (paper: 50,000), dealt out to the ranks by index.
        batch_size: images sampled (and real images embedded) at once on each rank.
        sampler: the sampler setting; ``{name: ddpm, steps: null}`` is the model's full ancestral chain (paper,
            logged as ``val/fid_ddpm1000``); fewer network evaluations of ``ddpm`` (strided chain), ``ddim`` or
            ``dpmpp_2m`` (default: ``{name: ddim, steps: 50}``) are a cheaper monitoring signal whose values are not
            comparable with the paper's. A bare name runs 50 network evaluations of that sampler.
        seed: sample ``i`` is drawn with seed ``seed + i`` (and, for a class-conditional model, with the class
            ``i mod num_classes``, guided with the setting's ``guidance_scale``).
        feature_extractor: a module mapping uint8 (N, C, H, W) images to (N, num_features) features, with an int
            ``num_features`` attribute; None: the FID Inception-v3 (2048-d pool3) from
            ``feature_extractor_weights_path`` (None: torch hub's cache, see ``ddpm fid-weights``).
        real_split, num_real: the real images (``datamodule.real_images_dataset(real_split)``, first ``num_real``;
            None: all). Their statistics are computed once and cached in ``cache_dir`` (default:
            ``$XDG_CACHE_HOME/ddpm-lightning/fid-stats``).
        inception_score, kid: also log ``val/is`` and ``val/kid`` (both keep every feature in memory).
        kid_subset_size, kid_subsets: KID's subsets; the size is capped by the numbers of images.
        on_fit_end: evaluate when fit ends, unless the last step was just evaluated.
    """

    def __init__(
        self,
        every_n_steps: int | None = 10_000,
        num_samples: int = 10_000,
        batch_size: int = 256,
        sampler: SamplerConfig | Mapping[str, Any] | Sampler = MONITORING_SAMPLER,
        *,
        seed: int = 0,
        feature_extractor: nn.Module | None = None,
        feature_extractor_weights_path: str | None = None,
        real_split: Split = "train",
        num_real: int | None = None,
        cache_dir: str | None = None,
        inception_score: bool = False,
        kid: bool = False,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        on_fit_end: bool = True,
    ):
        super().__init__(every_n_steps, on_fit_end)
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sampler = SamplerConfig.parse(sampler, MONITORING_SAMPLER)
        if real_split not in get_args(Split):
            raise ValueError(f"real_split={real_split!r}; expected one of {get_args(Split)}")
        if num_real is not None and num_real < 2:
            raise ValueError(f"num_real must be >= 2 or None (all images), got {num_real}")
        if kid_subset_size < 2 or kid_subsets < 1:
            raise ValueError(f"kid_subset_size must be >= 2 and kid_subsets >= 1, got {kid_subset_size}, {kid_subsets}")
        if feature_extractor is not None and not isinstance(getattr(feature_extractor, "num_features", None), int):
            raise ValueError(f"feature_extractor {type(feature_extractor).__name__} needs an int `num_features`")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.custom_extractor = feature_extractor
        # fail now on a missing file, not when fit starts
        self.weights_path = resolve_fid_weights(feature_extractor_weights_path) if feature_extractor is None else None
        self.real_split = real_split
        self.num_real = num_real
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else io.cache_dir("fid-stats")
        self.inception_score = inception_score
        self.kid = kid
        self.kid_subset_size = kid_subset_size
        self.kid_subsets = kid_subsets

        self.extractor: nn.Module | None = None
        self.logits_extractor: nn.Module | None = None
        self.fid: FrechetInceptionDistance | None = None
        self.kid_metric: KernelInceptionDistance | None = None
        self.is_metric: InceptionScore | None = None
        self.real_stats_path: Path | None = None
        self.real_stats_from_cache = False
        # global sample index -> SHA-256 of its uint8 image, for this rank's samples of the last evaluation
        self.sample_digests: dict[int, str] = {}
        self._num_timesteps: int | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        diffusion = getattr(pl_module, "diffusion", None)
        if diffusion is not None:
            # check the step count against the model now rather than at the first evaluation
            self._num_timesteps = diffusion.num_timesteps
            self.sampler.timesteps(self._num_timesteps)
        if stage != "fit" or self.extractor is not None:
            return
        # built here, in each process, so that ddp_spawn does not pickle the Inception into every worker
        if self.custom_extractor is not None:
            self.extractor = self.custom_extractor
        else:
            self.extractor = build_fid_extractor(self.weights_path, INCEPTION_FEATURE, antialias=False)
        self.extractor.eval().requires_grad_(False)
        if self.inception_score:
            self.logits_extractor = self.extractor if self.custom_extractor is not None else self._inception_logits()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # fresh metric states every fit: stale fake/real states from an earlier fit in this process (or pickled into
        # spawned workers) would otherwise leak into the first FID
        super().on_fit_start(trainer, pl_module)
        device = pl_module.device
        self.extractor.to(device=device, dtype=torch.float32)
        if self.logits_extractor is not None:
            self.logits_extractor.to(device=device, dtype=torch.float32)
        self.sample_digests = {}
        dataset, num_real = self._real_dataset(trainer)
        self._build_metrics(device, num_real)
        self._load_real_stats(trainer, pl_module, dataset, num_real)

    # ------------------------------------------------------------------------------------------------ evaluation
    @property
    def label(self) -> str:
        """``ddim50``, ``dpmpp_2m20``, ``ddpm250`` (a strided chain) or ``ddpm1000`` (the full chain of T = 1000),
        with ``_quad`` for quadratic spacing (:meth:`SamplerConfig.label`); the logged ``val/fid_<label>`` says how
        samples were drawn. Known once the callback is set up."""
        if self._num_timesteps is None:
            raise RuntimeError("the label needs the model's number of timesteps: set the callback up first")
        return self.sampler.label(self._num_timesteps)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate this rank's share of the samples and return the metrics over all ranks' samples (synced metric
        states: the same values on every rank)."""
        start = time.perf_counter()
        device = pl_module.device
        num_features = self._num_features
        self.fid.reset()
        # an empty update on every rank, even one without samples of its own, so that all take part in compute()
        self.fid.update(torch.empty(0, num_features, device=device), real=False)
        indices = rank_indices(trainer, self.num_samples)
        features, logits = [], []
        self.sample_digests = {}
        for batch, images in iter_samples(
            pl_module, indices, sampler=self.sampler, seed=self.seed, batch_size=self.batch_size
        ):
            images_u8 = to_uint8(images.float())  # (B, C, H, W): the uint8 quantisation of FID's protocol
            for i, image in zip(batch, images_u8.cpu(), strict=True):
                self.sample_digests[i] = hashlib.sha256(image.numpy().tobytes()).hexdigest()
            feats = self._extract(self.extractor, images_u8.to(device))
            self.fid.update(feats, real=False)
            if self.kid_metric is not None:
                features.append(feats)
            if self.logits_extractor is not None:
                logits.append(self._extract(self.logits_extractor, images_u8.to(device)))

        values = {"val/fid": float(self.fid.compute())}
        # IS and KID draw random subsets: a fixed seed keeps their values equal on all ranks and the training RNG
        # untouched. Each gets exactly one update per rank (possibly empty), since their list states are gathered
        # element by element and every rank must gather the same number of elements.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if self.kid_metric is not None:
                self.kid_metric.reset()
                self.kid_metric.update(self._cat(features, num_features, device), real=False)
                values["val/kid"] = float(self.kid_metric.compute()[0])
            if self.is_metric is not None:
                self.is_metric.reset()
                self.is_metric.update(self._cat(logits, self.is_metric.inception.num_features, device))
                values["val/is"] = float(self.is_metric.compute()[0])
        values[f"val/fid_{self.label}"] = values["val/fid"]
        rank_zero_info(
            f"FID {values['val/fid']:.4f} ({self.label}, {self.num_samples} samples, "
            f"{trainer.world_size} processes) in {time.perf_counter() - start:.1f}s"
        )
        return values

    # ------------------------------------------------------------------------------------------------ helpers
    def _inception_logits(self) -> nn.Module:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(
            "inception-v3-compat",
            ["logits_unbiased"],
            feature_extractor_weights_path=self.weights_path,
            antialias=False,
        )
        if not torch.isfinite(net.fc.weight).all():
            raise ValueError(
                f"inception_score=True needs torch-fidelity's own Inception weights; {self.weights_path} has no "
                "classifier (a file converted from fid-helper), so IS would be NaN. Use inception_score=False."
            )
        net.num_features = net.fc.out_features
        return net

    def _extract(self, net: nn.Module, images_u8: torch.Tensor) -> torch.Tensor:
        """(N, d) float32 features, computed in float32 whatever the training precision."""
        if self.custom_extractor is None and images_u8.shape[1] == 1:
            images_u8 = images_u8.expand(-1, 3, -1, -1)  # grey to RGB for the Inception
        with torch.autocast(device_type=images_u8.device.type, enabled=False):
            return net(images_u8).float()

    @staticmethod
    def _cat(chunks: list[torch.Tensor], num_features: int, device: torch.device) -> torch.Tensor:
        return torch.cat(chunks) if chunks else torch.empty(0, num_features, device=device)

    def _build_metrics(self, device: torch.device, num_real: int) -> None:
        num_features = self.extractor.num_features if self.custom_extractor is not None else INCEPTION_FEATURE
        self._num_features = num_features
        self.fid = FrechetInceptionDistance(feature=_Precomputed(num_features), reset_real_features=False).to(device)
        self.kid_metric = self.is_metric = None
        if self.kid:
            with warnings.catch_warnings():  # it keeps every feature: num_samples + the real images, known here
                warnings.filterwarnings("ignore", message=r"Metric `Kernel Inception Distance` will save all")
                self.kid_metric = KernelInceptionDistance(
                    feature=_Precomputed(num_features),
                    subsets=self.kid_subsets,
                    # capped by the numbers of images
                    subset_size=min(self.kid_subset_size, self.num_samples, num_real),
                    reset_real_features=False,
                ).to(device)
        if self.logits_extractor is not None:
            self.is_metric = InceptionScore(feature=_Precomputed(self.logits_extractor.num_features)).to(device)

    def _real_dataset(self, trainer: L.Trainer) -> tuple[Any, int]:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "real_images_dataset"):
            raise ValueError(
                "FIDCallback needs a datamodule with `real_images_dataset(split)` and `name` (e.g. "
                f"CIFAR10DataModule) for the real-image statistics, got {type(datamodule).__name__}"
            )
        dataset = datamodule.real_images_dataset(self.real_split)
        num = len(dataset) if self.num_real is None else self.num_real
        if num > len(dataset):
            raise ValueError(f"num_real={self.num_real} but the {self.real_split} split has {len(dataset)} images")
        return dataset, num

    def _cache_key(self, trainer: L.Trainer, dataset: Any, num: int) -> dict[str, Any]:
        """What the real statistics depend on; the cache file is only reused when all of it matches."""
        image = images_of(dataset[0])
        custom = self.custom_extractor is not None
        return real_stats_key(
            dataset=getattr(trainer.datamodule, "name", type(trainer.datamodule).__name__),
            split=self.real_split,
            resolution=f"{image.shape[-2]}x{image.shape[-1]}",
            num_images=num,
            extractor=type(self.extractor).__qualname__ if custom else f"inception-v3-compat-{INCEPTION_FEATURE}",
            extractor_sha256=module_digest(self.extractor),
        )

    def _load_real_stats(self, trainer: L.Trainer, pl_module: L.LightningModule, dataset: Any, num: int) -> None:
        """Put the real images' feature statistics into the metrics: from the cache, or computed and cached."""
        key = self._cache_key(trainer, dataset, num)
        path = self.cache_dir / f"{real_stats_name(key)}.pt"
        self.real_stats_path = path
        stats = self._read_cache(path, key) if trainer.is_global_zero else None
        # rank 0 decides for all: the ranks must agree on computing (collectives) or loading
        cached = trainer.strategy.broadcast(stats is not None, src=0)
        if cached and stats is None:
            stats = torch.load(path, map_location="cpu", weights_only=True)
        elif not cached:
            stats = self._compute_real_stats(trainer, pl_module, dataset, num)
            stats["key"] = key
            if trainer.is_global_zero:
                io.atomic_write(path, lambda tmp: torch.save(stats, tmp))
            trainer.strategy.barrier("fid_real_stats")
        self.real_stats_from_cache = cached
        self._set_real_states(trainer, stats, pl_module.device)

    def _read_cache(self, path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        stats = torch.load(path, map_location="cpu", weights_only=True)
        return stats if stats.get("key") == key and (not self.kid or "features" in stats) else None

    @torch.no_grad()
    def _compute_real_stats(
        self, trainer: L.Trainer, pl_module: L.LightningModule, dataset: Any, num: int
    ) -> dict[str, Any]:
        # its own generator: a DataLoader draws its workers' base seed when iterated, which would otherwise move the
        # global RNG, and the run's training noise would depend on whether these statistics were cached
        loader = DataLoader(
            Subset(dataset, rank_indices(trainer, num)), batch_size=self.batch_size, generator=torch.Generator()
        )
        device = pl_module.device
        features = [self._extract(self.extractor, to_uint8(images_of(b).float()).to(device)) for b in loader]
        local = self._cat(features, self._num_features, device).double()
        # sum of f and of f f^T over all images: the sufficient statistics of FID's Gaussian
        stats = {
            "features_sum": trainer.strategy.reduce(local.sum(0), reduce_op="sum").cpu(),
            "features_cov_sum": trainer.strategy.reduce(local.T @ local, reduce_op="sum").cpu(),
            "num_samples": num,
        }
        if self.kid:
            stats["features"] = gather_by_index(trainer, local.float(), num)
        return stats

    def _set_real_states(self, trainer: L.Trainer, stats: dict[str, Any], device: torch.device) -> None:
        # compute() sums the states over ranks, so the totals live on rank 0 and the other ranks hold zeros
        scale = 1.0 if trainer.is_global_zero else 0.0
        real = {
            "real_features_sum": stats["features_sum"].to(device, torch.float64) * scale,
            "real_features_cov_sum": stats["features_cov_sum"].to(device, torch.float64) * scale,
            "real_features_num_samples": torch.tensor(int(stats["num_samples"] * scale), device=device),
        }
        compat.load_metric_states(self.fid, real)
        if self.kid_metric is not None:
            features = stats["features"][trainer.global_rank :: trainer.world_size]
            compat.load_metric_states(self.kid_metric, {"real_features": [features.to(device)]})
