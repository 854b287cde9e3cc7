# Shared helpers: the study (validated before anything runs), paths and the MLflow session.
import json
import re
import sys
from pathlib import Path

# The pipeline package of this checkout (not another one installed in the environment) defines the study.
sys.path.insert(0, str(Path(workflow.basedir).parent))

from pipeline import tracking
from pipeline.report import FIGURES
from pipeline.identity import STAGE_CODE
from pipeline.study import load_study

PROFILE = config["profile"]
STUDY = load_study(
    PROFILE,
    overrides={"data": {"root": config["data_root"]}} if config.get("data_root") else None,
)
R = str(STUDY.results)
LOGS = f"logs/{PROFILE}"
# Snakemake scales a job's threads down to --cores: jobs that ask for this take the whole machine, so
# the throughput and latency measurements run with nothing else beside them.
MAX_THREADS = 1024


wildcard_constraints:
    run="[A-Za-z0-9_.-]+",


def run_config_json(run):
    """The resolved config of a run: Snakemake reruns a job whose params changed, and only that job (which
    tables show the run is not part of it)."""
    config = STUDY.run_config(run).to_dict()
    config.pop("tables")
    return json.dumps(config, sort_keys=True)


def start_mlflow_session():
    # One experiment per profile, created here before parallel jobs start; one parent run per invocation.
    run_id = tracking.start_session(PROFILE, "snakemake")
    print(f"MLflow: experiment {tracking.experiment_name(PROFILE)}, parent run {run_id}")


def end_mlflow_session(status):
    tracking.end_session(PROFILE, status)


# Order among ready jobs (Snakemake's priority): first the jobs other runs wait for (the teachers, and the job of
# the imitation teacher pooling-ce), then the jobs with the most imitation runs (the longest), so that the last
# jobs to run are short ones and no core idles at the end.
STUDENTS = set(STUDY.student_runs)
WAITED_FOR = 1000


def job_priority(runs):
    if any(set(STUDY.references(r)) & set(runs) for r in STUDY.student_runs):
        return WAITED_FOR
    return sum(1 for r in runs if set(STUDY.references(r)) & STUDENTS)


def job_rule_name(batch):
    return f"train_{re.sub(r'[^A-Za-z0-9_]', '_', batch)}"


def gpu_of(measurement):
    """A measurement on CUDA (the paper profile) asks the cluster for a GPU."""
    return {"gpu": 1} if measurement.get("device") == "cuda" else {}
