"""`python -m pipeline bench-data`: how long prepare-data takes to validate an ImageNet-shaped image folder.

Makes (or reuses) a synthetic folder of ImageNet's shape (`--classes` class folders, `--images` training images and a
tenth of that in val/, small JPEGs of quality 90 whose content does not compress to nothing) and times
`pipeline.prepare.scan_imagefolder` on it in each check mode (none, header, full), with one thread and with one per
CPU, in interleaved rounds (each entry's median over rounds, with min and max: pipeline.measure's protocol). Files/s
per entry; divide 1.28 M by it for ImageNet's training split. `--drop-cache` evicts the folder's file contents from
the OS page cache before every scan (posix_fadvise; the kernel's directory and inode caches stay warm), which is
the first scan on a freshly copied or a network file system; without it the files are cached after the first round.
Decoding (full) costs in proportion to the pixels: ImageNet's images (about 400 x 350) take longer each than these.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.data import EpochBatches, FolderImages, build_loader, load_prepared
from pipeline.io import read_json, write_json
from pipeline.measure import summarize
from pipeline.prepare import CHECK_MODES, prepare, scan_imagefolder

MARKER = "bench-data.json"  # the synthetic folder's shape, written last: a folder without it is not reused


def make_folder(root: Path, images: int, classes: int, size: int) -> Path:
    """The synthetic folder at `root` (made by a pool of processes, unless one of the same shape is there)."""
    shape = {"images": images, "classes": classes, "size": size}
    if (root / MARKER).exists():
        if read_json(root / MARKER) == shape:
            return root
        shutil.rmtree(root)  # ours (it has the marker), of another shape
    elif root.exists() and any(root.iterdir()):
        raise SystemExit(f"bench-data: {root} exists and is not a bench-data folder; choose another --root")
    tasks = [(root / split / f"n{c:08d}", n // classes + (c < n % classes), size, seed * classes + c)
             for seed, (split, n) in enumerate((("train", images), ("val", images // 10))) for c in range(classes)]
    with ProcessPoolExecutor() as pool:
        list(tqdm(pool.map(_write_class, tasks, chunksize=8), total=len(tasks), desc="make images", leave=False))
    os.sync()  # written back, so that --drop-cache can evict the pages
    write_json(root / MARKER, shape)
    return root


def _write_class(task: tuple[Path, int, int, int]) -> None:
    """One class folder of JPEGs: a smooth random field (upscaled 8 x 8 colours) plus noise, like a photo's mix of
    flat regions and texture, so that a file is a few KB rather than a few hundred bytes."""
    folder, n, size, seed = task
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(base, dtype=np.int16) + rng.integers(-24, 25, (size, size, 3), dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{folder.name}_{i}.JPEG", quality=90)


def drop_cache(root: Path) -> None:
    """Evict the contents of the folder's files from the OS page cache (clean pages only: make_folder syncs)."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_scans(root: Path, configs: list[tuple[str, int]], repeats: int, cold: bool) -> dict:
    """Per (mode, workers): scan_imagefolder's files/s and CPU seconds per file (all threads: what a machine with
    more idle CPUs divides), over interleaved rounds; and the number of files."""
    seconds, cpu_seconds = {c: [] for c in configs}, {c: [] for c in configs}
    files = 0
    for r in tqdm(range(repeats), desc="rounds", leave=False):
        shift = r % len(configs)
        for mode, workers in configs[shift:] + configs[:shift]:
            if cold:
                drop_cache(root)
            start, cpu_start = time.perf_counter(), time.process_time()
            index = scan_imagefolder(root, mode, workers)
            seconds[mode, workers].append(time.perf_counter() - start)
            cpu_seconds[mode, workers].append(time.process_time() - cpu_start)
            files = len(index["sizes"])
    return {"files": files, "rows": [{"check_images": mode, "workers": workers,
                                      "files_per_s": summarize([files / s for s in seconds[mode, workers]]),
                                      "seconds": summarize(seconds[mode, workers]),
                                      "cpu_us_per_file": summarize([1e6 * s / files
                                                                    for s in cpu_seconds[mode, workers]])}
                                     for mode, workers in configs]}


