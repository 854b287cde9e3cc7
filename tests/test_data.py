"""Dataset preparation: checksums, bad input with clear errors, nothing half-written (issue 3, Sec. 1)."""
import gzip
import json
import random
import shutil
import struct

import pytest
import torch
from PIL import Image

from pipeline import data
from pipeline.data import DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES, DataError, build_loader, load_prepared
from pipeline.prepare import prepare


def write_idx(path, array: torch.Tensor, compress=True):
    data = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + \
        array.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return data


def fake_idx_dir(tmp_path, n_train=20, n_test=10, n_train_labels=None):
    d = tmp_path / "raw"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    write_idx(d / "train-images-idx3-ubyte.gz", torch.randint(0, 255, (n_train, 28, 28), generator=g))
    write_idx(d / "train-labels-idx1-ubyte.gz", torch.arange(n_train_labels or n_train) % 10)
    write_idx(d / "t10k-images-idx3-ubyte.gz", torch.randint(0, 255, (n_test, 28, 28), generator=g))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", torch.arange(n_test) % 10)
    return d


def test_prepared_fashion_mnist(small_fashion_mnist):
    prepared = load_prepared(small_fashion_mnist)
    assert prepared.meta["counts"] == {"train": 500, "test": 200}
    assert len(prepared.data_hash) == 64
    images, labels = prepared.split("train")
    assert images.dtype == torch.uint8 and images.shape == (500, 28, 28)
    assert torch.bincount(labels).tolist() == [50] * 10  # class-balanced subset
    x, y = next(iter(build_loader(prepared, "test", 64, 32, train=False)))
    assert x.shape == (64, 1, 32, 32) and y.shape == (64,)


def test_same_input_same_hash_and_subset_changes_it(tmp_path, small_fashion_mnist):
    again = prepare("fashion-mnist", tmp_path / "again", train_subset=500, test_subset=200)
    assert again["data_hash"] == load_prepared(small_fashion_mnist).data_hash
    other = prepare("fashion-mnist", tmp_path / "other", train_subset=400, test_subset=200)
    assert other["data_hash"] != again["data_hash"]


def test_checksum_mismatch_names_the_file(tmp_path):
    d = tmp_path / "raw"
    shutil.copytree(DEBIAN_FASHION_MNIST, d)
    labels = gzip.decompress((d / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels[:-1] + bytes([(labels[-1] + 1) % 10])))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: checksum mismatch"):
        prepare("fashion-mnist", tmp_path / "out", raw_dir=str(d))
    assert not (tmp_path / "out").exists()


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare("fashion-mnist", tmp_path / "out", raw_dir=str(tmp_path / "nowhere"))


def test_truncated_gzip(tmp_path):
    d = fake_idx_dir(tmp_path)
    gz = (d / "train-images-idx3-ubyte.gz").read_bytes()
    (d / "train-images-idx3-ubyte.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        prepare("fashion-mnist", tmp_path / "out", raw_dir=str(d), verify=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left behind


def test_truncated_idx(tmp_path):
    d = fake_idx_dir(tmp_path)
    data = gzip.decompress((d / "t10k-images-idx3-ubyte.gz").read_bytes())
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    (d / "t10k-images-idx3-ubyte").write_bytes(data[:-100])  # uncompressed files are accepted too
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated or padded IDX file"):
        prepare("fashion-mnist", tmp_path / "out", raw_dir=str(d), verify=False)


def test_label_count_differs_from_image_count(tmp_path):
    d = fake_idx_dir(tmp_path, n_train=20, n_train_labels=19)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: 19 labels for 20 images"):
        prepare("fashion-mnist", tmp_path / "out", raw_dir=str(d), verify=False)


def test_failed_prepare_leaves_an_existing_output_untouched(tmp_path):
    good = fake_idx_dir(tmp_path)
    prepare("fashion-mnist", tmp_path / "out", raw_dir=str(good), verify=False)
    before = (tmp_path / "out" / "meta.json").read_text()
    (good / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(DataError):
        prepare("fashion-mnist", tmp_path / "out", raw_dir=str(good), verify=False)
    assert (tmp_path / "out" / "meta.json").read_text() == before


def make_imagefolder(root, classes=("cat", "dog"), per_class=3):
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 36), (i * 40, 10, 200)).save(root / split / c / f"{i}.jpg")
    return root


