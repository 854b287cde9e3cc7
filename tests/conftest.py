import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def small_fashion_mnist(tmp_path_factory):
    """A class-balanced 500/200 subset of the real Fashion-MNIST, prepared by the real stage."""
    from pipeline.data import prepare

    out = tmp_path_factory.mktemp("data") / "fmnist"
    prepare("fashion-mnist", out, train_subset=500, test_subset=200)
    return out
