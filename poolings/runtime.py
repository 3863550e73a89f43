"""What the computing commands share: devices, threads, run folders and checkpoints.

Each function checks what a user typed and fails with a one-line ``ValueError`` /
``OSError`` that says what was wrong and what to do; the ``argminlayers`` command prints such
errors as they are, without a traceback.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``'auto'`` → ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; otherwise ``torch.device(name)``.

    Raises ``ValueError`` for a name torch does not know and for a CUDA device that is absent.
    """
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name!r} was asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {name!r} was asked for, but there are {torch.cuda.device_count()} CUDA "
                             "devices; use cuda:0 or --device auto")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise ValueError(f"device: {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)``, and the same limit on the BLAS libraries threadpoolctl finds
    (SciPy's OpenBLAS, which rank pooling's CPU factorisations use); ``None`` keeps the settings."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads: must be an int >= 1, got {n!r}")
    torch.set_num_threads(n)
    import scipy.linalg  # noqa: F401  (loads the BLAS that threadpoolctl then limits)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")


def check_out_dir(out: str | os.PathLike, what: str = "out") -> Path:
    """``Path(out)``, refusing a path that is an existing file (or lies under one)."""
    path = Path(out)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(f"{what}: {p} is a file, not a folder; give a folder path (it is created if missing)")
        if p.exists():
            break
    return path


def prepare_run_folder(out: str | os.PathLike, outputs: Iterable[str], *, resume: bool = False,
                       overwrite: bool = False, check_only: bool = False) -> Path:
    """Make sure a run may write ``outputs`` (file or folder names) into ``out``.

    A folder that already holds any of them belongs to an earlier run: it is continued with
    ``resume``, cleared of those outputs first with ``overwrite`` (nothing else in the folder is
    touched), and refused otherwise, with a ``FileExistsError`` that names the flags.
    ``check_only`` checks without creating or removing anything.
    """
    path = check_out_dir(out)
    present = [name for name in outputs if (path / name).exists()]
    if present and not (resume or overwrite):
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        raise FileExistsError(f"out: {path} already holds a run ({shown}); pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
    if check_only:
        return path
    if present and overwrite and not resume:
        for name in present:
            target = path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, *, what: str = "checkpoint", hint: str = "",
                    weights_only: bool = False, require: str | None = "model") -> Any:
    """``torch.load`` of a checkpoint written by ``argminlayers train`` (a dict with a ``require``
    entry; ``require=None`` accepts any content, e.g. a state dict), with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist" + (f"; {hint}" if hint else ""))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:  # truncated zip, random bytes, pickle errors: all mean "not a checkpoint"
        reason = " ".join(str(exc).split())[:160]
        raise ValueError(f"{what}: {path} cannot be read; it is truncated or not a checkpoint "
                         f"({type(exc).__name__}: {reason})" + (f"; {hint}" if hint else "")) from exc
    if require is not None and (not isinstance(ckpt, dict) or require not in ckpt):
        raise ValueError(f"{what}: {path} is not a checkpoint of argminlayers train (no model state)"
                         + (f"; {hint}" if hint else ""))
    return ckpt
