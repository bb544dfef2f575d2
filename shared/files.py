"""Files the toolkit writes for the user: atomic text writes and the user's normal permissions.

A run directory must never hold a half-written ``recipe.yaml``, ``plan.json`` or step result: a
process killed mid-write would leave a file a restarted run reads back as the truth. Text goes to
a ``.part`` file beside the target, is synced, and replaces the target with one rename.

Directories made with ``tempfile.mkdtemp`` are mode 0700 (files from ``mkstemp`` 0600) whatever
the user's umask; a result the user will share or serve (``final/``, an exported model) gets the
permissions a plain ``mkdir`` / ``open`` would have given it (``apply_user_mode``).

Importing this module loads no torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a reader sees either the old file or the whole new one.

    Args:
        path: the target file (its directory must exist).
        text: the content.

    Returns:
        The path written.
    """
    path = Path(path)
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_user_mode(root: str | Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir / open would give (0777 / 0666 & ~umask).

    Args:
        root: a directory (typically from ``tempfile.mkdtemp``) or a file.
    """
    mask = _umask()
    root = Path(root)
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, dir_mode if p.is_dir() else file_mode)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Write a directory in a temporary sibling, then swap it in for `target` in one rename.

    A reader never sees a half-written `target`: inside the block the caller fills the yielded
    directory; on success the old `target` (if any) is set aside, the new one renamed into place,
    and the old one deleted. On an error the temporary directory is removed and `target` is left
    as it was. The result gets the user's normal modes (``mkdtemp`` makes 0700).

    Yields:
        The temporary directory to write into.
    """
    out = Path(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_user_mode(tmp)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tensor_files(directory: str | Path) -> dict[str, Path] | None:
    """Where each tensor of a safetensors checkpoint lives: tensor name -> file.

    One ``model.safetensors``, or the shards ``model.safetensors.index.json`` names; None when the
    directory has neither (the caller says what it needed them for).
    """
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        import json

        return {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = d / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open  # only where a checkpoint is read

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)  # noqa: SIM118 (safe_open is not iterable)
    return None
