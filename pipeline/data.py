"""The prepared data and the loaders every stage reads (`python -m pipeline prepare-data` writes it:
pipeline.prepare), and where the raw Fashion-MNIST files are found.

A prepared folder holds `meta.json` with a content hash (`data_hash`) that every downstream run records, and
either uint8 tensors (`format: tensors`, Fashion-MNIST) or an index of image files (`format: imagefolder`,
read through timm's transforms).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform, resolve_data_config
from timm.data.loader import PrefetchLoader
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
def hash_tensors(*tensors: torch.Tensor) -> str:
    """The content hash of a tensors-format prepared dataset (meta.json `data_hash`)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Prepared:
    """A prepared dataset folder: its meta.json and, for tensors, the split tensors, checked against the recorded
    hash when first read (a damaged file is an error, never data)."""
    path: Path
    meta: dict
    _splits: dict | None = None

    @property
    def data_hash(self) -> str:
        return self.meta["data_hash"]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._splits is None:
            self._splits = self._read_verified()
        return self._splits[name]

    def _read_verified(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        splits = {}
        for name in ("train", "test"):
            try:
                obj = torch.load(self.path / f"{name}.pt", weights_only=True)
                splits[name] = obj["images"], obj["labels"]
            except Exception as e:  # torch raises several types for a broken file
                raise DataError(f"{self.path / name}.pt: unreadable ({type(e).__name__}: {e}); {REPREPARE}") from None
        found = hash_tensors(*(t for pair in splits.values() for t in pair))
        if found != self.data_hash:
            raise DataError(f"{self.path}: the prepared data does not match its recorded hash (meta.json data_hash "
                            f"{self.data_hash[:12]}, files {found[:12]}): damaged since it was prepared; {REPREPARE}")
        return splits

    def index(self) -> dict:
        """An image folder's index (index.json), checked against the hash recorded beside it."""
        raw = (self.path / "index.json").read_bytes()
        recorded = self.meta.get("index_sha256")
        if recorded and hashlib.sha256(raw).hexdigest() != recorded:
            raise DataError(f"{self.path / 'index.json'}: does not match its recorded hash (meta.json index_sha256): "
                            f"damaged since it was prepared; {REPREPARE}")
        return json.loads(raw)


REPREPARE = "delete the folder and prepare it again (`python -m pipeline prepare-data`, or rerun the study)"


def load_prepared(path: str | os.PathLike) -> Prepared:
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise DataError(f"{path}: not a prepared dataset (no meta.json); run `python -m pipeline prepare-data`")
    return Prepared(path, read_json(path / "meta.json"))


class TensorBatches:
    """Batches from uint8 tensors: pad to `img_size`, scale, normalise; optional random-crop + flip.

    Shuffling uses a generator seeded from (seed, epoch), so an epoch's order is the same after a resume. The
    transforms run where the tensors are (the whole split on the GPU: a few tens of MB); the draws come from a CPU
    generator, so the batches are the same on any device.
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
        self.mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
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
        # The epoch's draws, in the order they have always been drawn (the order, then each batch's crop and flips),
        # are made on the CPU up front and moved to the tensors' device once: no host-device copy per batch.
        g = None
        n = len(self.labels)
        order = torch.arange(n)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        bounds = [(i * self.batch_size, min((i + 1) * self.batch_size, n)) for i in range(len(self))]
        crops, flips = [], []
        if self.augment:  # drawn for the whole global batch, so every rank's slice gets the same draws
            for start, stop in bounds:
                crops.append(tuple(torch.randint(0, 5, (2,), generator=g).tolist()))
                flips.append(torch.rand(stop - start, generator=g) < 0.5)
            flips = torch.cat(flips).to(self.images.device, non_blocking=True)
        order = order.to(self.images.device, non_blocking=True)
        for i, (start, stop) in enumerate(bounds):
            size = stop - start
            part = slice(start + self.rank * size // self.world, start + (self.rank + 1) * size // self.world)
            if part.stop == part.start:  # the last test batch may leave a rank nothing
                continue
            idx = order[part]
            yield (self._transform(self.images[idx], crops[i] if self.augment else None,
                                   flips[part] if self.augment else None), self.labels[idx])


def model_transform(model: torch.nn.Module, interpolation: str | None = None, crop_pct: float | None = None) -> dict:
    """The evaluation transform settings of an image-folder run: the model's own (timm's resolve_data_config
    over its pretrained_cfg: interpolation, crop_pct, crop_mode) unless the data config sets them."""
    cfg = resolve_data_config({"interpolation": interpolation, "crop_pct": crop_pct}, model=model)
    return {k: cfg[k] for k in ("interpolation", "crop_pct", "crop_mode")}


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's RandAugment posterize, at 0 bits too. RandAugment's strongest posterize keeps 0 bits (a black image: TF's
    reference, timm's level mapping) and `rand-m9-mstd0.5-inc1` (DeiT's recipe, the paper profile's) reaches it for
    about one image in 300; Pillow 13's ImageOps.posterize refuses 0 bits (ValueError), which would stop training on
    its first batches. timm's ops look their function up by name when built: every posterize op is this one."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # every bit cleared, what the LUT of 0 bits gives
    return _timm_posterize(img, bits_to_keep, **kwargs)


_timm_posterize = auto_augment.posterize
auto_augment.NAME_TO_OP.update({name: posterize for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")})


# Decoded image-folder splits of this process, by (data hash, split, limit); None: too big for the cache.
_DECODED: dict[tuple, list | None] = {}
DECODED_CACHE_MB = 1024


def build_loader(prepared: Prepared, split: str, batch_size: int, img_size: int, train: bool, seed: int = 0,
                 augment: bool = True, workers: int = 0, limit: int | None = None, transform_cfg: dict | None = None,
                 shard: tuple[int, int] = (0, 1), decoded_cache_mb: int = DECODED_CACHE_MB,
                 device: torch.device | str = "cpu"):
    """An iterable of normalised (images, labels) batches on `device` over a prepared split, with `set_epoch(epoch)`.

    `shard=(rank, world)`: under torchrun, each of `world` processes gets its own slice of every batch of the one
    seeded stream (`batch_size` is the global batch, a multiple of `world`), so the global batch and the order of
    the images are the ones a single process sees. `decoded_cache_mb`: an image-folder split whose decoded pixels
    fit in this many MiB is decoded once per process and held in memory (0: decode every image every epoch)."""
    rank, world = shard
    device = torch.device(device)
    if batch_size % world:
        raise DataError(f"batch_size {batch_size} is not a multiple of the {world} training processes")
    meta = prepared.meta
    if meta["format"] == "tensors":
        images, labels = prepared.split(split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return TensorBatches(images.to(device), labels.to(device), batch_size, img_size, meta["mean"], meta["std"],
                             train, seed, augment, drop_last=train, shard=shard)
    index = prepared.index()[split]
    if limit is not None:
        index = index[:limit]
    transform_cfg = dict(transform_cfg or {})
    is_training = train and transform_cfg.pop("augment", True)
    erasing = {k: transform_cfg.pop(k) for k in ("re_prob", "re_mode") if k in transform_cfg}
    # uint8 out of the workers (a quarter of float32's bytes); normalisation and random erasing on the device
    transform = create_transform(img_size, is_training=is_training, use_prefetcher=True, **transform_cfg)
    root = Path(meta["root"])
    decoded = _decoded(root, index, (meta["data_hash"], split, limit), decoded_cache_mb)
    return FolderBatches(FolderImages(root, index, transform, decoded), batch_size, train, seed, workers, shard,
                         tuple(meta["mean"]), tuple(meta["std"]), device, erasing if is_training else None)


# PIL modes of 8 bits per channel: converted to RGB exactly. Others (I;16, I, F: 16-bit, 32-bit, float) would be
# clipped to 0..255 by convert("RGB"), silently: refused, naming the file.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB",
                             "HSV"})


def to_rgb(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    """An opened image as 8-bit RGB; a DataError naming the file for a mode that conversion would damage."""
    if im.mode not in EIGHT_BIT_MODES:
        raise DataError(f"{path}: image mode {im.mode} ({'float' if im.mode == 'F' else 'more than 8 bits'} per "
                        f"channel) is not decoded: converting it to 8-bit RGB would clip its values; convert the "
                        f"dataset's images to 8 bits per channel first")
    return im.convert("RGB")


def _decoded(root: Path, index: list, key: tuple, limit_mb: int) -> list | None:
    """The split's images decoded to RGB uint8 arrays, once per process, when they fit in `limit_mb` MiB."""
    if limit_mb <= 0:
        return None
    if key not in _DECODED:
        arrays, total, limit = [], 0, limit_mb * 2**20
        for i, (rel, _) in enumerate(index):
            with Image.open(root / rel) as im:
                arrays.append(np.asarray(to_rgb(im, root / rel)))
            total += arrays[-1].nbytes
            # over the limit, or bound to be by the first 64 images' mean size (ImageNet gives up there)
            if total > limit or (i == 63 and total / 64 * len(index) > limit):
                arrays = None
                break
        _DECODED[key] = arrays
    return _DECODED[key]


