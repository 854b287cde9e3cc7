"""The stage graph of a study, declared once: every job's command, inputs, outputs, metrics and plots.

Both drivers are made from it: the Snakemake rules (workflow/rules/*.smk loop over `stages(study)`) and dvc.yaml
(pipeline.dvcgen renders it). A stage's code is an input too: the module that `python -m pipeline <stage>` runs and
every module of the package it imports (pipeline.identity.stage_code), so that changing any of them reruns it.

Paths are the study's (results/<profile>/...). A stage with `foreach` is one job per item (the teachers): `{run}` in
its paths and command stands for the item (a Snakemake wildcard; `${item}` in dvc.yaml).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from pipeline.__main__ import STAGES
from pipeline.identity import stage_code
from pipeline.repo import REPO_ROOT
from pipeline.study import FIGURES, PAPER_RESULTS, Study

# The profile sections a training job reads (DVC's params of the training stages).
TRAIN_SECTIONS = ["data", "models", "train", "teacher_train", "mi_lambdas", "runs", "seeds", "readings"]
WAITED_FOR = 1000  # the priority of the jobs other jobs wait for


@dataclass
class Stage:
    name: str                 # the DVC stage; the Snakemake rule is the name with '-' as '_'
    command: str              # arguments of `<launcher>`, e.g. "evaluate --profile {profile}"
    deps: list[str]           # inputs besides the code (files and folders)
    outs: list[str]           # outputs besides metrics and plots
    metrics: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)      # profile sections it reads (DVC params)
    study_keys: list[str] = field(default_factory=list)  # keys of params/study.yaml it reads (DVC params)
    settings: str | dict[str, str] = ""  # what Snakemake reruns it on when it changes (per item with foreach)
    launcher: str = "python -m pipeline"
    threads: str | None = "all"   # "all": the whole machine (measurements), "train": the profile's, "one", None
    foreach: list[str] | None = None
    log: str = ""                 # under logs/<profile>/, without .log
    priority: int = 0
    resources: dict = field(default_factory=dict)
    directories: list[str] = field(default_factory=list)  # the outputs that are folders
    extra_code: list[str] = field(default_factory=list)   # non-Python files its results depend on

    @property
    def rule(self) -> str:
        return "".join(c if c.isalnum() or c == "_" else "_" for c in self.name)

    @property
    def code(self) -> list[str]:
        return list(stage_code(STAGES[self.command.split()[0]][0])) + self.extra_code

    @property
    def outputs(self) -> list[str]:
        return self.outs + self.metrics + self.plots

    def each(self, paths: list[str]) -> list[str]:
        """`paths` for every item of a foreach stage (`{run}` filled in); a stage without foreach: `paths`."""
        return [p.replace("{run}", item) for item in self.foreach for p in paths] if self.foreach else list(paths)


def stages(study: Study) -> list[Stage]:
    """The study's jobs, in the order of the DAG."""
    return [prepare_stage(study), teacher_stage(study), *student_stages(study), *evaluate_stages(study),
            benchmark_stage(study), *export_stages(study), latency_stage(study), report_stage(study)]


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _str(paths) -> list[str]:
    return [str(p) for p in paths]


def prepare_stage(study: Study) -> Stage:
    data = str(study.data_dir)
    return Stage("prepare-data", "prepare-data --profile {profile}", [], [data], params=["data"],
                 settings=_json(study.settings["data"]), threads=None, log="prepare_data", directories=[data])


def _training(study: Study, runs: list[str]) -> dict:
    return {"outs": _str(study.model_path(r) for r in runs),
            "metrics": _str(study.run_dir(r) / "metrics.json" for r in runs),
            "plots": _str(study.run_dir(r) / "history.json" for r in runs)}


def run_config_json(study: Study, run: str) -> str:
    """The resolved config of a run: Snakemake reruns a job whose params changed, and only that job (which
    tables show the run is not part of it)."""
    config = study.run_config(run).to_dict()
    config.pop("tables")
    return _json(config)


