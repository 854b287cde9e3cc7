"""Dataset preparation (`python -m pipeline prepare-data`) and the loaders training reads.

Two sources:
- `fashion-mnist`: the four IDX files (gzipped or not), by default from the Debian package
  `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist). Checked against the known md5 and size of
  the decompressed bytes (the Debian package recompresses the .gz files). The prepared copy is uint8
  tensors, which train fast on a CPU.
- `imagefolder`: ImageNet-style `train/<class>/*` and `val/<class>/*`. Validated (same classes in both
  splits, no empty class folder, every image readable) and indexed; training reads the images through
  timm's transforms.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.io import read_json

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
# md5 and size of the decompressed IDX files (zalandoresearch/fashion-mnist).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", 47040016),
    "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", 60008),
    "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", 7840016),
    "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", 10008),
}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


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


def find_fashion_mnist(raw_dir: str | None) -> Path:
    candidates = [Path(raw_dir)] if raw_dir else [DEBIAN_FASHION_MNIST]
    for d in candidates:
        if d.is_dir() and all(_idx_file(d, name) for name in FASHION_MNIST_FILES):
            return d
    where = candidates[0]
    raise DataError(
        f"Fashion-MNIST not found in {where}: it needs the four IDX files "
        f"{', '.join(FASHION_MNIST_FILES)} (optionally .gz). Install them with "
        f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make setup` does this where apt is "
        f"available), or download them from the zalandoresearch/fashion-mnist repository and set "
        f"data.raw_dir in params (or --raw-dir) to their folder.")


def _idx_file(d: Path, name: str) -> Path | None:
    for candidate in (d / f"{name}.gz", d / name):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(raw_dir: str | None, verify: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    d = find_fashion_mnist(raw_dir)
    arrays = {}
    for name, (md5, size) in tqdm(FASHION_MNIST_FILES.items(), desc="read IDX", leave=False):
        path = _idx_file(d, name)
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
            raise DataError(f"{_idx_file(d, prefix + '-labels-idx1-ubyte')}: {len(labels)} labels for "
                            f"{len(images)} images in {_idx_file(d, prefix + '-images-idx3-ubyte')}")
        if int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{_idx_file(d, prefix + '-labels-idx1-ubyte')}: label {int(labels.max())} "
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
def scan_imagefolder(root: str | os.PathLike, check_images: bool = True) -> dict:
    """Validate `root/train/<class>/*` and `root/val/<class>/*`; return an index of (path, label)."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image-folder dataset root not found")
    splits, problems = {}, []
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
    classes = class_lists["train"]
    for split in ("train", "val"):
        items = []
        for label, cls in enumerate(classes):
            files = sorted(p for p in (root / split / cls).iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append(f"{root / split / cls}: empty class folder (no image files)")
            items += [(str(p.relative_to(root)), label) for p in files]
        if check_images:
            for rel, _ in tqdm(items, desc=f"check {split} images", leave=False):
                path = root / rel
                try:
                    if path.stat().st_size == 0:
                        raise OSError("empty file")
                    with Image.open(path) as im:
                        im.verify()
                except Exception as e:  # PIL raises many types for broken files
                    problems.append(f"{path}: unreadable image ({type(e).__name__}: {e})")
        splits[split] = items
    if problems:
        shown = "\n  ".join(problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"{root}: {len(problems)} problem(s) in the image folders:\n  {shown}{more}")
    return {"classes": classes, "train": splits["train"], "test": splits["val"]}


# ------------------------------------------------------------------------------------------------ prepare
def _hash_tensors(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def prepare(source: str, out: str | os.PathLike, raw_dir: str | None = None, root: str | None = None,
            train_subset: int | None = None, test_subset: int | None = None, seed: int = 0,
            check_images: bool = True, verify: bool = True) -> dict:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        if source == "fashion-mnist":
            splits = load_fashion_mnist(raw_dir, verify)
            tensors = []
            counts = {}
            for split, n in (("train", train_subset), ("test", test_subset)):
                images, labels = splits[split]
                idx = stratified_subset(labels, n, seed)
                images, labels = images[idx].clone(), labels[idx].clone()
                torch.save({"images": images, "labels": labels}, tmp / f"{split}.pt")
                tensors += [images, labels]
                counts[split] = len(labels)
            meta = {"source": source, "format": "tensors", "classes": FASHION_MNIST_CLASSES,
                    "num_classes": len(FASHION_MNIST_CLASSES), "in_chans": 1, "image_size": [28, 28],
                    "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD, "counts": counts,
                    "data_hash": _hash_tensors(*tensors)}
        elif source == "imagefolder":
            if not root:
                raise DataError("imagefolder source needs a dataset root (data.root in params or --root)")
            index = scan_imagefolder(root, check_images)
            for split, n in (("train", train_subset), ("test", test_subset)):
                labels = torch.tensor([label for _, label in index[split]])
                index[split] = [index[split][i] for i in stratified_subset(labels, n, seed).tolist()]
            (tmp / "index.json").write_text(json.dumps(index))
            h = hashlib.sha256(json.dumps(index, sort_keys=True).encode())
            for split in ("train", "test"):  # file sizes and mtimes stand in for the bytes of a huge dataset
                for rel, _ in index[split]:
                    st = (Path(root) / rel).stat()
                    h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
            meta = {"source": source, "format": "imagefolder", "root": str(Path(root).resolve()),
                    "classes": index["classes"], "num_classes": len(index["classes"]), "in_chans": 3,
                    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                    "counts": {s: len(index[s]) for s in ("train", "test")}, "data_hash": h.hexdigest()}
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


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Prepared:
    """A prepared dataset folder: its meta.json and, for tensors, the split tensors."""
    path: Path
    meta: dict

    @property
    def data_hash(self) -> str:
        return self.meta["data_hash"]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        obj = torch.load(self.path / f"{name}.pt", weights_only=True)
        return obj["images"], obj["labels"]


def load_prepared(path: str | os.PathLike) -> Prepared:
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise DataError(f"{path}: not a prepared dataset (no meta.json); run `python -m pipeline prepare-data`")
    return Prepared(path, read_json(path / "meta.json"))


class TensorBatches:
    """Batches from uint8 tensors: pad to `img_size`, scale, normalise; optional random-crop + flip.

    Shuffling uses a generator seeded from (seed, epoch), so an epoch's order is the same after a resume.
    `shard=(rank, world)`: a distributed rank's slice of each batch (torchrun; `batch_size` is the global batch).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, img_size: int,
                 mean, std, train: bool, seed: int = 0, augment: bool = True, drop_last: bool = False,
                 shard: tuple[int, int] = (0, 1)):
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.seed, self.augment = batch_size, train, seed, augment and train
        self.drop_last = drop_last
        self.rank, self.world = shard
        h, w = images.shape[-2:]
        if img_size < max(h, w):
            raise DataError(f"img_size {img_size} is smaller than the {h}x{w} images")
        self.pad = ((img_size - w) // 2, img_size - w - (img_size - w) // 2,
                    (img_size - h) // 2, img_size - h - (img_size - h) // 2)
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _transform(self, x: torch.Tensor, crop: tuple[int, int] | None, flip: torch.Tensor | None) -> torch.Tensor:
        x = x.float().div_(255)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        x = torch.nn.functional.pad((x - self.mean) / self.std, self.pad)
        if crop is not None:
            # random crop with 2 px of zero padding, and horizontal flip
            hh, ww = x.shape[-2:]
            dy, dx = crop
            x = torch.nn.functional.pad(x, (2, 2, 2, 2))[:, :, dy:dy + hh, dx:dx + ww]
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x.contiguous()

    def __iter__(self):
        g = None
        order = torch.arange(len(self.labels))
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.labels), generator=g)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            crop = flip = None
            if self.augment:  # drawn for the whole global batch, so every rank's slice gets the same draws
                crop = tuple(torch.randint(0, 5, (2,), generator=g).tolist())
                flip = torch.rand(len(idx), generator=g) < 0.5
            part = slice(self.rank * len(idx) // self.world, (self.rank + 1) * len(idx) // self.world)
            yield (self._transform(self.images[idx[part]], crop, None if flip is None else flip[part]),
                   self.labels[idx[part]])


def model_transform(model: torch.nn.Module, interpolation: str | None = None, crop_pct: float | None = None) -> dict:
    """The evaluation transform settings of an image-folder run: the model's own (timm's resolve_data_config
    over its pretrained_cfg: interpolation, crop_pct, crop_mode) unless the data config sets them."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config({"interpolation": interpolation, "crop_pct": crop_pct}, model=model)
    return {k: cfg[k] for k in ("interpolation", "crop_pct", "crop_mode")}


def build_loader(prepared: Prepared, split: str, batch_size: int, img_size: int, train: bool, seed: int = 0,
                 augment: bool = True, workers: int = 0, limit: int | None = None, transform_cfg: dict | None = None,
                 shard: tuple[int, int] = (0, 1)):
    """An iterable of (images, labels) batches over a prepared split, with `set_epoch(epoch)`.

    `shard=(rank, world)`: under torchrun, each of `world` processes gets its own slice of every batch of the one
    seeded stream (`batch_size` is the global batch, a multiple of `world`), so the global batch and the order of
    the images are the ones a single process sees."""
    rank, world = shard
    if batch_size % world:
        raise DataError(f"batch_size {batch_size} is not a multiple of the {world} training processes")
    meta = prepared.meta
    if meta["format"] == "tensors":
        images, labels = prepared.split(split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return TensorBatches(images, labels, batch_size, img_size, meta["mean"], meta["std"], train, seed,
                             augment, drop_last=train, shard=shard)
    return _imagefolder_loader(prepared, split, batch_size, img_size, train, seed, workers, limit,
                               transform_cfg or {}, shard)


def _imagefolder_loader(prepared, split, batch_size, img_size, train, seed, workers, limit, transform_cfg, shard):
    from timm.data import create_transform
    from torch.utils.data import DataLoader, Dataset

    index = read_json(prepared.path / "index.json")[split]
    if limit is not None:
        index = index[:limit]
    root = Path(prepared.meta["root"])
    transform = create_transform(img_size, is_training=train and transform_cfg.get("augment", True),
                                 mean=prepared.meta["mean"], std=prepared.meta["std"],
                                 **{k: v for k, v in transform_cfg.items() if k != "augment"})

    class Images(Dataset):
        def __len__(self):
            return len(index)

        def __getitem__(self, i):
            from PIL import Image
            rel, label = index[i]
            with Image.open(root / rel) as im:
                return transform(im.convert("RGB")), label

    class EpochLoader:
        def __init__(self):
            self.epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return len(index) // batch_size if train else -(-len(index) // batch_size)

        def __iter__(self):
            g = torch.Generator().manual_seed(seed * 100_003 + self.epoch)
            pin = torch.cuda.is_available()
            rank, world = shard
            if world == 1:
                return iter(DataLoader(Images(), batch_size=batch_size, shuffle=train, generator=g,
                                       num_workers=workers, drop_last=train, pin_memory=pin, persistent_workers=False))
            # one rank's slice of each global batch of the seeded order (the random crops are drawn per worker)
            order = torch.randperm(len(index), generator=g).tolist() if train else list(range(len(index)))
            part = batch_size // world
            batches = [order[i + rank * part:i + (rank + 1) * part]
                       for i in range(0, len(self) * batch_size, batch_size)]
            return iter(DataLoader(Images(), batch_sampler=batches, num_workers=workers, pin_memory=pin,
                                   generator=torch.Generator().manual_seed(seed * 100_003 + self.epoch + rank)))

    return EpochLoader()


# ----------------------------------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> dict:
    if args.profile:
        from pipeline.study import load_study
        study = load_study(args.profile)
        d = study.settings["data"]
        args.source, args.raw_dir, args.root = d["source"], d.get("raw_dir"), d.get("root")
        args.train_subset, args.test_subset, args.seed = d.get("train_subset"), d.get("test_subset"), d["seed"]
        args.out = args.out or study.data_dir
    if not args.out:
        raise SystemExit("prepare-data: give --out or --profile")
    meta = prepare(args.source, args.out, raw_dir=args.raw_dir, root=args.root, train_subset=args.train_subset,
                   test_subset=args.test_subset, seed=args.seed, check_images=not args.skip_image_check,
                   verify=not args.no_verify)
    print(f"prepared {meta['source']}: {meta['counts']} -> {args.out} (data_hash {meta['data_hash'][:12]})")
    if args.profile:
        from pipeline import tracking
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
    p.add_argument("--skip-image-check", action="store_true", help="do not open every image while validating")
    p.add_argument("--profile", help="take the data settings of params/<profile>.yaml (validated first)")
    p.add_argument("--out", help="prepared dataset folder to write (default with --profile: results/<profile>/data)")
