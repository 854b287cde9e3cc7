"""`python -m pipeline prepare-data`: validate a dataset and write the prepared copy every stage reads.

Two sources:
- `fashion-mnist`: the four IDX files (gzipped or not), by default from the Debian package
  `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist). Checked against the known md5 and size of
  the decompressed bytes (the Debian package recompresses the .gz files). The prepared copy is uint8
  tensors, which train fast on a CPU.
- `imagefolder`: ImageNet-style `train/<class>/*` and `val/<class>/*`. Validated (same classes in both
  splits, no empty class folder, every image readable to the depth `data.check_images` asks: none, header,
  full) by a pool of threads, and indexed; training reads the images through timm's transforms.

The prepared folder holds `meta.json` with a content hash (`data_hash`) that every downstream run records.
It is written to a temporary folder and renamed into place, so a killed run never leaves a half-written
folder that looks prepared.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from pipeline import tracking
from pipeline.data import (
    DEBIAN_FASHION_MNIST,
    EIGHT_BIT_MODES,
    FASHION_MNIST_FILES,
    DataError,
    find_fashion_mnist,
    hash_tensors,
    idx_file,
)
from pipeline.study import load_study

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
# data.check_images: how much of each image file prepare-data reads (scan_imagefolder)
CHECK_MODES = ("none", "header", "full")
CHUNK = 256  # files per task of the scan's threads: few enough tasks for 1.28 M files, enough to share them out


# ----------------------------------------------------------------------------------------------- IDX files
def read_idx_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file ({e})") from None


def parse_idx(data: bytes, path: Path) -> torch.Tensor:
    """Parse an IDX file of unsigned bytes (magic 0x00000800 | ndim)."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise DataError(f"{path}: truncated or padded IDX file: {len(data)} bytes, header says {expected}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(raw_dir: str | None, verify: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    d = find_fashion_mnist(raw_dir)
    arrays = {}
    for name, (md5, size) in tqdm(FASHION_MNIST_FILES.items(), desc="read IDX", leave=False):
        path = idx_file(d, name)
        data = read_idx_bytes(path)
        if verify and (len(data) != size or hashlib.md5(data).hexdigest() != md5):
            raise DataError(f"{path}: checksum mismatch: decompressed {len(data)} bytes with md5 "
                            f"{hashlib.md5(data).hexdigest()}, expected {size} bytes with md5 {md5}")
        arrays[name] = parse_idx(data, path)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{d}: {prefix} images must be N x H x W and labels N, got {tuple(images.shape)} "
                            f"and {tuple(labels.shape)}")
        if len(images) != len(labels):
            raise DataError(f"{idx_file(d, prefix + '-labels-idx1-ubyte')}: {len(labels)} labels for "
                            f"{len(images)} images in {idx_file(d, prefix + '-images-idx3-ubyte')}")
        if int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{idx_file(d, prefix + '-labels-idx1-ubyte')}: label {int(labels.max())} "
                            f"out of range for {len(FASHION_MNIST_CLASSES)} classes")
        splits[split] = (images, labels.long())
    return splits


def stratified_subset(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """Indices of a class-balanced subset of size n (all indices, in order, if n is None or too large)."""
    if n is None or n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    per_class = [idx[torch.randperm(len(idx), generator=g)] for idx in per_class]
    take = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    return torch.cat([idx[:k] for idx, k in zip(per_class, take, strict=True)]).sort().values


# -------------------------------------------------------------------------------------------- image folders
def scan_imagefolder(root: str | os.PathLike, check_images: str = "header", workers: int | None = None) -> dict:
    """Validate `root/train/<class>/*` and `root/val/<class>/*`; return an index of (path, label), sorted, with each
    file's size in bytes (`sizes`, the dataset's identity: _prepare_imagefolder).

    `check_images` is how much of each file is read: `none` nothing (the folder structure and the sizes only; an
    empty file is still refused), `header` the header (PIL's verify(): a truncated JPEG passes, and fails when
    training reaches it), `full` every pixel (decoded to RGB as training does). `workers` threads (default: one per
    CPU) list the folders and check the files: file I/O and PIL's decoders release the GIL. Every problem found is
    listed in one DataError."""
    root, check = Path(root), check_mode(check_images)
    classes = _class_folders(root)
    folders = [(split, label, cls) for split in ("train", "val") for label, cls in enumerate(classes)]
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        listed = list(pool.map(_image_files, [root / split / cls for split, _, cls in folders]))
        splits, problems = {"train": [], "val": []}, []
        for (split, label, cls), names in zip(folders, listed, strict=True):
            if not names:
                problems.append(f"{root / split / cls}: empty class folder (no image files)")
            splits[split] += [(os.path.join(split, cls, name), label) for name in names]
        rels = [rel for items in splits.values() for rel, _ in items]
        sizes = {}
        with tqdm(total=len(rels), desc=f"check images ({check})", unit="file", delay=2, leave=False) as bar:
            chunks = [rels[i:i + CHUNK] for i in range(0, len(rels), CHUNK)]
            for chunk, checked in zip(chunks, pool.map(partial(_check_files, root, check), chunks), strict=True):
                for rel, (size, problem) in zip(chunk, checked, strict=True):
                    sizes[rel] = size
                    problems += [problem] if problem else []
                bar.update(len(chunk))
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"{root}: {len(problems)} problem(s) in the image folders:\n  {shown}{more}")
    return {"classes": classes, "train": splits["train"], "test": splits["val"], "sizes": sizes}