def loader_throughput(root: Path, workers: int, images: int, batch_size: int, img_size: int, repeats: int,
                      device: str = "cpu") -> dict:
    """The training loader's images/s over `images` training images of the synthetic folder (prepared without a
    check) with `workers` data workers, the paper profile's augmentation (RandAugment, random erasing 0.25) at
    `img_size`, in interleaved rounds of one epoch each (the workers start once, before the first round), every
    batch delivered on `device`: `uint8`, the pipeline's loader (uint8 out of the workers, normalisation and random
    erasing on the device: pipeline.data.build_loader), against `float`, the same images normalised and erased in
    the workers and handed over as float32 (timm's transform without its prefetcher), then copied to the device,
    which is what the loader did before."""
    device = torch.device(device)
    prepared_dir = root.parent / f"{root.name}-prepared"
    if not (prepared_dir / "meta.json").is_file():
        prepare("imagefolder", prepared_dir, root=str(root), check_images="none")
    prepared = load_prepared(prepared_dir)
    augment = {"augment": True, "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel",
               "interpolation": "bicubic"}
    uint8 = build_loader(prepared, "train", batch_size, img_size, train=True, workers=workers, limit=images,
                         transform_cfg=augment, decoded_cache_mb=0, device=device)
    transform = create_transform(img_size, is_training=True, mean=prepared.meta["mean"], std=prepared.meta["std"],
                                 **{k: v for k, v in augment.items() if k != "augment"})
    dataset = FolderImages(Path(prepared.meta["root"]), prepared.index()["train"][:images], transform)
    floats = DataLoader(dataset, batch_sampler=EpochBatches(len(dataset), batch_size, True, 0, (0, 1)),
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    loaders = {"uint8": uint8, "float": floats}
    for loader in loaders.values():  # start the workers
        next(iter(loader))
    seconds = {name: [] for name in loaders}
    for r in tqdm(range(repeats), desc="loader rounds", leave=False):
        for name in list(loaders)[r % 2:] + list(loaders)[:r % 2]:
            start, seen = time.perf_counter(), 0
            for x, _ in loaders[name]:
                x = x.to(device, non_blocking=True)
                seen += len(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return {"workers": workers, "images": seen, "batch_size": batch_size, "img_size": img_size, "device": str(device),
            "rows": {name: {"images_per_s": summarize([seen / t for t in seconds[name]]),
                            "batch_mb": batch_size * 3 * img_size ** 2 * (1 if name == "uint8" else 4) / 2**20}
                     for name in loaders}}


def print_table(result: dict) -> None:
    print(f"{result['files']} files ({result['shape']}), {result['cpus']} CPUs, page cache "
          f"{'dropped before each scan' if result['drop_cache'] else 'warm after the first round'}; "
          f"{result['repeats']} rounds; load average {result['load_average_1min'][0]:.1f} before, "
          f"{result['load_average_1min'][1]:.1f} after")
    print(f"{'check_images':<13} {'workers':>7} {'files/s [min, max]':>26} {'1.28 M files':>13} {'CPU us/file':>12}")
    for row in result["rows"]:
        fps = row["files_per_s"]
        print(f"{row['check_images']:<13} {row['workers']:>7} {fps['median']:>10.0f} [{fps['min']:>6.0f}, "
              f"{fps['max']:>6.0f}] {1.28e6 / fps['median'] / 60:>10.1f} min {row['cpu_us_per_file']['median']:>12.0f}")


def print_loader(loader: dict) -> None:
    print(f"training loader: {loader['images']} images at {loader['img_size']} px, batch {loader['batch_size']}, "
          f"{loader['workers']} workers")
    for name, row in loader["rows"].items():
        ips = row["images_per_s"]
        print(f"  {name:<6} {ips['median']:8.0f} images/s [{ips['min']:.0f}, {ips['max']:.0f}]  "
              f"{row['batch_mb']:.0f} MiB per batch out of the workers")


def run(args: argparse.Namespace) -> dict:
    root = Path(args.root)
    start = time.perf_counter()
    make_folder(root, args.images, args.classes, args.size)
    made_s = time.perf_counter() - start
    cpus = os.cpu_count()
    configs = [(mode, w) for mode in args.modes for w in sorted({1, cpus})]
    load_before = os.getloadavg()[0]  # other processes on the machine share its CPUs with the scan's threads
    result = {"root": str(root.resolve()), "shape": read_json(root / MARKER), "make_s": made_s, "cpus": cpus,
              "repeats": args.repeats, "drop_cache": args.drop_cache,
              **(time_scans(root, configs, args.repeats, args.drop_cache) if configs else {"files": None, "rows": []}),
              "load_average_1min": [load_before, os.getloadavg()[0]]}
    if args.loader_images:
        result["loader"] = loader_throughput(root, args.loader_workers, args.loader_images, args.loader_batch_size,
                                             args.loader_img_size, args.repeats, args.loader_device)
    write_json(args.out, result)
    if configs:
        print_table(result)
    if "loader" in result:
        print_loader(result["loader"])
    print(f"written to {args.out}")
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="results/bench-data/imagefolder", help="the synthetic folder (made if absent)")
    p.add_argument("--images", type=int, default=100_000, help="training images (val/ gets a tenth)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--modes", nargs="*", choices=CHECK_MODES, default=list(CHECK_MODES))
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--drop-cache", action="store_true", help="evict the files from the page cache before each scan")
    p.add_argument("--out", default="results/bench-data.json", help="JSON output")
    p.add_argument("--loader-images", type=int, default=0,
                   help="also time the training loader over this many training images (0: not)")
    p.add_argument("--loader-workers", type=int, default=os.cpu_count(), help="the loader's data workers")
    p.add_argument("--loader-batch-size", type=int, default=128)
    p.add_argument("--loader-img-size", type=int, default=224)
    p.add_argument("--loader-device", default="cpu", help="where the batches are delivered (cuda: as in training)")
