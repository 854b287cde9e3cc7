"""A fresh MLflow tracking server on its own PostgreSQL database, for tests that log over HTTP.

A pytest plugin (`pytest_plugins = ["mlflow_server"]` in tests/conftest.py or in a test module loads it):
nothing starts unless a test asks for the `mlflow_server` fixture. The fixture runs scripts/mlflow-server.sh
(the script behind `make mlflow-server`) in a throw-away folder on free ports, points MLFLOW_TRACKING_URI at
it for the test (subprocesses inherit it), yields the URI, and stops the server and database afterwards.

    def test_x(mlflow_server):
        ...                                   # pipeline commands log to the server
        runs = server_client(mlflow_server).search_runs(...)

PYTEST_DONT_REWRITE: test modules import the helpers below before pytest loads this file as a plugin (no asserts).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mlflow-server.sh"
NO_POSTGRES = 3  # the script's exit status when PostgreSQL is missing and cannot be installed
_folders: dict[str, Path] = {}  # tracking URI -> the folder of the server that serves it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(action: str, folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action, str(folder)], env=env, capture_output=True, text=True)


@contextlib.contextmanager
def running_server(workers: int = 2) -> Iterator[str]:
    """A fresh server and database (new folder, free ports) for the duration of the block; yields its URI.

    The folder is made with mkdtemp under the system temp folder, not pytest's tmp_path: pytest's base folder is
    private (mode 700) and, when tests run as root, the database runs as the postgres user, which must reach it.
    """
    folder, uri = Path(tempfile.mkdtemp(prefix="mlflow-server-")), None
    # The tests' own python first: the script starts the `mlflow` it finds on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_SERVER_PORT": str(free_port()), "MLFLOW_SERVER_PG_PORT": str(free_port()),
           "MLFLOW_SERVER_WORKERS": str(workers)}
    try:
        out = _script("start", folder, env)
        if out.returncode == NO_POSTGRES:
            pytest.skip(f"no PostgreSQL for an MLflow server: {out.stderr.strip()}")
        if out.returncode != 0:
            logs = "".join(f"\n--- {f.name}\n" + f.read_text()[-3000:] for f in sorted(folder.glob("*.log")))
            pytest.fail(f"scripts/mlflow-server.sh start failed ({out.returncode}):\n{out.stderr}{logs}")
        uri = out.stdout.strip().rsplit("=", 1)[-1]  # "export MLFLOW_TRACKING_URI=http://127.0.0.1:PORT"
        _folders[uri] = folder
        yield uri
    finally:
        _script("stop", folder, env)
        _folders.pop(uri, None)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def mlflow_server(monkeypatch) -> Iterator[str]:
    """The URI of a fresh MLflow server (PostgreSQL backend, proxied artifact store), also set as
    MLFLOW_TRACKING_URI for the test and the processes it starts; stopped and deleted after the test."""
    with running_server() as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def server_client(uri: str):
    """An MlflowClient for the server at `uri` (the tracking URI the `mlflow_server` fixture yields)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def server_artifacts(uri: str) -> Path:
    """The folder where the server at `uri` stores the artifacts clients upload (mlflow-artifacts:/)."""
    return _folders[uri] / "artifacts"
