"""`python -m pipeline.gpus --gpus N [--share K] -- COMMAND ...`: run one job on GPUs of its own.

A local driver (Snakemake, `dvc repro`) runs jobs side by side but gives none of them a GPU: every job would
land on cuda:0. pipeline.stages puts this wrapper in front of every job that asks for GPUs (its `resources`).
It picks the job's GPUs, runs COMMAND with CUDA_VISIBLE_DEVICES set to them, holds them until COMMAND exits,
passes SIGTERM and SIGINT on to it and returns its exit code:

- the visible GPUs are the entries of CUDA_VISIBLE_DEVICES (indices or UUIDs, as written), else torch's count;
- a job that needs as many as are visible or more takes them all and locks nothing. A Slurm job sees exactly its
  own GPUs, numbered from 0 in every job: locks named "0" would make two jobs of one node wait for each other;
- otherwise it claims one slot on each of N GPUs, K slots per GPU (`--share K`: small jobs may share a GPU; a job
  of K = 1 has its GPU to itself, no job of any K beside it), by a non-blocking flock on one file per (GPU, K, slot)
  in a per-user folder, the least claimed GPUs first, and waits while too few GPUs have room. The OS drops a lock
  when its holders die: no stale claims.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 1.0  # how often a waiting job looks for free slots


def visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch  # deferred: a second or more to import, and needed only when CUDA_VISIBLE_DEVICES does not say
    return [str(i) for i in range(torch.cuda.device_count())]


def lock_folder() -> Path:
    """The folder of the slot files: one fixed folder per user and machine (PIPELINE_GPU_LOCKS overrides it). Not the
    login session's runtime folder: it is removed at the last logout while jobs still hold their locks in it."""
    folder = Path(os.environ.get("PIPELINE_GPU_LOCKS") or f"/tmp/pipeline-gpus-{os.getuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _key(gpu: str) -> str:
    """A GPU's name as a file name (MIG UUIDs may hold '/')."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", gpu)


def _try_lock(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive lock, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _claims(folder: Path, gpu: str) -> list[tuple[int, int]]:
    """The (share, slot) of every claim some process holds on `gpu` (a slot file is named GPU.SHARE.SLOT.lock)."""
    held = []
    for path in folder.glob(f"{_key(gpu)}.*.*.lock"):
        fd = _try_lock(path)
        if fd is None:
            share, slot = path.name.split(".")[1:3]
            held.append((int(share), int(slot)))
        else:
            os.close(fd)  # closing drops the probe's lock
    return held


def claim(gpus: list[str], n: int, share: int, folder: Path) -> tuple[list[str], list[int]] | None:
    """Lock a slot on each of the `n` least claimed GPUs with room: those GPUs and the descriptors holding their
    locks, or None when fewer than `n` GPUs have room. A GPU has room for a job of `--share K` while its claims are
    fewer than K and fewer than the share of every job already on it: a job alone on its GPU (K = 1) neither joins
    nor is joined."""
    mutex = os.open(folder / "claiming.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX)  # one claimer at a time: the counts stay true until its locks are taken
        claims = {gpu: _claims(folder, gpu) for gpu in gpus}
        room = sorted((g for g in gpus if len(claims[g]) < min([share] + [k for k, _ in claims[g]])),
                      key=lambda g: len(claims[g]))  # ties: in order
        if len(room) < n:
            return None
        taken = room[:n]
        slots = [min(set(range(share)) - {s for k, s in claims[g] if k == share}) for g in taken]
        return taken, [_try_lock(folder / f"{_key(g)}.{share}.{s}.lock") for g, s in zip(taken, slots, strict=True)]
    finally:
        os.close(mutex)


def wait_and_claim(gpus: list[str], n: int, share: int) -> tuple[list[str], list[int]]:
    folder = lock_folder()
    waiting = False
    while (claimed := claim(gpus, n, share, folder)) is None:
        if not waiting:
            print(f"gpus: waiting for {n} of GPUs {','.join(gpus)} to have a free slot ({share} per GPU)",
                  file=sys.stderr, flush=True)
            waiting = True
        time.sleep(POLL_S)
    return claimed


def _sigint_from_terminal() -> bool:
    """Whether this process is in its terminal's foreground process group: a Ctrl-C there reached the child too,
    and a second SIGINT would interrupt the child's own clean-up."""
    try:
        tty = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


def run(command: list[str], env: dict[str, str], hold: list[int]) -> int:
    """Run `command` until it exits, passing SIGTERM and SIGINT on to it: its exit code (128 + N when signal N ended
    it, as a shell says). The child inherits the descriptors in `hold` (the slot locks), so that a child outliving
    this process (killed alone) still holds its GPUs."""
    child: list[subprocess.Popen] = []
    early: list[int] = []  # signals that came before the child existed

    def forward(signum, frame):
        if signum == signal.SIGINT and _sigint_from_terminal():
            return
        if child:
            child[0].send_signal(signum)
        else:
            early.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    child.append(subprocess.Popen(command, env=env, pass_fds=hold))
    for signum in early:
        child[0].send_signal(signum)
    code = child[0].wait()
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m pipeline.gpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --gpus N [--share K] -- COMMAND [ARGS ...]")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs the job needs (0: CUDA_VISIBLE_DEVICES as is)")
    parser.add_argument("--share", type=int, default=1, help="jobs that may share one GPU (default 1: it alone)")
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    if not command:
        parser.error("give the command after `--`")
    if args.gpus < 0 or args.share < 1:
        parser.error("--gpus must be >= 0 and --share >= 1")
    if args.gpus == 0:
        return run(command, dict(os.environ), [])

    gpus = visible_gpus()
    if args.gpus >= len(gpus):
        if args.gpus > len(gpus):
            print(f"gpus: warning: the job needs {args.gpus} GPUs, {len(gpus)} are visible; it gets them all",
                  file=sys.stderr, flush=True)
        taken, hold, how = gpus, [], "all visible, no lock"
    else:
        try:
            taken, hold = wait_and_claim(gpus, args.gpus, args.share)
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        how = f"of {','.join(gpus)}, locked in {lock_folder()}, {args.share} job(s) per GPU"
    devices = ",".join(taken)
    print(f"gpus: CUDA_VISIBLE_DEVICES={devices or repr(devices)} ({how})", file=sys.stderr, flush=True)
    return run(command, {**os.environ, "CUDA_VISIBLE_DEVICES": devices}, hold)


if __name__ == "__main__":
    sys.exit(main())
