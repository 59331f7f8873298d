"""Files: atomic writes, PNG images, grids and their uint8 pixels, JSON reports, the cache folder and a folder's lock
(one helper each).

Every file the project writes goes through :func:`atomic_write`: a temporary file in the target folder, renamed over
the target when complete, so a reader (or a run killed mid-write) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image
from torchvision.utils import make_grid

__all__ = [
    "FolderInUse",
    "atomic_folder",
    "atomic_write",
    "cache_dir",
    "check_output",
    "image_grid",
    "lock_folder",
    "save_grid",
    "save_png",
    "to_uint8",
    "write_json",
]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map model-range images to uint8 in [0, 255]; samples may overshoot [-1, 1], so clamp first."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``; returns ``path``.

    The rename is atomic within a folder. The file gets the mode a plain ``open`` would give it under the current
    umask (0644 under umask 0022), so teammates on a shared cluster can read checkpoints and images.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_output(path: str | Path, option: str = "--out", *, folder: bool = False) -> Path:
    """Refuse, before any work, an output that could not be written at the end: ``path`` (a file, or a folder with
    ``folder``) must not exist as the other kind, and its nearest existing folder must be writable (the missing folders
    are created when writing). ``option`` is how the user gave ``path``. Returns ``path``."""
    path = Path(path).expanduser()
    want = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise FileExistsError(f"{option} {path} is an existing {'folder' if path.is_dir() else 'file'}: give a {want}")
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"{option} {path}: {parent} is a file, so the {want} cannot be created there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {parent} is not writable")
    return path


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """``with atomic_folder(out) as tmp:`` write files into ``tmp``, a fresh folder beside ``out``; they appear in
    ``out`` only when the block completes (a new ``out`` is the renamed ``tmp``; into an existing folder each file
    is moved, replacing a file of the same name). An error or a kill inside the block leaves ``out`` as it was.

    Raises FileExistsError when ``out`` is an existing file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is an existing file, not a folder: choose a folder for the output")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(mode=0o777)
    try:
        yield tmp
        if path.is_dir():
            for item in tmp.iterdir():
                os.replace(item, path / item.name)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FolderInUse(FileExistsError):
    """Another live process holds the lock of a folder (:func:`lock_folder`)."""


def lock_folder(folder: str | Path, name: str, way_out: str) -> IO[str] | None:
    """Take the lock file ``folder/name`` for as long as the returned file stays open (``close()`` releases it).

    An exclusive ``fcntl.flock``: the kernel releases it when the process ends, however it ends, so a killed process
    leaves no lock behind (the file stays, unlocked; it holds the holder's host and process id, for the message).
    :class:`FolderInUse`, one line naming the folder, the holder and ``way_out``, when a live process holds it; the
    folder is created if needed, nothing in it is written then. None, with a warning, on a file system without locks.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    lock = open(path, "a+")  # held open for the life of the run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise FolderInUse(f"{folder} is in use by {holder} (lock {path}): {way_out}") from None
    except OSError as err:
        lock.close()
        warnings.warn(
            f"cannot lock {path} ({err}): another run into {folder} at the same time is not refused", stacklevel=2
        )
        return None
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/ddpm-lightning/<parts>`` (``~/.cache/ddpm-lightning/...`` when the variable is unset or
    empty): the one place where weights, classifiers and real-image statistics are cached."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "ddpm-lightning", *parts)


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """A uint8 (3, H', W') grid, about square unless ``nrow`` is given, of images (B, C, H, W) in [-1, 1]."""
    nrow = nrow or max(1, round(len(images) ** 0.5))
    return make_grid(to_uint8(images.detach().cpu()), nrow=nrow, padding=2, pad_value=255)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a uint8 (C, H, W) tensor as a PNG file, atomically."""
    array = image.permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save images (B, C, H, W) in [-1, 1] as one grid PNG."""
    return save_png(image_grid(images, nrow), path)
