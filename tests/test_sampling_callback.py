"""The reverse-chain sampling callback: PNG files of the right size, images in TensorBoard, files for CSV runs,
determinism, and uint8 HWC images for W&B."""

from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from helpers import unet_spec
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.callbacks import SamplingCallback, default_callbacks
from ddpm_lightning.callbacks.sampling import chain_timesteps, log_image, render_samples
from ddpm_lightning.diffusion import SamplerConfig
from ddpm_lightning.lit_module import DiffusionModule

pytestmark = pytest.mark.integration

SIZE, PAD = 32, 2
NUM_SAMPLES, CHAIN_SAMPLES, CHAIN_STEPS, DDIM_STEPS = 9, 3, 4, 6
EMA_DECAY = 0.9


def _grid_size(rows: int, columns: int) -> tuple[int, int]:
    """(width, height) of torchvision's make_grid with padding 2 around and between images."""
    return columns * (SIZE + PAD) + PAD, rows * (SIZE + PAD) + PAD


def _tiny_module() -> DiffusionModule:
    return DiffusionModule(
        net=unet_spec(image_size=SIZE, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()),
        num_timesteps=100,
        lr_schedule={"warmup_steps": 1},
    )


def _callback(**settings: Any) -> SamplingCallback:
    return SamplingCallback(
        **{"every_n_steps": 2, **settings},
        num_samples=NUM_SAMPLES,
        chain_samples=CHAIN_SAMPLES,
        chain_steps=CHAIN_STEPS,
        sampler=SamplerConfig("ddim", DDIM_STEPS),
    )


