"""pipeline.gpus: jobs of a local driver get GPUs of their own (no GPU needed: the jobs print the
CUDA_VISIBLE_DEVICES they were given), and the stages that ask for GPUs run under it."""
import os
import signal
import subprocess
import sys

from pipeline.repo import REPO_ROOT
from pipeline.stages import stages
from pipeline.study import load_study

# The job: prints the GPUs it was given, then holds them for argv[1] seconds.
JOB = "import os, sys, time; print(os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(float(sys.argv[1]))"


def start(tmp_path, visible: str, *options: str, code: str = JOB, seconds: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "PIPELINE_GPU_LOCKS": str(tmp_path)}
    command = [sys.executable, "-m", "pipeline.gpus", *options, "--", sys.executable, "-c", code, str(seconds)]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def first_line(job: subprocess.Popen) -> str:
    """The wrapper's first line: the GPUs it took, or that it waits."""
    return job.stderr.readline()


def given(job: subprocess.Popen) -> str:
    """The GPUs the job's command was given."""
    return job.stdout.readline().strip()


def test_parallel_jobs_get_different_gpus_and_a_third_waits_for_the_first_freed(tmp_path):
    first = start(tmp_path, "0,1", "--gpus", "1", seconds=1.0)
    assert "CUDA_VISIBLE_DEVICES=" in first_line(first)
    second = start(tmp_path, "0,1", "--gpus", "1", seconds=3.0)
    assert "CUDA_VISIBLE_DEVICES=" in first_line(second)
    third = start(tmp_path, "0,1", "--gpus", "1")
    assert "waiting" in first_line(third)
    assert "CUDA_VISIBLE_DEVICES=" in third.stderr.readline()
    assert second.poll() is None  # the third took a GPU while the second still held its own
    gpus = given(first), given(second)
    assert sorted(gpus) == ["0", "1"] and given(third) == gpus[0]
    assert [job.wait() for job in (first, second, third)] == [0, 0, 0]


def test_shared_gpus_take_the_least_claimed_first(tmp_path):
    jobs = []
    for _ in range(3):
        jobs.append(start(tmp_path, "0,1", "--gpus", "1", "--share", "2", seconds=1.0))
        assert "CUDA_VISIBLE_DEVICES=" in first_line(jobs[-1])  # none waits: 4 slots
    assert [given(job) for job in jobs] == ["0", "1", "0"]
    assert [job.wait() for job in jobs] == [0, 0, 0]


def test_a_job_alone_on_its_gpu_is_not_joined_by_shared_jobs(tmp_path):
    """A measurement (--share 1) keeps its GPU to itself: shared training jobs fill the other GPU, then wait."""
    alone = start(tmp_path, "0,1", "--gpus", "1", "--share", "1", seconds=3.0)
    assert "CUDA_VISIBLE_DEVICES=" in first_line(alone)
    shared = [start(tmp_path, "0,1", "--gpus", "1", "--share", "2", seconds=0.5) for _ in range(2)]
    assert all("CUDA_VISIBLE_DEVICES=" in first_line(job) for job in shared)
    third = start(tmp_path, "0,1", "--gpus", "1", "--share", "2")
    assert "waiting" in first_line(third)  # the other GPU is full (2 of 2), and the first is the measurement's
    assert "CUDA_VISIBLE_DEVICES=" in third.stderr.readline()
    assert alone.poll() is None  # it got a shared job's slot, not the measurement's GPU
    gpu = given(alone)
    assert {given(job) for job in shared} == {given(third)} != {gpu}
    assert [job.wait() for job in (alone, *shared, third)] == [0, 0, 0, 0]


def test_a_job_needing_every_visible_gpu_takes_them_all_without_locks(tmp_path):
    """Like Slurm jobs of one node, each of which sees its own GPU as "0": neither waits for the other."""
    jobs = [start(tmp_path, "0", "--gpus", "1", seconds=1.0) for _ in range(2)]
    assert all("all visible, no lock" in first_line(job) for job in jobs)
    assert [given(job) for job in jobs] == ["0", "0"]
    more = start(tmp_path, "0", "--gpus", "2")
    assert "warning" in first_line(more) and given(more) == "0"
    assert [job.wait() for job in (*jobs, more)] == [0, 0, 0]
    assert not (tmp_path / "pipeline-gpus").exists()


def test_the_exit_code_is_the_commands_and_sigterm_reaches_it(tmp_path):
    assert start(tmp_path, "0,1", "--gpus", "1", code="raise SystemExit(3)").wait() == 3
    trapping = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(7)); "
                "print('ready', flush=True); time.sleep(30)")
    plain = "import time; print('ready', flush=True); time.sleep(30)"
    for code, exit_code in ((trapping, 7), (plain, 128 + signal.SIGTERM)):
        job = start(tmp_path, "0,1", "--gpus", "1", code=code)
        assert given(job) == "ready"
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=10) == exit_code
    assert start(tmp_path, "3,5", "--gpus", "0", code="import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
                 ).communicate()[0].strip() == "3,5"  # --gpus 0: as it was


def test_the_paper_profiles_gpu_stages_run_under_the_wrapper():
    by_name = {s.name: s for s in stages(load_study("paper", check_data=False))}
    train = [s for name, s in by_name.items() if name.startswith("train-")]
    assert train and all(s.launcher.startswith("python -m pipeline.gpus --gpus 8 --share 1 -- torchrun ")
                         for s in train)
    for name in ("benchmark", "latency-breakdown"):
        assert by_name[name].launcher == "python -m pipeline.gpus --gpus 1 --share 1 -- python -m pipeline"
    assert not any("pipeline.gpus" in s.launcher for s in stages(load_study("default", check_data=False)))
