"""The study: params/ resolved into runs, tables and file paths, for every driver, report and test.

params/defaults.yaml   shared defaults
params/<profile>.yaml  a profile over them: smoke, default, paper, or any file of the user
params/study.yaml      teachers, variants, the paper's tables and guidelines, and the readings of its open points

`load_study(profile)` validates everything before anything runs (JSON schema plus the checks a schema
cannot make: registry model names, run references, dataset paths) and raises one clear error listing
every problem.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import jsonschema
import timm
import yaml

import pipeline.models  # noqa: F401  (registers the project's models: model names are checked against timm's registry)
from pipeline.config import ConfigError, TrainConfig, apply_overrides, config_from_dict
from pipeline.data import DataError, find_fashion_mnist, load_prepared
from pipeline.identity import INPUT_KEYS, check_model_file, identity_changes, run_identity
from pipeline.io import load_checkpoint
from pipeline.repo import REPO_ROOT

PARAMS = REPO_ROOT / "params"
SCHEMA = REPO_ROOT / "workflow" / "schemas" / "study.schema.yaml"
PAPER_RESULTS = PARAMS / "paper_results.csv"  # the paper's numbers, beside which the report puts ours
NOT_PROFILES = ("defaults", "study")  # params/ files that are not profiles
# Keys of the `train` section that describe a training job, not a run: how its runs are grouped and launched, and
# what it asks a cluster for. They change neither a run's config nor its identity.
JOB_KEYS = ("runs_per_job", "nproc", "gpus", "jobs_per_gpu", "mem_mb", "runtime")
# The report's figures: results/<profile>/report/figures/<name>.{png,pdf} (pipeline.figures draws them).
FIGURES = ["accuracy_vs_throughput", "ablation_deltas", "training_curves", "latency_breakdown",
           "reparameterization_error", "adavit_decisions"]
PROFILE_SECTIONS = ("data", "models", "train", "teacher_train", "mi_lambdas", "runs", "seeds", "readings", "evaluate",
                    "latency", "report")
READING_SEP = "--"  # a run of a variant under another reading of an open point: <variant>--<reading>


class StudyError(ValueError):
    pass


class StaleResultError(RuntimeError):
    """A result computed from inputs that have changed since."""


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _read(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise StudyError(f"{path}: not found") from None
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML ({e})") from None


@dataclass
class Study:
    profile: str
    settings: dict
    teachers: dict[str, dict]
    variants: dict[str, dict]
    tables: dict[str, dict]
    results: Path
    guidelines: list[dict] = field(default_factory=list)
    # the open points whose readings this profile runs (study.yaml `readings`, the profile's `readings.points`), and
    # each reading variant: its base variant, point and reading
    points: dict[str, dict] = field(default_factory=dict)
    reading_runs: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    _configs: dict[str, TrainConfig] = field(default_factory=dict, repr=False, compare=False)
    _data_hash: str | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------------------------------- runs
    def seed_name(self, variant: str, seed: int) -> str:
        return variant if seed == self.settings["seeds"][0] else f"{variant}-seed{seed}"

    @cached_property
    def run_specs(self) -> dict[str, tuple[str, dict, int]]:
        """run name -> (role, spec, seed). Teachers run once; student variants once per seed."""
        runs = {name: ("teacher", spec, self.settings["seeds"][0]) for name, spec in self.teachers.items()}
        for seed in self.settings["seeds"]:
            for name, spec in self.variants.items():
                runs[self.seed_name(name, seed)] = ("student", spec, seed)
        return runs

    @property
    def runs(self) -> list[str]:
        return list(self.run_specs)

    @property
    def teacher_runs(self) -> list[str]:
        return list(self.teachers)

    @property
    def student_runs(self) -> list[str]:
        return [r for r, (role, _, _) in self.run_specs.items() if role == "student"]

    @property
    def export_runs(self) -> list[str]:
        """The students whose deploy model `export` writes as ONNX: all but AdaViT's (no single static graph)."""
        return [r for r in self.student_runs if not self.is_adaptive(r)]

    @property
    def train_launcher(self) -> str:
        """What a training job runs (both drivers): `python -m pipeline`, or with `train.nproc` > 1 the same
        module under torchrun, one process per GPU (or CPU share), on one node (`--` keeps torchrun from reading
        the stage's options as abbreviations of its own)."""
        n = self.settings["train"]["nproc"]
        return "python -m pipeline" if n == 1 else f"torchrun --standalone --nproc_per_node {n} -m pipeline --"

    @property
    def train_resources(self) -> dict[str, int]:
        """What a training job asks a cluster for (Snakemake resources): memory, minutes, GPUs."""
        t = self.settings["train"]
        gpus = t["gpus"] * t["nproc"]
        return {"mem_mb": t["mem_mb"], "runtime": t["runtime"], **({"gpu": gpus} if gpus else {})}

    @cached_property
    def train_batches(self) -> dict[str, list[str]]:
        """The student runs grouped into training jobs of at most `train.runs_per_job` runs each, which one process
        trains one after another: the per-process start-up (imports, MLflow store: about 7 s on CPU) is paid once
        per job. A job holds runs of one seed and one dependency level (a run never waits for a run of its own
        job or a later one); within a level, the runs that read no teacher come first, so that their jobs can
        start while the teachers train. Sizes are balanced. runs_per_job 1 is a job per run, named by the run."""
        n = self.settings["train"].get("runs_per_job", 1)
        students, level = set(self.student_runs), {}

        def depth(run: str) -> int:
            if run not in level:
                level[run] = max((depth(r) + 1 for r in self.references(run) if r in students), default=0)
            return level[run]

        batches = {}
        for seed in self.settings["seeds"]:
            runs = [self.seed_name(v, seed) for v in self.variants]
            for lvl in sorted({depth(r) for r in runs}):
                group = sorted((r for r in runs if depth(r) == lvl), key=lambda r: len(self.references(r)))
                k = -(-len(group) // n)  # jobs of this level: sizes differ by at most one
                for i in range(k):
                    chunk = group[i * len(group) // k:(i + 1) * len(group) // k]
                    batches[chunk[0] if n == 1 else f"students-seed{seed}-level{lvl}-{i + 1}"] = chunk
        return batches

    def variant_of(self, run: str) -> str:
        for seed in self.settings["seeds"]:
            for v in self.variants:
                if self.seed_name(v, seed) == run:
                    return v
        return run

    def under_reading(self, variant: str, reading: str) -> str:
        """The variant that runs `variant` under `reading` (of one of the profile's points): its reading variant,
        or the variant itself where the reading does not apply to it or is the study's own."""
        name = f"{variant}{READING_SEP}{reading}"
        return name if name in self.reading_runs else variant

    def study_key(self, variant: str) -> list[str]:
        """The keys of params/study.yaml a variant's config is read from (DVC params of its training stage)."""
        if variant in self.reading_runs:
            base, point, _ = self.reading_runs[variant]
            return [f"variants.{base}", f"readings.{point}"]
        return [f"variants.{variant}"]

    def references(self, run: str) -> list[str]:
        """The runs this run needs first (its teachers and partial-init source)."""
        spec = self.run_specs[run][1]
        refs = []
        for section, key in INPUT_KEYS:
            value = (spec.get(section) or {}).get(key) if section else spec.get(key)
            if value in self.run_specs:
                refs.append(value)
        return sorted(set(refs))

    def cell(self, ref: str) -> tuple[str, str, str, str | None]:
        """A table cell named `TABLE/row` (metric top1) or `TABLE/row/metric`: (table, row, metric, run)."""
        table, row, metric = (ref.split("/") + ["top1"])[:3]
        for r in self.tables.get(table, {}).get("rows", []):
            if r["row"] == row and r.get("metric", "top1") == metric:
                return table, row, metric, r.get("run")
        raise StudyError(f"no table cell {ref!r} (TABLE/row or TABLE/row/metric of params/study.yaml's tables)")

    def tables_of(self, run: str) -> list[str]:
        variant = self.variant_of(run)
        return sorted(t for t, table in self.tables.items() if any(r.get("run") == variant for r in table["rows"]))

    # ---------------------------------------------------------------------------------------- paths
    @property
    def data_dir(self) -> Path:
        return self.results / "data"

    def run_dir(self, run: str) -> Path:
        return self.results / "runs" / run

    def model_path(self, run: str) -> Path:
        return self.run_dir(run) / "model.pt"

    def deploy_dir(self, run: str) -> Path:
        return self.results / "deploy" / run

    def export_dir(self, run: str) -> Path:
        return self.results / "export" / run

    def export_summary_path(self, seed: int) -> Path:
        """An export job's record: every ONNX check of its seed's students (the first seed's: the registered best)."""
        return self.results / "export" / f"summary-seed{seed}.json"

    def eval_path(self, run: str) -> Path:
        return self.results / "eval" / f"{run}.json"

    @property
    def benchmark_path(self) -> Path:
        return self.results / "benchmark.json"

    @property
    def latency_path(self) -> Path:
        return self.results / "latency.json"

    def predictions_path(self, run: str) -> Path:
        """Each test image's predicted class and label under the deploy model (the report's statistics)."""
        return self.results / "eval" / f"{run}.predictions.npz"

    @property
    def report_dir(self) -> Path:
        """The report stage's output; `python -m pipeline publish` copies it to reports/<profile>/."""
        return self.results / "report"

    def figure_path(self, name: str, suffix: str = "png") -> Path:
        return self.report_dir / "figures" / f"{name}.{suffix}"

    def table_path(self, table: str, suffix: str = "md") -> Path:
        return self.report_dir / "tables" / f"{table}.{suffix}"

    def decisions_path(self, run: str) -> Path:
        """AdaViT runs: the patches each block kept on a few test images (the report's figure)."""
        return self.results / "eval" / f"{run}.decisions.json"

    def is_adaptive(self, run: str) -> bool:
        """An AdaViT run (registry names ada_*): evaluated on both inference paths, with expected MACs."""
        return self.run_config(run).model.startswith("ada_")

    def init_source(self, run: str) -> str | None:
        """The run whose checkpoint this run is initialised from (`init:`), if it is a run of the study."""
        value = self.run_specs[run][1].get("init")
        return value if value in self.run_specs else None

    def needs_reparameterize(self, run: str) -> bool:
        cfg = self.run_config(run)
        return cfg.model.startswith("riformer") and cfg.model_kwargs.get("token_mixer", "affine") == "affine"

    def deployed_model(self, run: str) -> Path:
        """The model evaluation reads: the re-parameterized one for affine students, else the trained one."""
        return self.deploy_dir(run) / "model.pt" if self.needs_reparameterize(run) else self.model_path(run)

    # ------------------------------------------------------------------------------------- identity
    def identity(self, run: str) -> dict:
        """The identity a current result of `run` must have (pipeline.identity): its resolved config, the prepared
        data, its teacher / init files and the training code, as they are now."""
        if self._data_hash is None:
            self._data_hash = load_prepared(self.data_dir).data_hash
        return run_identity(self.run_config(run), self._data_hash)

    def current_checkpoint(self, run: str, path) -> dict:
        """The checkpoint at `path` of `run`, if it was trained from the run's current inputs; otherwise a
        StaleResultError naming what changed; a model.pt changed since its training wrote it is an error."""
        check_model_file(path, f"run {run!r}:")
        ckpt = load_checkpoint(path)
        changes = identity_changes(ckpt.get("identity"), self.identity(run))
        if changes:
            raise StaleResultError(f"{path}: run {run!r} of profile {self.profile} was trained from inputs that "
                                   f"have changed since ({'; '.join(changes)}): rerun its training")
        return ckpt

    # -------------------------------------------------------------------------------------- configs
    def run_values(self, run: str, threads: int | None = None) -> dict:
        """A run's training config as the merged dict run_config builds it from (teachers and inits that are runs
        of the study resolved to their model.pt)."""
        role, spec, seed = self.run_specs[run]
        spec = copy.deepcopy(spec)
        model = self.settings["models"][spec.pop("model")]
        train = {k: v for k, v in self.settings["train"].items() if k not in JOB_KEYS}  # a job's, not a run's
        values = deep_merge(train, self.settings["teacher_train"] if role == "teacher" else {})
        values = deep_merge(values, {"model": model["name"], "model_kwargs": model.get("kwargs", {})})
        values = deep_merge(values, spec)
        variant = self.variant_of(run)
        if variant in self.reading_runs:  # the base's profile override, then the reading, then its own override
            base, point, reading = self.reading_runs[variant]
            values = deep_merge(values, self.settings["runs"].get(base, {}))
            values = deep_merge(values, self.points[point]["readings"][reading].get("set") or {})
        values = deep_merge(values, self.settings["runs"].get(variant, {}))
        mi = values.setdefault("mi", {})
        if mi.get("teacher"):
            for k, v in self.settings["mi_lambdas"].items():
                mi.setdefault(k, v)
        for section, key in INPUT_KEYS:
            node = values.get(section) if section else values
            if node and node.get(key) in self.run_specs:
                node[key] = str(self.model_path(node[key]))
        values.update(name=run, variant=self.variant_of(run), role=role, seed=seed, tables=self.tables_of(run))
        values.setdefault("data", {})["path"] = str(self.data_dir)
        if threads:
            values["threads"] = threads
        return values

    def run_config(self, run: str, overrides: list[str] | None = None, threads: int | None = None) -> TrainConfig:
        """The resolved training config of a run: defaults < teacher_train < models < study < profile runs."""
        if run not in self.run_specs:
            raise StudyError(f"unknown run {run!r} in profile {self.profile}; known: {', '.join(self.runs)}")
        if not overrides and not threads and run in self._configs:  # resolved once, asked for by many
            return self._configs[run]
        values = self.run_values(run, threads)
        if overrides:
            values = apply_overrides(values, overrides)
        cfg = config_from_dict(values)
        if not overrides and not threads:
            self._configs[run] = cfg
        return cfg


def profiles(params: Path = PARAMS) -> list[str]:
    """Every params/<name>.yaml that is a profile: any such file runs through both drivers."""
    return sorted(p.stem for p in Path(params).glob("*.yaml") if p.stem not in NOT_PROFILES)


def load_study(profile: str = "default", check_data: bool = True, overrides: dict | None = None,
               params: Path = PARAMS) -> Study:
    """Read, merge and validate params/ for `profile` (overrides: a dict merged over the profile)."""
    params = Path(params)
    if profile in NOT_PROFILES or not (params / f"{profile}.yaml").is_file():
        raise StudyError(f"unknown profile {profile!r}: {params}/{profile}.yaml not found (profiles: "
                         f"{', '.join(profiles(params))})")
    profile_file = _read(params / f"{profile}.yaml")
    missing = [s for s in PROFILE_SECTIONS if s not in profile_file]
    if missing:
        raise StudyError(f"{params}/{profile}.yaml: missing section(s) {missing}; every profile lists every "
                         f"section (DVC tracks each): write `name: {{}}` (seeds: a list) to keep the defaults")
    settings = deep_merge(_read(params / "defaults.yaml"), profile_file)
    settings = deep_merge(settings, overrides or {})
    study_file = _read(params / "study.yaml")
    errors = []
    validator = jsonschema.Draft202012Validator(_read(SCHEMA))
    for e in sorted(validator.iter_errors(settings), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in e.path) or "(top level)"
        errors.append(f"params/{profile}.yaml (over defaults.yaml) {where}: {e.message}")
    study = Study(profile, settings, study_file.get("teachers", {}), study_file.get("variants", {}),
                  study_file.get("tables", {}), Path("results") / profile, study_file.get("guidelines", []))
    if not errors:
        errors += apply_readings(study, study_file.get("readings", {}))
    errors += _semantic_errors(study, check_data, after_schema_errors=bool(errors))
    if errors:
        raise StudyError("invalid study definition:\n  " + "\n  ".join(dict.fromkeys(errors)))
    return study


# ------------------------------------------------------------------------------------------------ readings
# Which variants an open point's readings apply to (study.yaml readings.<point>.applies_to).
APPLIES_TO = {
    "mi": lambda spec: bool((spec.get("mi") or {}).get("teacher")),
    "soft_kd": lambda spec: (spec.get("kd") or {}).get("type") == "soft",
}


def deciding_variants(study: Study) -> list[str]:
    """The runs (teachers and variants) the guidelines' voting deltas read, with the runs they need first (their
    teachers, imitation teachers and initialisations), in study.yaml's order."""
    specs = {**study.teachers, **study.variants}
    refs = [ref for g in study.guidelines for d in g.get("vote", [])
            for ref in as_list(d.get("plus")) + as_list(d.get("minus"))]
    todo = [_cell_run(study, ref) for ref in refs] + [_reference_run(study, ref) for ref in refs]
    names = set()
    while todo:
        name = todo.pop()
        if name in specs and name not in names:
            names.add(name)
            spec = specs[name]
            todo += _inputs(spec)
    return [n for n in specs if n in names]


def apply_readings(study: Study, definitions: dict) -> list[str]:
    """The profile's `readings` section applied to `study`: with `variants: deciding`, only the runs the guidelines'
    votes read (tables keep the rows of those runs, guidelines the `show` deltas they can compute); for each point
    of `points`, each of its readings but the study's own adds a variant `<variant>--<reading>` of every deciding
    variant it applies to (`applies_to`, judged on study.yaml's spec), whose config is the variant's with the reading's
    `set` over it (run_values). Problems are returned."""
    section = study.settings["readings"]
    unknown = [p for p in section["points"] if p not in definitions]
    if unknown:
        return [f"params/{study.profile}.yaml readings.points: unknown point(s) {unknown} (study.yaml readings: "
                f"{', '.join(definitions)})"]
    errors = _reading_definition_errors(definitions)
    if errors:
        return errors
    deciding = deciding_variants(study)
    if section["variants"] == "deciding":
        keep = set(deciding)
        # the profile's overrides of runs it does not train are dropped with them (a name of no run stays an error)
        study.settings["runs"] = {k: v for k, v in study.settings["runs"].items()
                                  if k in keep or k not in study.teachers | study.variants}
        study.teachers = {k: v for k, v in study.teachers.items() if k in keep}
        study.variants = {k: v for k, v in study.variants.items() if k in keep}
        tables = {}
        for name, table in study.tables.items():
            rows = [r for r in table["rows"] if r.get("run") in keep]
            names = {r["row"] for r in rows}
            rows = [r for r in rows if r.get("reference", table.get("reference")) in names]
            if rows:
                tables[name] = {**table, "rows": rows}
        study.tables = tables
        for g in study.guidelines:
            g["show"] = [d for d in g.get("show", []) if all(
                _cell_run(study, ref) in keep for ref in as_list(d.get("plus")) + as_list(d.get("minus")))]
    for point in section["points"]:
        spec = definitions[point]
        study.points[point] = spec
        applies = APPLIES_TO[spec["applies_to"]]
        changed = [v for v in deciding if v in study.variants and applies(study.variants[v])]
        for reading in spec["readings"]:
            if reading == spec["study"]:
                continue
            for variant in changed:
                name = f"{variant}{READING_SEP}{reading}"
                if name in study.variants:
                    errors.append(f"study.yaml readings.{point}.{reading}: run name {name!r} is already a variant")
                    continue
                inputs = [v for v in changed if v in _inputs(study.variants[variant])]
                if inputs:
                    errors.append(f"study.yaml readings.{point}.{reading}: variant {variant!r} reads {inputs}, which "
                                  f"the reading changes too (a reading variant reads its base's inputs)")
                study.variants[name] = copy.deepcopy(study.variants[variant])  # the reading's set: run_values
                study.reading_runs[name] = (variant, point, reading)
    return errors


READING_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def _reading_definition_errors(definitions: dict) -> list[str]:
    """Every problem of study.yaml's `readings`, whichever points a profile runs."""
    errors = []
    names = [r for spec in definitions.values() for r in (spec.get("readings") or {})]
    errors += [f"study.yaml readings: reading name {r!r} used twice (names are the suffix of a run's name)"
               for r in sorted({r for r in names if names.count(r) > 1})]
    errors += [f"study.yaml readings: name {n!r} must be lower-case words joined by single hyphens"
               for n in list(definitions) + names if not READING_NAME.fullmatch(n)]
    for point, spec in definitions.items():
        where = f"study.yaml readings.{point}"
        if spec.get("applies_to") not in APPLIES_TO:
            errors.append(f"{where}.applies_to: one of {', '.join(APPLIES_TO)}, got {spec.get('applies_to')!r}")
        if not spec.get("text") or any(not (r or {}).get("text") for r in (spec.get("readings") or {}).values()):
            errors.append(f"{where}: the point and each of its readings need a `text` (how it follows from the paper)")
        if spec.get("study") not in (spec.get("readings") or {}):
            errors.append(f"{where}: its study reading {spec.get('study')!r} is not one of its readings")
        elif (spec["readings"][spec["study"]] or {}).get("set"):
            errors.append(f"{where}.{spec['study']}: the study's own reading sets nothing (the study's runs are it)")
        errors += [f"{where}.{r}: no `set` (it would train its base variant again)"
                   for r, v in (spec.get("readings") or {}).items()
                   if r != spec.get("study") and not (v or {}).get("set")]
    return errors


def _inputs(spec: dict) -> list:
    """The values of a run spec's input keys (teachers, init): run names where they name runs."""
    return [(spec.get(sec) or {}).get(key) if sec else spec.get(key) for sec, key in INPUT_KEYS]


def _reading_errors(study: Study) -> list[str]:
    """A reading variant must train something its base does not: same resolved config, same run twice."""
    def own(run):
        return {k: v for k, v in study.run_values(run).items() if k not in ("name", "variant", "tables")}
    return [f"study.yaml readings.{point}.{reading}: changes nothing in variant {base!r} (its config already says so)"
            for name, (base, point, reading) in study.reading_runs.items() if own(name) == own(base)]


def _reference_run(study: Study, ref: str) -> str | None:
    """The run of the reference row of a cell's table (the row's own `reference`, else the table's): a table keeps
    a row only with its reference row."""
    try:
        table, row, metric, _ = study.cell(ref)
    except StudyError:
        return None
    rows = study.tables[table]["rows"]
    cell = next(r for r in rows if r["row"] == row and r.get("metric", "top1") == metric)
    reference = cell.get("reference", study.tables[table].get("reference"))
    return next((r["run"] for r in rows if r["row"] == reference and r.get("run")), None)


def _cell_run(study: Study, ref: str) -> str | None:
    try:
        return study.cell(ref)[3]
    except StudyError:
        return None


def _semantic_errors(study: Study, check_data: bool, after_schema_errors: bool = False) -> list[str]:
    """Every problem a schema cannot see, in the same pass as the schema's: names, references, table cells,
    guidelines, configs (unknown keys, types, ranges, input files), data. A check that a schema error keeps from
    running (a value of the wrong type) is left out; its problem is already listed."""
    errors = []
    checks = [_name_errors, _table_errors, _guideline_errors, _reading_errors, lambda s: _config_errors(s, check_data)]
    if check_data:
        checks.append(_data_errors)
    for check in checks:
        try:
            errors += check(study)
        except (TypeError, LookupError, AttributeError, ValueError):
            if not (after_schema_errors or errors):  # a crash that no listed problem explains is a bug: raise it
                raise
    return errors


def _name_errors(study: Study) -> list[str]:
    errors = []
    overlap = set(study.teachers) & set(study.variants)
    if overlap:
        errors.append(f"study.yaml: names used both as teacher and variant: {sorted(overlap)}")
    models = study.settings["models"]
    errors += [f"models.{name}: unknown model {m['name']!r} (not in timm's registry)"
               for name, m in models.items() if m["name"] not in timm.list_models()]
    for run, (_, spec, _) in study.run_specs.items():
        if spec.get("model") not in models:
            errors.append(f"study.yaml {run}: model {spec.get('model')!r} is not a key of the profile's models: "
                          f"{sorted(models)}")
        for section, key in INPUT_KEYS:
            value = (spec.get(section) or {}).get(key) if section else spec.get(key)
            if value and value not in study.run_specs and key != "init":
                errors.append(f"study.yaml {run}: {section + '.' if section else ''}{key} names an unknown run "
                              f"{value!r}")
    errors += [f"params/{study.profile}.yaml runs.{run}: unknown variant or teacher"
               for run in study.settings["runs"] if run not in study.teachers and run not in study.variants]
    return errors


def _table_errors(study: Study) -> list[str]:
    errors = []
    for t, table in study.tables.items():
        rows = table.get("rows", [])
        errors += [f"study.yaml tables.{t} row {row.get('row')}: unknown run {row['run']!r}" for row in rows
                   if row.get("run") is not None and row["run"] not in study.teachers | study.variants]
        names = {r.get("row") for r in rows}
        references = {table.get("reference")} | {r["reference"] for r in rows if "reference" in r}
        errors += [f"study.yaml tables.{t}: reference {ref!r} is not one of its rows"
                   for ref in references if ref not in names]
    return errors


def _guideline_errors(study: Study) -> list[str]:
    errors = []
    for g in study.guidelines:
        where = f"study.yaml guidelines {g.get('id')}"
        if g.get("direction") not in ("above", "below") or not isinstance(g.get("threshold"), int | float):
            errors.append(f"{where}: needs direction (above | below) and a numeric threshold")
        if not g.get("vote"):
            errors.append(f"{where}: no `vote` deltas")
        cells = [ref for delta in g.get("vote", []) + g.get("show", [])
                 for ref in as_list(delta.get("plus")) + as_list(delta.get("minus"))]
        for ref in cells:
            try:
                if study.cell(ref)[3] is None:
                    errors.append(f"{where}: cell {ref!r} has no run of ours")
            except StudyError as e:
                errors.append(f"{where}: {e}")
    return errors


def _config_errors(study: Study, check_data: bool = True) -> list[str]:
    """One line per problem of the runs' training configs, naming the runs that have it: the config's own
    problems (pipeline.config) and inputs (teachers, init files) that name neither a run of the study nor a file."""
    runs_of: dict[str, list[str]] = {}
    for run in study.runs:
        problems = _input_problems(study, study.run_values(run), check_data)
        try:
            study.run_config(run)
        except ConfigError as e:
            problems += e.problems
        for problem in problems:
            runs_of.setdefault(problem, []).append(run)
    return [f"{problem} (run{'s' if len(runs) > 1 else ''} {', '.join(runs[:4])}"
            f"{f' and {len(runs) - 4} more' if len(runs) > 4 else ''})" for problem, runs in runs_of.items()]


def _input_problems(study: Study, values: dict, check_data: bool) -> list[str]:
    """A teacher or init that is not a run of the study (those resolve to their model.pt) must be a file: a name
    like `gfnett` always fails here; a path only when the data are checked (planning on another machine)."""
    runs = {str(study.model_path(r)) for r in study.runs}
    problems = []
    for section, key in INPUT_KEYS:
        node = values.get(section) if section else values
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or value in runs or Path(value).is_file():
            continue
        if os.sep not in value and not Path(value).suffix:
            problems.append(f"{section + '.' if section else ''}{key} {value!r} names no run of the study "
                            f"(teachers: {', '.join(study.teachers)}) and no file")
        elif check_data:
            problems.append(f"{section + '.' if section else ''}{key} {value!r}: file not found")
    return problems


def _data_errors(study: Study) -> list[str]:
    data = study.settings["data"]
    if data["source"] == "imagefolder" and not (data.get("root") and Path(data["root"]).is_dir()):
        return [f"data.root {data.get('root')!r}: image-folder dataset not found (set data.root in "
                f"params/{study.profile}.yaml to a folder with train/ and val/)"]
    if data["source"] == "fashion-mnist":
        try:
            find_fashion_mnist(data.get("raw_dir"))
        except DataError as e:
            return [str(e)]
    return []


def as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


def run_config(profile: str, run: str, overrides: list[str] | None = None, threads: int | None = None):
    return load_study(profile, check_data=False).run_config(run, overrides, threads)