def check_mode(check_images: str | bool) -> str:
    """A valid data.check_images mode (True and False, the former switch, read as header and none)."""
    mode = {True: "header", False: "none"}.get(check_images, check_images)
    if mode not in CHECK_MODES:
        raise DataError(f"check_images {check_images!r}: unknown mode; one of {', '.join(CHECK_MODES)}")
    return mode


def _class_folders(root: Path) -> list[str]:
    """The class folder names, the same in train/ and val/."""
    if not root.is_dir():
        raise DataError(f"{root}: image-folder dataset root not found")
    class_lists = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{d}: missing split folder (expected {root}/train/<class>/ and {root}/val/<class>/)")
        class_lists[split] = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not class_lists[split]:
            raise DataError(f"{d}: no class folders")
    if class_lists["train"] != class_lists["val"]:
        only_train = sorted(set(class_lists["train"]) - set(class_lists["val"]))
        only_val = sorted(set(class_lists["val"]) - set(class_lists["train"]))
        raise DataError(f"{root}: class folders differ between train and val: only in train {only_train[:10]}, "
                        f"only in val {only_val[:10]}")
    return class_lists["train"]


def _image_files(folder: Path) -> list[str]:
    """The sorted names of a class folder's image files (scandir: no stat per file)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)


def _check_files(root: Path, check: str, rels: list[str]) -> list[tuple[int, str | None]]:
    return [_image_problem(root / rel, check) for rel in rels]


def _image_problem(path: Path, check: str) -> tuple[int, str | None]:
    """The file's size and what is wrong with it (None when PIL reads it to the depth `check` asks)."""
    size = path.stat().st_size
    if size == 0:
        return size, f"{path}: unreadable image (empty file)"
    if check == "none":
        return size, None
    try:
        with Image.open(path) as im:
            if im.mode not in EIGHT_BIT_MODES:
                return size, (f"{path}: image mode {im.mode} (more than 8 bits per channel, or float): decoding it to "
                              f"8-bit RGB would clip its values; convert it to 8 bits per channel")
            if check == "header":
                im.verify()
            else:
                im.convert("RGB")  # decodes every pixel, as training does
    except Exception as e:  # PIL raises many types for broken files
        return size, f"{path}: unreadable image ({type(e).__name__}: {e})"
    return size, None


# ------------------------------------------------------------------------------------------------ prepare
def prepare(source: str, out: str | os.PathLike, raw_dir: str | None = None, root: str | None = None,
            train_subset: int | None = None, test_subset: int | None = None, seed: int = 0,
            check_images: str = "header", workers: int | None = None, verify: bool = True) -> dict:
    """Write the prepared copy of a dataset to `out` (atomically: into a temporary folder renamed into place) and
    return its meta.json."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    subsets = {"train": train_subset, "test": test_subset}
    try:
        if source == "fashion-mnist":
            meta = _prepare_fashion_mnist(tmp, load_fashion_mnist(raw_dir, verify), subsets, seed)
        elif source == "imagefolder":
            if not root:
                raise DataError("imagefolder source needs a dataset root (data.root in params or --root)")
            meta = _prepare_imagefolder(tmp, Path(root), scan_imagefolder(root, check_images, workers), subsets,
                                        seed)
        else:
            raise DataError(f"unknown data source {source!r} (fashion-mnist | imagefolder)")
        meta.update(train_subset=train_subset, test_subset=test_subset, subset_seed=seed)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _prepare_fashion_mnist(folder: Path, splits: dict, subsets: dict, seed: int) -> dict:
    """The splits' (subset) uint8 tensors as <split>.pt; their meta, hashed over the tensors."""
    tensors, counts = [], {}
    for split, n in subsets.items():
        images, labels = splits[split]
        idx = stratified_subset(labels, n, seed)
        images, labels = images[idx].clone(), labels[idx].clone()
        torch.save({"images": images, "labels": labels}, folder / f"{split}.pt")
        tensors += [images, labels]
        counts[split] = len(labels)
    return {"source": "fashion-mnist", "format": "tensors", "classes": FASHION_MNIST_CLASSES,
            "num_classes": len(FASHION_MNIST_CLASSES), "in_chans": 1, "image_size": [28, 28],
            "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD, "counts": counts,
            "data_hash": hash_tensors(*tensors)}