def _fit(
    root: Path, logger: object, max_steps: int, **settings: Any
) -> tuple[L.Trainer, DiffusionModule, SamplingCallback]:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.rand(32, 1, SIZE, SIZE) * 2 - 1), batch_size=8)
    module, callback = _tiny_module(), _callback(**settings)
    trainer = L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[callback, *default_callbacks(EMA_DECAY, progress_bar=False)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    return trainer, module, callback


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[L.Trainer, DiffusionModule, SamplingCallback]:
    root = tmp_path_factory.mktemp("tb_run")
    return _fit(root, TensorBoardLogger(root, name="tb"), max_steps=4)


def test_chain_timesteps_are_evenly_spaced_and_start_at_x_T() -> None:
    visited = list(range(99, -1, -1))  # the 100 timesteps DDPM visits
    assert chain_timesteps(visited, 4) == [99, 66, 33, 0]  # indices 0, 33, 66, 99
    assert chain_timesteps(visited[:3], 10) == visited[:3]  # never more columns than visited steps


def test_pngs_every_n_steps_with_grid_and_chain_sizes(tensorboard_run) -> None:
    trainer, _, callback = tensorboard_run
    folder = Path(trainer.log_dir) / "samples"
    # sampled at steps 2 and 4; the end of training (step 4 again) adds nothing
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == [f"step_{s:07d}_ddim{DDIM_STEPS}_{kind}.png" for s in (2, 4) for kind in ("chain", "grid")]
    side = round(NUM_SAMPLES**0.5)
    assert Image.open(folder / f"step_0000004_ddim{DDIM_STEPS}_grid.png").size == _grid_size(side, side)
    # one row per chain sample; CHAIN_STEPS snapshots x_T ... plus the final x_0
    chain = Image.open(folder / f"step_0000004_ddim{DDIM_STEPS}_chain.png")
    assert chain.size == _grid_size(CHAIN_SAMPLES, CHAIN_STEPS + 1)


@pytest.mark.parametrize(("every_n_steps", "on_train_end", "steps"), [(None, True, [3]), (2, False, [2])])
def test_sampling_only_when_training_ends_or_only_periodically(tmp_path, every_n_steps, on_train_end, steps) -> None:
    trainer, _, _ = _fit(tmp_path, False, 3, every_n_steps=every_n_steps, on_train_end=on_train_end)
    names = sorted(p.name for p in (tmp_path / "samples").glob("*_grid.png"))
    assert names == [f"step_{s:07d}_ddim{DDIM_STEPS}_grid.png" for s in steps]


def test_tensorboard_event_file_holds_grid_and_chain(tensorboard_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _, _ = tensorboard_run
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    tag = f"samples/ddim{DDIM_STEPS}"
    assert {f"{tag}_grid", f"{tag}_chain"} <= set(events.Tags()["images"])
    grids = events.Images(f"{tag}_grid")
    side = round(NUM_SAMPLES**0.5)
    assert [g.step for g in grids] == [2, 4]
    assert (grids[-1].width, grids[-1].height) == _grid_size(side, side)


def test_chain_last_column_is_the_grid_sample_and_first_is_noise(tensorboard_run) -> None:
    trainer, module, callback = tensorboard_run
    folder = Path(trainer.log_dir) / "samples"
    grid = np.asarray(Image.open(folder / f"step_0000004_ddim{DDIM_STEPS}_grid.png"))
    chain = np.asarray(Image.open(folder / f"step_0000004_ddim{DDIM_STEPS}_chain.png"))

    def tile(image: np.ndarray, row: int, col: int) -> np.ndarray:
        top, left = PAD + row * (SIZE + PAD), PAD + col * (SIZE + PAD)
        return image[top : top + SIZE, left : left + SIZE]

    # sample 0 of the grid is the x_0 column of the strip's first row
    assert np.array_equal(tile(chain, 0, CHAIN_STEPS), tile(grid, 0, 0))
    # x_T is N(0, I) noise: about 1/2 of the pixels of [-1, 1] clamp at 0 or 255 (P(|z| > 1) = 0.317)
    noise = tile(chain, 0, 0).astype(float)
    assert 0.2 < np.isin(noise, (0, 255)).mean() < 0.45


def test_same_seed_gives_the_same_grid(tensorboard_run) -> None:
    _, module, callback = tensorboard_run
    kwargs = dict(sampler=SamplerConfig("ddim", DDIM_STEPS, eta=0.0))
    first = render_samples(module, 4, 2, 3, seed=callback.seed, **kwargs)[1]
    again = render_samples(module, 4, 2, 3, seed=callback.seed, **kwargs)[1]
    other = render_samples(module, 4, 2, 3, seed=callback.seed + 100, **kwargs)[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(("sampler", "spacing", "label"), [("dpmpp_2m", "uniform", "dpmpp_2m5"),
                                                        ("ddpm", "quadratic", "ddpm5_quad")])  # fmt: skip
def test_every_sampler_renders_its_chain_and_names_its_files(tmp_path: Path, sampler, spacing, label) -> None:
    module = _tiny_module()
    config = SamplerConfig(sampler, 5, spacing=spacing)
    x0, grid, strip = render_samples(module, 4, 2, 3, sampler=config, seed=0)
    assert x0.shape == (4, 1, SIZE, SIZE) and tuple(strip.shape[1:]) == _grid_size(2, 3 + 1)[::-1]
    callback = SamplingCallback(sampler=config)
    callback.setup(mock.Mock(log_dir=str(tmp_path)), module, "fit")
    assert callback.label == label


def test_csv_run_gets_the_png_files(tmp_path: Path) -> None:
    trainer, _, _ = _fit(tmp_path, CSVLogger(tmp_path, name="csv"), max_steps=2)
    folder = Path(trainer.log_dir) / "samples"
    assert folder.parent == tmp_path / "csv" / "version_0"
    assert sorted(p.name for p in folder.glob("*.png")) == [
        f"step_0000002_ddim{DDIM_STEPS}_chain.png",
        f"step_0000002_ddim{DDIM_STEPS}_grid.png",
    ]


def test_wandb_gets_uint8_hwc_arrays() -> None:
    logger = mock.create_autospec(WandbLogger, instance=True)
    image = torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8)
    assert log_image(logger, "samples/ddim50_grid", image, step=7)
    logger.log_image.assert_called_once()
    kwargs = logger.log_image.call_args.kwargs
    (array,) = kwargs["images"]
    assert array.dtype == np.uint8 and array.shape == (10, 14, 3)
    assert np.array_equal(array, image.permute(1, 2, 0).numpy())
    assert kwargs["key"] == "samples/ddim50_grid" and kwargs["step"] == 7


def test_csv_logger_takes_no_images(tmp_path: Path) -> None:
    assert not log_image(CSVLogger(tmp_path), "samples/x", torch.zeros(3, 4, 4, dtype=torch.uint8), step=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"sampler": "euler"}, "allowed: ddpm, ddim"),
        ({"num_samples": 0}, "num_samples"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingCallback(**kwargs)


def test_ddim_steps_beyond_T_fail_at_setup(tmp_path: Path) -> None:
    callback = SamplingCallback(sampler=SamplerConfig("ddim", 1000))  # the tiny model has T = 100
    trainer = mock.Mock(log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100\]"):
        callback.setup(trainer, _tiny_module(), "fit")


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [
        ("dpmpp_2m", SamplerConfig("dpmpp_2m", 50)),  # a bare name: 50 steps, as the default
        ({"name": "ddim", "steps": 6, "eta": 1.0}, SamplerConfig("ddim", 6, eta=1.0)),
        (SamplerConfig("ddim", 8, spacing="quadratic"), SamplerConfig("ddim", 8, spacing="quadratic")),
    ],
)
def test_the_sampler_is_a_setting_a_mapping_or_a_name(sampler: Any, expected: SamplerConfig) -> None:
    assert SamplingCallback(sampler=sampler).sampler == expected
