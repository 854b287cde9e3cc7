"""The prepared data and the loaders every stage reads (`python -m pipeline prepare-data` writes it:
pipeline.prepare), and where the raw Fashion-MNIST files are found.

A prepared folder holds `meta.json` with a content hash (`data_hash`) that every downstream run records, and
either uint8 tensors (`format: tensors`, Fashion-MNIST) or an index of image files (`format: imagefolder`,
read through timm's transforms).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset

from pipeline.io import read_json

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# md5 and size of the decompressed IDX files (zalandoresearch/fashion-mnist).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", 47040016),
    "train-labels-idx1-ubyte": ("9018921c3c673c538a1fc5bad174d6f9", 60008),
    "t10k-images-idx3-ubyte": ("8181f5470baa50b63fa0f6fddb340f0a", 7840016),
    "t10k-labels-idx1-ubyte": ("15d484375f8d13e6eb1aabb0c3f46965", 10008),
}


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


def find_fashion_mnist(raw_dir: str | None) -> Path:
    candidates = [Path(raw_dir)] if raw_dir else [DEBIAN_FASHION_MNIST]
    for d in candidates:
        if d.is_dir() and all(idx_file(d, name) for name in FASHION_MNIST_FILES):
            return d
    where = candidates[0]
    raise DataError(
        f"Fashion-MNIST not found in {where}: it needs the four IDX files "
        f"{', '.join(FASHION_MNIST_FILES)} (optionally .gz). Install them with "
        f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make setup` does this where apt is "
        f"available), or download them from the zalandoresearch/fashion-mnist repository and set "
        f"data.raw_dir in params (or --raw-dir) to their folder.")


def idx_file(d: Path, name: str) -> Path | None:
    for candidate in (d / f"{name}.gz", d / name):
        if candidate.is_file():
            return candidate
    return None


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




def test_images(prepared: Prepared, n: int, img_size: int, transform_cfg: dict | None = None):
    """(images, labels) of the first `n` test images, in one batch: the real inputs on which stages check a model
    (re-parameterization, ONNX export), time it (the benchmark) or show its decisions (AdaViT)."""
    return next(iter(build_loader(prepared, "test", n, img_size, train=False, limit=n, transform_cfg=transform_cfg)))
