"""Kill-safe writes: a file or a checkpoint is either the old complete one or the new complete one.

- ``atomic_write(path)``: write a temporary file next to ``path``, fsync, ``os.replace`` it into place.
  Used for ``summary.json``, ``metrics.csv``'s rewrite, the reference log-prob cache and file checkpoints.
- ``AtomicCheckpointIO``: Lightning's checkpoint file (single process, DDP) through ``atomic_write``,
  with the temporary file in the checkpoint's own folder (Lightning's writes it to the system temp
  folder and moves it, which is a copy, not a rename, when that is another filesystem).
- ``DeepSpeedStrategy``: DeepSpeed's sharded checkpoint folder. All ranks write a fresh hidden
  sibling ``.last.ckpt-<id>``; after a barrier rank 0 points the symlink ``last.ckpt`` at it with one
  ``os.replace`` and removes the folder it pointed at before. ``last.ckpt`` always resolves to a
  complete checkpoint; a kill leaves at most an unreferenced folder, removed by the next save.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy

log = logging.getLogger(__name__)
TMP_SUFFIX = ".tmp"


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder: ``.<name>.<random>.tmp`` (same filesystem, so a rename)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporary files ``atomic_write`` left next to ``path`` when its process was killed mid-write."""
    return sorted(path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"))


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``with atomic_write(path) as handle:`` write ``handle``; on a clean exit it replaces ``path`` in one
    rename. On an exception the temporary file is removed and ``path`` is untouched; after a kill,
    ``path`` is untouched and a hidden ``.<name>.<random>.tmp`` may remain (``stale_temporaries``)."""
    if "w" not in mode:
        raise ValueError(f"atomic_write mode={mode!r}: only a fresh write ('w' or 'wb') can be atomic")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    handle = open(tmp, mode.replace("w", "x"), **open_kwargs)
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        os.replace(tmp, path)
    except BaseException:
        handle.close()
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through ``atomic_write``: a kill mid-save leaves the
    previous checkpoint file loadable. Remote paths (``s3://``...) keep Lightning's own transaction."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        for stale in stale_temporaries(path):  # a killed save's leftovers: as large as a checkpoint
            stale.unlink(missing_ok=True)
        with atomic_write(path, "wb") as handle:
            self.dump(checkpoint, handle)

    def dump(self, checkpoint: dict[str, Any], handle: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temporary file (streamed: no second copy in memory)."""
        torch.save(checkpoint, handle)


# ---- sharded checkpoint folders -----------------------------------------------------------------
def version_prefix(final: Path) -> str:
    return f".{final.name}-"


def new_version(final: Path, token: str) -> Path:
    """The hidden sibling folder a new version of ``final`` is written to: ``.<name>-<token>``."""
    return final.with_name(version_prefix(final) + token)


def current_version(final: Path) -> Path | None:
    """The folder the symlink ``final`` points at (None if ``final`` is not such a symlink)."""
    if not final.is_symlink():
        return None
    return final.parent / os.readlink(final)


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def remove_unreferenced_versions(final: Path) -> None:
    """Remove every ``.<name>-*`` sibling except the one ``final`` points at (killed or replaced saves),
    and any temporary link a kill left before its rename."""
    for stale in stale_temporaries(final):
        remove_path(stale)
    keep = current_version(final)
    for version in final.parent.glob(version_prefix(final) + "*"):
        if keep is None or version.name != keep.name:
            remove_path(version)


def publish_version(final: Path, version: Path) -> None:
    """Point ``final`` at the complete folder ``version`` in one rename, then drop the older versions.

    A ``final`` that is a real folder or file (written before checkpoints were versioned) is first
    moved aside as a version itself: only during that one-time conversion, between two renames, is
    ``final`` missing (the complete old checkpoint is then ``.<name>-legacy-*``)."""
    if final.exists() and not final.is_symlink():
        os.replace(final, new_version(final, "legacy-" + secrets.token_hex(4)))
    link = temporary_sibling(final)
    link.symlink_to(version.name, target_is_directory=True)  # relative: the folder can be moved whole
    os.replace(link, final)
    fsync_folder(final.parent)
    remove_unreferenced_versions(final)


class DeepSpeedStrategy(LightningDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (same name and arguments: the planner reads it as one) whose
    sharded checkpoint is published only once every rank wrote its part:
    ``last.ckpt`` is a symlink to a complete ``.last.ckpt-<id>`` folder at every instant, so
    ``ckpt_path=last`` after a kill mid-save resumes the previous checkpoint. Every rank runs the
    same collectives (two broadcasts, three barriers, DeepSpeed's own)."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        final = Path(self.broadcast(str(filepath)))
        token = self.broadcast(secrets.token_hex(6))
        version = new_version(final, token)
        if self.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_unreferenced_versions(final)  # space for the new one: a 7B ZeRO-3 checkpoint is ~100 GB
        self.barrier("atomic_checkpoint_start")
        self.write_shards(checkpoint, version, storage_options)  # ends with DeepSpeed's barrier: all written
        self.barrier("atomic_checkpoint_written")
        if self.is_global_zero:
            publish_version(final, version)
        self.barrier("atomic_checkpoint_published")

    def write_shards(self, checkpoint: dict, folder: Path, storage_options: Any | None) -> None:
        """Every rank writes its part of the checkpoint into ``folder`` (DeepSpeed's own layout)."""
        super().save_checkpoint(checkpoint, str(folder), storage_options)

    def remove_checkpoint(self, filepath) -> None:
        """Remove a published checkpoint: the symlink and the folder it points at (rank 0)."""
        if not self.is_global_zero:
            return
        final = Path(filepath)
        version = current_version(final)
        remove_path(final)
        if version is not None:
            remove_path(version)
