"""The real-image statistics cache: one key and one file name for the FID callback and ``ddpm evaluate``.

Statistics are reused only when everything they depend on matches: the data set, the split, the resolution, the
number of images and the feature extractor with the digest of its weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["file_digest", "real_stats_key", "real_stats_name"]


def real_stats_key(
    dataset: str, split: str, resolution: str, num_images: int, extractor: str, extractor_sha256: str
) -> dict[str, Any]:
    """What the real statistics depend on; a cache entry is only reused when all of it matches."""
    return {
        "dataset": dataset,
        "split": split,
        "resolution": resolution,
        "extractor": extractor,
        "extractor_sha256": extractor_sha256,
        "num_images": num_images,
    }


def real_stats_name(key: Mapping[str, Any]) -> str:
    """The cache file name (without extension) of a :func:`real_stats_key`."""
    name = "-".join(str(key[k]) for k in ("dataset", "split", "resolution", "num_images", "extractor"))
    return f"{name}-{key['extractor_sha256'][:16]}"


def file_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes (a weights file), read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