def on_gpus(resources: dict, launcher: str = "python -m pipeline", share: int = 1) -> str:
    """`launcher` under pipeline.gpus when the job asks for GPUs: a local driver (Snakemake, dvc repro) gives its
    parallel jobs no GPUs of their own, the wrapper does (a Slurm job sees only its own GPUs, and it takes them all).
    `share`: jobs that may run on one GPU at once (a measurement: 1, alone on its GPU)."""
    n = resources.get("gpu", 0)
    return f"python -m pipeline.gpus --gpus {n} --share {share} -- {launcher}" if n else launcher


def _train_launcher(study: Study) -> str:
    return on_gpus(study.train_resources, study.train_launcher, study.settings["train"]["jobs_per_gpu"])


def teacher_stage(study: Study) -> Stage:
    return Stage("train-teacher", "train --profile {profile} --run {run} --no-progress", [str(study.data_dir)],
                 **_training(study, ["{run}"]), params=TRAIN_SECTIONS, study_keys=["teachers.{run}"],
                 settings={t: run_config_json(study, t) for t in study.teacher_runs}, launcher=_train_launcher(study),
                 threads="train", foreach=study.teacher_runs, log="train/{run}", priority=WAITED_FOR,
                 resources=study.train_resources)


def job_priority(study: Study, runs: list[str]) -> int:
    """Order among ready jobs: first the jobs other runs wait for (the teachers, and the job of the imitation
    teacher pooling-ce), then the jobs with the most imitation runs (the longest), so that the last jobs to run
    are short ones and no core idles at the end."""
    if any(set(study.references(r)) & set(runs) for r in study.student_runs):
        return WAITED_FOR
    return sum(1 for r in runs if set(study.references(r)) & set(study.student_runs))


def student_stages(study: Study) -> list[Stage]:
    """One job per batch of student runs (study.train_batches), trained one after another in one process. A job
    reruns when one of its runs' configs or inputs changed; its unchanged runs resume from their finished
    checkpoints (seconds) instead of training again."""
    out = []
    for job, runs in study.train_batches.items():
        teachers = sorted({str(study.model_path(t)) for r in runs for t in study.references(r)})
        out.append(Stage(f"train-{job}", f"train --profile {{profile}} --run {' '.join(runs)} --no-progress",
                         [str(study.data_dir), *teachers], **_training(study, runs), params=TRAIN_SECTIONS,
                         study_keys=sorted({k for r in runs for k in study.study_key(study.variant_of(r))}),
                         settings=_json([run_config_json(study, r) for r in runs]), launcher=_train_launcher(study),
                         threads="train", log=f"train/{job}", priority=job_priority(study, runs),
                         resources=study.train_resources))
    return out


def _gpu(measurement: dict) -> dict:
    """A measurement on CUDA (the paper profile) asks the cluster for a GPU."""
    return {"gpu": 1} if measurement.get("device") == "cuda" else {}


def evaluate_stages(study: Study) -> list[Stage]:
    """One job per training job (the teachers: one job for all of them), one thread each: it re-parameterizes the
    job's affine students and evaluates its runs while the other training jobs run, instead of one evaluation of
    every run after the last training job. With `evaluate.device: cuda` each job asks for a GPU (auto asks for
    none: it takes one if the job sees one)."""
    jobs = {"teachers": study.teacher_runs, **study.train_batches}
    gpu = _gpu(study.settings["evaluate"])
    out = []
    for job, runs in jobs.items():
        affine = [r for r in runs if study.needs_reparameterize(r)]
        out.append(Stage(f"evaluate-{job}", f"evaluate --profile {{profile}} --job {job}",
                         [str(study.data_dir), *_str(study.model_path(r) for r in runs),
                          *_str(study.run_dir(r) / "metrics.json" for r in runs)],
                         [*_str(study.deploy_dir(r) / "model.pt" for r in affine),
                          *_str(study.predictions_path(r) for r in runs),
                          *_str(study.decisions_path(r) for r in runs if study.is_adaptive(r))],
                         metrics=[*_str(study.deploy_dir(r) / "reparam.json" for r in affine),
                                  *_str(study.eval_path(r) for r in runs)],
                         params=["evaluate"], settings=_json(study.settings["evaluate"]), threads="one",
                         log=f"evaluate/{job}", launcher=on_gpus(gpu, share=study.settings["train"]["jobs_per_gpu"]),
                         resources=gpu))
    return out


