# Shared helpers: the study (validated before anything runs), its stage graph and the MLflow session.
import re
import sys
from pathlib import Path

# The pipeline package of this checkout (not another one installed in the environment) defines the study.
sys.path.insert(0, str(Path(workflow.basedir).parent))

from pipeline import tracking
from pipeline.repo import hold_driver_lock
from pipeline.stages import stages
from pipeline.study import load_study

PROFILE = config["profile"]
STUDY = load_study(
    PROFILE,
    overrides={"data": {"root": config["data_root"]}} if config.get("data_root") else None,
)
STAGES = stages(STUDY)
LOGS = f"logs/{PROFILE}"
# Snakemake scales a job's threads down to --cores: jobs that ask for this take the whole machine, so
# the throughput and latency measurements run with nothing else beside them.
MAX_THREADS = 1024
THREADS = {"all": MAX_THREADS, "train": STUDY.settings["train"]["threads"], "one": 1, None: 1}


def output(stage, path):
    """A stage's output as Snakemake declares it: folders as directory(), the report's tables (CSV) and figures
    (PNG) as items of `snakemake --report`."""
    if path in stage.directories:
        return directory(path)
    if path.startswith(f"{STUDY.report_dir}/tables/") and path.endswith(".csv"):
        return report(path, category="Tables", labels={"table": Path(path).stem})
    if path.startswith(f"{STUDY.report_dir}/figures/") and path.endswith(".png"):
        return report(path, category="Figures", labels={"figure": Path(path).stem})
    return path


def command_line(stage, wildcards, threads):
    """`python -m pipeline <stage> ...` of one job: the profile, its teacher (foreach stages) and its threads."""
    command = stage.command.replace("{profile}", PROFILE).replace("{run}", wildcards.get("run", ""))
    return f"{stage.launcher} {command}" + (f" --threads {threads}" if stage.threads else "")


def final_outputs():
    """The outputs of the stages no other stage reads from (the report, the ONNX exports): asking for them asks
    for the whole DAG."""
    read = {p for stage in STAGES for p in stage.each(stage.deps)}
    return [p for stage in STAGES if not read & set(stage.each(stage.outputs)) for p in stage.each(stage.outputs)]


def start_mlflow_session():
    # No `dvc repro` on this checkout meanwhile (it would delete outputs this run writes): fails here, before any job.
    hold_driver_lock("snakemake")
    # One experiment per profile, created here before parallel jobs start; one parent run per invocation.
    run_id = tracking.start_session(PROFILE, "snakemake")
    print(f"MLflow: experiment {tracking.experiment_name(PROFILE)}, parent run {run_id}")


def end_mlflow_session(status):
    tracking.end_session(PROFILE, status)
