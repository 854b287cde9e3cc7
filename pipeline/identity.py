"""What a result is computed from: a training run's identity, and which of its inputs changed.

A run's identity covers every input that changes its weights:
- `config`: the resolved training config, without the paths of its inputs (their contents follow) and
  without the keys that change only speed or bookkeeping (threads, eval_every, eval_last, tables);
- `data`: the prepared dataset's content hash (meta.json `data_hash`);
- `inputs`: the sha256 of each checkpoint the run reads (kd.teacher, mi.teacher, partial_init, init);
- `code`: the sha256 of the training stage's source: pipeline/train.py and every module of the package it
  imports, directly or not (stage_code, found by walking the imports);
- `libraries`: the torch and timm versions.

`train` resumes a checkpoint only when its recorded identity equals the current one, and otherwise starts
over, naming what changed; `evaluate` and `report` refuse a result whose identity is not current. Paths
are not part of the identity, so the same study in another folder (a DVC experiment's temporary copy) has
the same identities.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from pathlib import Path

import timm
import torch

from pipeline.repo import REPO_ROOT

PACKAGE = "pipeline"
TRAIN_MODULE = "pipeline.train"
# Config keys that are input files: the identity holds their contents' hash, not their path.
INPUT_KEYS = (("kd", "teacher"), ("mi", "teacher"), (None, "partial_init"), (None, "init"))
# Config keys that change neither the weights nor the evaluation.
SPEED_KEYS = ("threads", "eval_every", "eval_last", "tables")

_file_hashes: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (cached per process by path, size and modification time)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _file_hashes[key] = h.hexdigest()
    return _file_hashes[key]


def check_model_file(path: str | os.PathLike, what: str) -> None:
    """A run's model.pt against the sha256 its training recorded in metrics.json beside it: a file changed since
    (a damaged disk, a partial copy) is an error naming it, never read as the run's model."""
    path = Path(path)
    record = path.parent / "metrics.json"
    if path.name != "model.pt" or not record.is_file():
        return
    try:
        recorded = json.loads(record.read_text()).get("model_sha256")
    except ValueError:
        return
    if recorded and file_digest(path) != recorded:
        raise ValueError(f"{what} {path}: its bytes do not match the sha256 its training recorded ({record}): "
                         f"damaged since it was written; delete its run folder to retrain it")


# ------------------------------------------------------------------------------------------------ code
def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The source file of a module of the package (`pipeline.x.y`), or None for anything else."""
    if module.split(".")[0] != PACKAGE:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def imported_modules(module: str, root: Path = REPO_ROOT) -> set[str]:
    """The package's modules that `module` imports anywhere in its file (function-level imports included), each
    with the packages it lives in (importing `pipeline.models.adavit` runs `pipeline/models/__init__.py` first)."""
    path = module_file(module, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from .riformer import y`
                parent = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    parts = [name.split(".") for name in names]
    found = {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)}
    return {m for m in found if m != module and module_file(m, root) is not None}


@functools.cache
def stage_code(module: str, root: Path = REPO_ROOT) -> tuple[str, ...]:
    """The source files a stage's results depend on: its module and every module of the package it imports,
    directly or through others (repository-relative paths, sorted)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imported_modules(m, root) - seen
    return tuple(sorted(str(module_file(m, root).relative_to(root)) for m in seen))


def code_digest(module: str = TRAIN_MODULE, root: Path = REPO_ROOT) -> str:
    """sha256 over the (path, content) pairs of stage_code(module)."""
    h = hashlib.sha256()
    for rel in stage_code(module, root):
        h.update(rel.encode() + b"\0" + bytes.fromhex(file_digest(root / rel)))
    return h.hexdigest()


def _short(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg, data_hash: str) -> dict:
    """The identity of training `cfg` (a TrainConfig) on the prepared data whose hash is `data_hash`.

    An input file that does not exist yet has identity None (a teacher not trained yet): such an identity
    never equals that of a run trained from the file."""
    config = cfg.to_dict()
    for key in SPEED_KEYS:
        config.pop(key, None)
    config["data"].pop("path")
    config["data"].pop("decoded_cache_mb")  # speed only: the same pixels, decoded once or every epoch
    inputs = {}
    for section, key in INPUT_KEYS:
        node = config[section] if section else config
        path = node.pop(key)
        if path:
            inputs[f"{section}.{key}" if section else key] = file_digest(path)[:16] if os.path.isfile(path) else None
    return {"config": _short(config), "data": data_hash[:16], "inputs": inputs, "code": code_digest()[:16],
            "libraries": f"torch {torch.__version__}, timm {timm.__version__}"}


def identity_changes(recorded: dict | None, current: dict) -> list[str]:
    """What differs between a recorded identity and the current one, in words ([] when they are equal)."""
    if not recorded:
        return ["no recorded identity (written by an older version of the pipeline)"]
    names = {"config": "training config", "data": "prepared data", "code": "training code",
             "libraries": "torch/timm versions"}
    changes = [f"{names[k]} ({recorded.get(k)} -> {current[k]})" for k in names if recorded.get(k) != current[k]]
    old, new = recorded.get("inputs", {}), current["inputs"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"{key} file ({old.get(key)} -> {new.get(key)})")
    return changes