def test_imagefolder_index_and_loader(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    meta = prepare("imagefolder", tmp_path / "out", root=str(root))
    assert meta["classes"] == ["cat", "dog"] and meta["counts"] == {"train": 6, "test": 6}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["train"][0] == ["train/cat/0.jpg", 0]
    loader = build_loader(load_prepared(tmp_path / "out"), "train", 2, 32, train=True)
    x, y = next(iter(loader))  # images read through timm's create_transform
    assert x.shape == (2, 3, 32, 32)


def test_imagefolder_eval_transform_is_the_models_own(tmp_path):
    """timm's resolve_data_config over the model's pretrained_cfg (bicubic, crop 0.9; M36 0.95), unless the data
    config sets a value; the test loader applies exactly that transform."""
    import timm
    from timm.data import create_transform

    import pipeline.models  # noqa: F401
    from pipeline.data import model_transform

    assert model_transform(timm.create_model("riformer_s12")) == {"interpolation": "bicubic", "crop_pct": 0.9,
                                                                   "crop_mode": "center"}
    assert model_transform(timm.create_model("riformer_m36"))["crop_pct"] == 0.95
    assert model_transform(timm.create_model("riformer_s12"), "bilinear", 0.8)[
        "interpolation"] == "bilinear"
    root = make_imagefolder(tmp_path / "imgs", per_class=1)
    prepare("imagefolder", tmp_path / "out", root=str(root))
    prepared = load_prepared(tmp_path / "out")
    cfg = model_transform(timm.create_model("riformer_s12"))
    x, _ = next(iter(build_loader(prepared, "test", 1, 32, train=False, transform_cfg=cfg)))
    with Image.open(root / "val" / "cat" / "0.jpg") as im:
        expected = create_transform(32, mean=prepared.meta["mean"], std=prepared.meta["std"], **cfg)(im.convert("RGB"))
    # the same pixels, normalised after the workers ((x - 255 mean) / (255 std), timm's PrefetchLoader): float rounding
    assert torch.allclose(x[0], expected, atol=1e-5, rtol=0)


def test_imagefolder_empty_class_folder(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    for f in (root / "val" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"val/dog: empty class folder"):
        prepare("imagefolder", tmp_path / "out", root=str(root))


def test_imagefolder_unreadable_images_are_named(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    (root / "train" / "cat" / "1.jpg").write_bytes(b"not an image")
    (root / "val" / "dog" / "2.jpg").write_bytes(b"")
    with pytest.raises(DataError) as e:
        prepare("imagefolder", tmp_path / "out", root=str(root))
    assert "train/cat/1.jpg: unreadable image" in str(e.value)
    assert "val/dog/2.jpg: unreadable image" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_imagefolder_class_lists_must_match(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    (root / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "bird" / "0.jpg")
    with pytest.raises(DataError, match=r"only in val \['bird'\]"):
        prepare("imagefolder", tmp_path / "out", root=str(root))


def test_debian_files_are_what_the_checksums_describe():
    # the embedded default data is installed by `make setup`
    for name in FASHION_MNIST_FILES:
        assert (DEBIAN_FASHION_MNIST / f"{name}.gz").is_file()



def test_imagefolder_decoded_cache_gives_the_same_batches(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=4)
    prepare("imagefolder", tmp_path / "out", root=str(root))
    prepared = load_prepared(tmp_path / "out")

    def batches(cache_mb, train):
        torch.manual_seed(0)  # timm's random transforms draw from the global generator
        loader = build_loader(prepared, "train", 4, 32, train=train, seed=3, decoded_cache_mb=cache_mb)
        loader.set_epoch(1)
        return list(loader)

    try:
        for train in (False, True):
            plain, cached = batches(0, train), batches(64, train)
            assert len(plain) == len(cached) == 2
            for (x0, y0), (x1, y1) in zip(plain, cached, strict=True):
                assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert len(data._DECODED[(prepared.data_hash, "train", None)]) == 8
    finally:
        data._DECODED.clear()


def test_imagefolder_decoded_cache_gives_up_on_a_split_too_big(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=1)
    Image.new("RGB", (800, 800)).save(root / "train" / "cat" / "big.png")  # 1.9 MiB decoded
    prepare("imagefolder", tmp_path / "out", root=str(root))
    prepared = load_prepared(tmp_path / "out")
    try:
        loader = build_loader(prepared, "train", 1, 32, train=False, decoded_cache_mb=1)
        assert loader.images.decoded is None and len(list(loader)) == 3  # read from the files
    finally:
        data._DECODED.clear()


def test_imagefolder_batches_with_workers_under_forkserver_are_those_of_one_process(tmp_path):
    """Each image's augmentation is drawn from its own seed: training batches from 2 workers started by forkserver
    (Linux's default from Python 3.14: the dataset must unpickle there) are the batches of no workers, epoch by epoch,
    random erasing included; and the workers hand over uint8 images."""
    import torch.multiprocessing as mp

    root = make_imagefolder(tmp_path / "imgs", per_class=4)
    prepare("imagefolder", tmp_path / "out", root=str(root))
    prepared = load_prepared(tmp_path / "out")

    def batches(workers):
        loader = build_loader(prepared, "train", 4, 32, train=True, seed=3, workers=workers, decoded_cache_mb=0,
                              transform_cfg={"augment": True, "re_prob": 0.5})
        assert loader.images[(0, 1)][0].dtype == torch.uint8
        out = []
        for epoch in (0, 1):
            random.seed(epoch)  # random erasing draws from python's generator, seeded each epoch in training
            loader.set_epoch(epoch)
            out.append(list(loader))
        return out

    start = mp.get_start_method()
    mp.set_start_method("forkserver", force=True)
    try:
        workers = batches(2)
    finally:
        mp.set_start_method(start, force=True)
    alone = batches(0)
    for e0, e1 in zip(alone, workers, strict=True):
        assert len(e0) == len(e1) == 2
        for (x0, y0), (x1, y1) in zip(e0, e1, strict=True):
            assert x0.dtype == torch.float32 and torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(alone[0][0][0], alone[1][0][0])  # another epoch, other draws


def test_randaugment_strongest_posterize_gives_a_black_image_instead_of_an_error():
    """rand-m9-mstd0.5-inc1 (the paper profile's) reaches posterize with 0 bits kept for about one image in 300: Pillow
    13 refuses 0 bits, so without pipeline.data's posterize the first ImageNet batches would fail."""
    import numpy as np
    from timm.data.auto_augment import AugmentOp

    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(AugmentOp("PosterizeIncreasing", 1.0, 10)(image)).max() == 0  # 0 bits kept
    assert np.asarray(AugmentOp("PosterizeIncreasing", 1.0, 5)(image)).max() == 192  # 2 bits kept: timm's own