def _prepare_imagefolder(folder: Path, root: Path, index: dict, subsets: dict, seed: int) -> dict:
    """The (subset) index of the image files as index.json; its meta, hashed over the index (paths relative to the
    root, labels) and the files' sizes, which stand in for the bytes of a huge dataset. Neither the root nor the
    modification times enter the hash, so a copy of the folder elsewhere (a node's scratch disk) is the same data and
    its checkpoints and results stay valid; the price: a file rewritten with the same size is not noticed."""
    sizes = index.pop("sizes")
    for split, n in subsets.items():
        labels = torch.tensor([label for _, label in index[split]])
        index[split] = [index[split][i] for i in stratified_subset(labels, n, seed).tolist()]
    (folder / "index.json").write_text(json.dumps(index))
    index_sha256 = hashlib.sha256((folder / "index.json").read_bytes()).hexdigest()  # checked when read
    h = hashlib.sha256(json.dumps(index, sort_keys=True).encode())
    for rel, _ in index["train"] + index["test"]:
        h.update(f"{rel}:{sizes[rel]}".encode())
    return {"source": "imagefolder", "format": "imagefolder", "root": str(root.resolve()),
            "classes": index["classes"], "num_classes": len(index["classes"]), "in_chans": 3,
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "counts": {s: len(index[s]) for s in ("train", "test")}, "data_hash": h.hexdigest(),
            "index_sha256": index_sha256}


# ----------------------------------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> dict:
    if args.profile:
        study = load_study(args.profile)
        d = study.settings["data"]
        args.source, args.raw_dir, args.root = d["source"], d.get("raw_dir"), d.get("root")
        args.train_subset, args.test_subset, args.seed = d.get("train_subset"), d.get("test_subset"), d["seed"]
        args.check_images = args.check_images or d.get("check_images")  # the command line's, if given, wins
        args.out = args.out or study.data_dir
    if not args.out:
        raise SystemExit("prepare-data: give --out or --profile")
    meta = prepare(args.source, args.out, raw_dir=args.raw_dir, root=args.root, train_subset=args.train_subset,
                   test_subset=args.test_subset, seed=args.seed, check_images=args.check_images or "header",
                   workers=args.workers, verify=not args.no_verify)
    print(f"prepared {meta['source']}: {meta['counts']} -> {args.out} (data_hash {meta['data_hash'][:12]})")
    if args.profile:
        with tracking.stage_run(args.profile, "prepare-data", meta["source"]) as (mlflow, _):
            mlflow.log_params({k: str(v) for k, v in meta.items() if k not in ("classes",)})
            # registered here once, before any training job starts, so that parallel jobs find it
            tracking.log_dataset(mlflow, args.out, meta["source"], meta["data_hash"][:32], "prepared")
    return meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["fashion-mnist", "imagefolder"], default="fashion-mnist")
    p.add_argument("--raw-dir", help=f"folder of the Fashion-MNIST IDX files (default {DEBIAN_FASHION_MNIST})")
    p.add_argument("--root", help="image-folder dataset root with train/ and val/")
    p.add_argument("--train-subset", type=int, help="class-balanced subset of the training split")
    p.add_argument("--test-subset", type=int, help="class-balanced subset of the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draw")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the Fashion-MNIST checksums (other data in the same IDX format)")
    p.add_argument("--check-images", choices=CHECK_MODES,
                   help="how much of each image to read: none, header, full (default: the profile's, else header)")
    p.add_argument("--skip-image-check", dest="check_images", action="store_const", const="none",
                   help="same as --check-images none")
    p.add_argument("--workers", type=int, help="threads that check the images (default: one per CPU)")
    p.add_argument("--profile", help="take the data settings of params/<profile>.yaml (validated first)")
    p.add_argument("--out", help="prepared dataset folder to write (default with --profile: results/<profile>/data)")