class FolderImages(Dataset):
    """(transformed image as uint8 CHW, label) of an image-folder split; read from `decoded` arrays when given, else
    from the files. Indexed by (index, seed): each image's augmentation is drawn from its own seed (given by the
    sampler, FolderBatches), so an image gets the same crop in any worker, with any number of workers and under any
    number of training processes. A module-level class, so that data workers started with spawn or forkserver can
    unpickle it."""

    def __init__(self, root: Path, index: list, transform, decoded: list | None = None):
        self.root, self.index, self.transform, self.decoded = root, index, transform, decoded

    def __len__(self):
        return len(self.index)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        rel, label = self.index[i]
        with _seeded(seed):
            if self.decoded is not None:
                return self.transform(Image.fromarray(self.decoded[i])), label
            with Image.open(self.root / rel) as im:
                return self.transform(to_rgb(im, self.root / rel)), label


@contextlib.contextmanager
def _seeded(seed: int):
    """python's, numpy's and torch's global generators (timm's transforms draw from all three) seeded with `seed`, and
    given back their state after: without workers, the training process's own draws (dropout, random erasing) go on
    as if no image had been loaded."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # the CPU's only: torch.manual_seed would reseed CUDA's too
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of an image-folder epoch's order and per-image seeds: distinct for every (seed, epoch)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


class EpochBatches:
    """The batch sampler of FolderBatches: each batch is a list of (index, seed), in the order of the current epoch
    (set by FolderBatches.set_epoch) and, under torchrun, this rank's slice of each global batch."""

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, shard: tuple[int, int]):
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world = shard
        self.epoch = 0

    def __len__(self):
        return self.n // self.batch_size if self.train else -(-self.n // self.batch_size)

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.n, generator=g) if self.train else torch.arange(self.n)
        seeds = torch.randint(2**31, (self.n,), generator=g)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            part = idx[self.rank * len(idx) // self.world:(self.rank + 1) * len(idx) // self.world]
            if len(part):  # the last test batch may leave a rank nothing
                yield list(zip(part.tolist(), seeds[part].tolist(), strict=True))


class FolderBatches:
    """Normalised float batches of a FolderImages split on `device`: one DataLoader for the whole run (its workers
    start once), uint8 images from the workers, normalisation and random erasing on the device (timm's
    PrefetchLoader: on CUDA the next batch's copy overlaps the current step)."""

    def __init__(self, images: FolderImages, batch_size: int, train: bool, seed: int, workers: int,
                 shard: tuple[int, int], mean, std, device: torch.device, erasing: dict | None = None):
        self.images, self.sampler = images, EpochBatches(len(images), batch_size, train, seed, shard)
        # its own generator: the workers' base seed (unused: the sampler seeds each image) is not drawn from the global
        # one, which random erasing draws from
        loader = DataLoader(images, batch_sampler=self.sampler, num_workers=workers, persistent_workers=workers > 0,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
        self.loader = PrefetchLoader(loader, mean, std, len(mean), device, **(erasing or {}))

    def set_epoch(self, epoch):
        self.sampler.epoch = epoch

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return iter(self.loader)


def test_images(prepared: Prepared, n: int, img_size: int, transform_cfg: dict | None = None):
    """(images, labels) of the first `n` test images, in one batch: the real inputs on which stages check a model
    (re-parameterization, ONNX export), time it (the benchmark) or show its decisions (AdaViT)."""
    return next(iter(build_loader(prepared, "test", n, img_size, train=False, limit=n, transform_cfg=transform_cfg)))
