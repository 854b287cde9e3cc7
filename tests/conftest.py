import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

pytest_plugins = ["mlflow_server"]  # the `mlflow_server` fixture: an MLflow server on PostgreSQL for a test


@pytest.fixture(scope="session")
def small_fashion_mnist(tmp_path_factory):
    """A class-balanced 500/200 subset of the real Fashion-MNIST, prepared by the real stage."""
    from pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "fmnist"
    prepare("fashion-mnist", out, train_subset=500, test_subset=200)
    return out


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Every test logs to a throw-away SQLite store, never the project's mlflow.db."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def tiny_config(data, name="tiny", **overrides):
    """A training config small enough for a unit test (a few seconds on 2 CPU cores)."""
    from pipeline.config import config_from_dict

    cfg = {"name": name, "model": "poolformer_nano", "threads": 2,
           "data": {"path": str(data), "batch_size": 50, "eval_batch_size": 100},
           "optim": {"epochs": 1, "warmup_epochs": 0}}
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(cfg)


def assert_grad_checkpointing_is_exact(model, x, block) -> None:
    """set_grad_checkpointing(True) reruns `block` in the backward pass and leaves every gradient unchanged."""
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients():
        model.zero_grad()
        calls.clear()
        model(x).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    checkpointed = gradients()
    assert len(calls) == 2  # the block ran again in the backward pass
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, msg=n)