def benchmark_stage(study: Study) -> Stage:
    """The study's throughput benchmark, alone on the machine: the first seed's deploy models (and the training
    form of its first affine student) in one interleaved run, then T6 at every size."""
    first = [r for r in study.runs if study.run_specs[r][2] == study.settings["seeds"][0]]
    affine = [r for r in first if study.needs_reparameterize(r)][:1]
    return Stage("benchmark", "benchmark --profile {profile}",
                 [str(study.data_dir), *_str(study.deployed_model(r) for r in first),
                  *_str(study.model_path(r) for r in affine)], [], metrics=[str(study.benchmark_path)],
                 params=["evaluate"], settings=_json(study.settings["evaluate"]), log="benchmark",
                 launcher=on_gpus(_gpu(study.settings["evaluate"]["benchmark"])),
                 resources=_gpu(study.settings["evaluate"]["benchmark"]))


def export_stages(study: Study) -> list[Stage]:
    """One job per seed, side by side with each other and the report: no timing here (ONNX Runtime is timed in
    evaluate's benchmark). The first seed's job registers the study's best student."""
    out = []
    for seed in study.settings["seeds"]:
        runs = [r for r in study.export_runs if study.run_specs[r][2] == seed]
        out.append(Stage(f"export-seed{seed}", f"export --profile {{profile}} --seed {seed} --no-progress",
                         [str(study.data_dir), *_str(study.deployed_model(r) for r in runs),
                          *_str(study.eval_path(r) for r in study.export_runs)],
                         _str(study.export_dir(r) / "model.onnx" for r in runs),
                         metrics=[*_str(study.export_dir(r) / "export.json" for r in runs),
                                  str(study.export_summary_path(seed))],
                         params=["export"], settings=_json(study.settings["export"]), threads="one",
                         log=f"export-seed{seed}"))
    return out


def latency_stage(study: Study) -> Stage:
    return Stage("latency-breakdown", "latency-breakdown --profile {profile}", [], [],
                 metrics=[str(study.latency_path)], params=["latency"], settings=_json(study.settings["latency"]),
                 log="latency_breakdown", launcher=on_gpus(_gpu(study.settings["latency"])),
                 resources=_gpu(study.settings["latency"]))


def report_stage(study: Study) -> Stage:
    runs, tables = study.runs, list(study.tables)
    return Stage("report", "report --profile {profile}",
                 [*_str(study.eval_path(r) for r in runs),
                  *_str(study.decisions_path(r) for r in runs if study.is_adaptive(r)),
                  *_str(study.run_dir(r) / "history.json" for r in runs),
                  *_str(study.predictions_path(r) for r in runs), str(study.benchmark_path), str(study.latency_path)],
                 [str(study.report_dir / "README.md"),
                  *_str(study.table_path(t, suffix) for t in tables for suffix in ("md", "csv", "tex")),
                  str(study.table_path("F1")), str(study.table_path("regime")), str(study.table_path("regime", "csv")),
                  *_str(study.figure_path(f, "pdf") for f in FIGURES)],
                 metrics=[str(study.report_dir / "summary.json")],
                 plots=_str(study.figure_path(f) for f in FIGURES),
                 params=["report", "seeds", "readings"],
                 study_keys=["tables", "guidelines"] + (["readings"] if study.points else []),
                 settings=_json([study.tables, study.guidelines, study.points, study.settings["report"]]),
                 threads=None,
                 log="report", extra_code=[str(PAPER_RESULTS.relative_to(REPO_ROOT))])
