"""prepare-data on image folders: the identity of a folder (not its place or its files' times), the check modes, the
parallel scan."""
import argparse
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline import prepare as prepare_module
from pipeline.data import DataError
from pipeline.prepare import add_arguments, prepare, scan_imagefolder
from pipeline.study import StudyError, load_study


def make_folder(root, classes=("cat", "dog"), per_class=3):
    """train/<class>/ with `per_class` images and val/<class>/ with one, JPEG and PNG mixed."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def truncate_a_jpeg(root):
    """A JPEG whose header is intact and whose image data stops half-way (a copy cut short)."""
    path = root / "train" / "cat" / "big.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return path


def test_a_copied_folder_is_the_same_data_and_a_resized_file_is_not(tmp_path):
    first = prepare("imagefolder", tmp_path / "out1", root=str(make_folder(tmp_path / "imgs")))
    copy = shutil.copytree(tmp_path / "imgs", tmp_path / "scratch" / "imgs", copy_function=shutil.copy)
    assert os.stat(copy / "train/cat/0.jpg").st_mtime_ns != os.stat(tmp_path / "imgs/train/cat/0.jpg").st_mtime_ns
    second = prepare("imagefolder", tmp_path / "out2", root=str(copy))
    assert second["data_hash"] == first["data_hash"]
    assert second["root"] != first["root"]  # kept for loading, outside the identity
    Image.new("RGB", (30, 30)).save(copy / "train" / "cat" / "0.jpg")
    assert prepare("imagefolder", tmp_path / "out3", root=str(copy))["data_hash"] != first["data_hash"]


def test_a_truncated_jpeg_passes_the_header_check_and_fails_the_full_one(tmp_path):
    root = make_folder(tmp_path / "imgs")
    truncate_a_jpeg(root)
    prepare("imagefolder", tmp_path / "out", root=str(root), check_images="header")  # verify() reads the header only
    with pytest.raises(DataError, match=r"(?s)1 problem.*train/cat/big.jpg: unreadable image .*truncated"):
        prepare("imagefolder", tmp_path / "out", root=str(root), check_images="full")


def test_no_check_opens_no_file_but_refuses_an_empty_one(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "dog" / "junk.jpg").write_bytes(b"not an image")

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(prepare_module.Image, "open", refuse)
    assert prepare("imagefolder", tmp_path / "out", root=str(root), check_images="none")["counts"]["train"] == 7
    (root / "train" / "dog" / "empty.jpg").touch()
    with pytest.raises(DataError, match=r"train/dog/empty.jpg: unreadable image \(empty file\)"):
        prepare("imagefolder", tmp_path / "out", root=str(root), check_images="none")


def test_an_unknown_check_mode_is_refused_naming_the_modes(tmp_path):
    with pytest.raises(DataError, match="check_images 'deep': unknown mode; one of none, header, full"):
        scan_imagefolder(make_folder(tmp_path / "imgs"), "deep")
    with pytest.raises(StudyError, match="deep"):
        load_study("smoke", check_data=False, overrides={"data": {"check_images": "deep"}})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--skip-image-check"]).check_images == "none"


def test_the_parallel_scan_gives_the_index_of_one_thread(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=5)
    monkeypatch.setattr(prepare_module, "CHUNK", 2)  # many chunks, finishing in any order
    one = scan_imagefolder(root, "full", workers=1)
    assert scan_imagefolder(root, "full", workers=4) == one
    assert one["train"] == sorted(one["train"], key=lambda item: (item[1], item[0]))
    assert len(one["train"]) == 15 and len(one["test"]) == 3 and len(one["sizes"]) == 18
