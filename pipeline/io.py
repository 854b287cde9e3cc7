"""Atomic file output, model checkpoints and the per-image predictions the evaluate stage saves.

Every result file is written to a temporary file in the same folder, flushed to disk and renamed over
the target, so a killed run never leaves a half-written file that looks like a result.
Checkpoints hold only tensors and plain containers, so they load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

import pipeline.models  # noqa: F401  (registers the project's models)


class WriteError(OSError):
    """A result file that could not be written: the first line names the file and the cause (disk full,
    permission denied, a read-only folder)."""


def _write_error(path: Path, e: OSError) -> WriteError:
    return WriteError(e.errno, f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path` atomically. An OSError on the way is
    raised again as a WriteError that names `path` and the cause."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except WriteError:
        raise
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a new empty folder beside `path`; on success it takes `path`'s place (the old one is moved aside, then
    removed), so a reader finds the old folder or the new one whole, never a mix; on an error (or a signal) the old
    one stays or is put back."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from e
    new, old = staging / "new", staging / "old"
    try:
        new.mkdir()
        yield new
        if path.exists():
            path.rename(old)
        new.rename(path)
    except BaseException as e:
        if old.exists() and not path.exists():
            old.rename(path)
        if isinstance(e, OSError) and not isinstance(e, WriteError) and e.filename in (str(path), str(new)):
            raise _write_error(path, e) from e
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    # serialised in memory first: torch names the archive after a path it is given (here a random temporary
    # name), so equal checkpoints would differ in their bytes and in their hash (pipeline.identity); and torch's
    # writer reports a full disk as "unexpected pos", where a plain write says "No space left on device"
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by `save_checkpoint`; a truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a broken zip or pickle
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a pipeline checkpoint (needs 'model' and 'state_dict' keys)")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """Rebuild the model a checkpoint describes ({'model': name, 'model_kwargs': {...}}) and load it."""
    model = timm.create_model(ckpt["model"], **ckpt.get("model_kwargs", {}))
    model.load_state_dict(ckpt["state_dict"])
    return model


def save_predictions(path: str | os.PathLike, pred: torch.Tensor, labels: torch.Tensor) -> None:
    """Each test image's predicted class and label (eval/<run>.predictions.npz: the report's statistics)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, pred=pred.numpy().astype(np.int32), label=labels.numpy().astype(np.int32))


def load_predictions(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, label) of every test image, as `save_predictions` wrote them."""
    with np.load(path) as f:
        return f["pred"], f["label"]
