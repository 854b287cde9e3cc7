"""`python -m pipeline report`: every paper table beside the paper's numbers, each figure of ours with its 95%
interval; the figures; the guideline verdicts.

Inputs are the results of the other stages (eval/<run>.json and .predictions.npz, benchmark.json, latency.json,
histories) and the project's copy of the paper's numbers (params/paper_results.csv). Each table compares
changes: every row gives ours and the paper's value and both changes relative to the table's reference row
(top-1: difference in points; throughput, params and MACs: ratio). Accuracies and their Δ carry an interval
over seeds and test images, throughputs one over interleaved rounds (pipeline.stats). A missing result is shown
as missing and a stale one (an eval whose recorded inputs are no longer the run's, pipeline.identity) as
stale: neither stops the report, and a stale result is never shown as a value.

Each guideline of params/study.yaml is a rule on deltas of the tables' cells: supported when every voting
delta's interval lies on the paper's side of its threshold, contradicted when one lies on the other side,
inconclusive otherwise.

Outputs (results/<profile>/report/; `python -m pipeline publish` copies them to reports/<profile>/):
README.md (the index), tables/<T>.{md,tex,csv}, figures/*.{png,pdf} (fixed metadata: a rerun that changes
nothing gives byte-identical files), summary.json.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import figures, regime, tracking
from pipeline.io import atomic_dir, atomic_path, load_predictions, read_json, write_json
from pipeline.measure import ORT, throughput_precision
from pipeline.models.adavit import fast_path_label
from pipeline.repo import git_state
from pipeline.stats import (
    Interval,
    estimate_over_seeds,
    exact,
    mean_interval,
    median_interval,
    paired_table,
    pooled_seed_variance,
    seeds_for_power,
)
from pipeline.study import PAPER_RESULTS, Study, as_list, load_study

THROUGHPUT = "throughput"
THROUGHPUT_FAST = "throughput_fast"  # AdaViT's fast inference path
# metrics read from eval/<run>.json, with their scale; like throughput, their change is a ratio
SIZE_METRICS = {"params_m": ("params", 1e6), "macs_g": ("macs", 1e9)}
THROUGHPUTS = (THROUGHPUT, THROUGHPUT_FAST)
RATIO_METRICS = (*THROUGHPUTS, *SIZE_METRICS)
MISSING = "—"
PAPER_ONLY = "paper only"  # a cell of a size not trained here: the paper's value is the only one


def load_paper(path: Path = PAPER_RESULTS) -> dict[tuple[str, str, str], float]:
    with open(path, newline="") as f:
        return {(r["table"], r["row"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------ values
@dataclass
class Cell:
    """Our figure for one table cell: its interval (None when there is none), why not, and its MLflow runs."""
    value: Interval | None = None
    state: str = "ok"  # ok | missing | stale | not run
    run_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.value is not None


class Results:
    """Everything the stages wrote for one profile that is current; absent and stale results are absent."""

    def __init__(self, study: Study):
        self.study = study
        opts = study.settings["report"]
        self.level, self.power = opts["level"], opts["power"]
        self.single_seed_sd = opts.get("single_seed_sd", "pooled")
        self.evals, self.stale = {}, []
        for run in study.runs:
            ev = _maybe_json(study.eval_path(run))
            if ev is None:
                continue
            if ev.get("identity") != self._identity(run):  # computed from inputs that have changed since
                self.stale.append(run)
            else:
                self.evals[run] = ev
        self.benchmark = _maybe_json(study.benchmark_path)
        self.latency = _maybe_json(study.latency_path)
        self._labels: np.ndarray | None = None

    def _identity(self, run: str) -> dict | None:
        try:
            return self.study.identity(run)
        except (FileNotFoundError, ValueError):  # no prepared data: nothing can be shown as current
            return None

    @property
    def test_images(self) -> int | None:
        return next((ev["test_images"] for ev in self.evals.values() if "test_images" in ev), None)

    def seed_runs(self, variant: str) -> dict[int, str]:
        seeds = self.study.settings["seeds"]
        if variant in self.study.teachers:
            return {seeds[0]: variant}
        return {s: self.study.seed_name(variant, s) for s in seeds}

    def correct(self, variant: str) -> dict[int, np.ndarray]:
        """Per seed, which test images the variant's deploy model classifies correctly (current results only)."""
        return {seed: self._correct(run) for seed, run in self.seed_runs(variant).items() if run in self.evals}

    @functools.cache  # noqa: B019 (one Results per report)
    def _correct(self, run: str) -> np.ndarray:
        pred, label = load_predictions(self.study.predictions_path(run))
        if self._labels is None:
            self._labels = label
        elif not np.array_equal(label, self._labels):
            raise ValueError(f"{self.study.predictions_path(run)}: evaluated on other test images than the other "
                             f"runs; rerun evaluate")
        return pred == label

    @functools.cached_property
    def seed_var(self) -> tuple[float, float] | None:
        """(σ²_a, df) added to a one-seed accuracy table (pipeline.stats, single-seed rows); None: not added."""
        if self.single_seed_sd is None or len(self.study.settings["seeds"]) < 2:
            return None
        if self.single_seed_sd != "pooled":
            return ((self.single_seed_sd / 100) ** 2, float("inf"))
        tables = [paired_table([c]) for v in self.study.variants if len(c := self.correct(v)) > 1]
        return pooled_seed_variance(tables)

    def _seed_var(self, seeds: int, plus: list[str], minus: list[str] = ()) -> tuple[float, float] | None:
        """The seed part that an S-seed table of `plus` minus `minus` cannot show (pipeline.stats, single-seed rows):
        with one seed, each side's seed effect, averaged over its variants; with several, the effect of a one-seed
        run that a side's variants start from (AdaViT from its DeiT), the same in every seed."""
        if self.seed_var is None:
            return None
        if seeds == 1:
            k = 1 / len(plus) + (1 / len(minus) if minus else 0)
        else:
            k = sum(self._one_seed_init(v) / len(side) ** 2 for side in (plus, minus) for v in side)
        return (self.seed_var[0] * k, self.seed_var[1]) if k else None

    def _one_seed_init(self, variant: str) -> bool:
        return variant not in self.study.teachers and any(
            self.study.init_source(r) in self.study.teachers for r in self.seed_runs(variant).values())

    @property
    def incomplete(self) -> list[str]:
        """The study's runs without a current evaluation (no eval/<run>.json, or one of changed inputs)."""
        return [r for r in self.study.runs if r not in self.evals or r in self.stale]

    def state(self, variant: str) -> str:
        runs = self.seed_runs(variant).values()
        return "stale" if any(r in self.stale for r in runs) else "ok" if any(r in self.evals for r in runs) \
            else "missing"

    def run_ids(self, variant: str) -> list[str]:
        return [self.evals[r]["train_run_id"] for r in self.seed_runs(variant).values() if r in self.evals]

    def cell(self, variant: str | None, metric: str) -> Cell:
        if variant is None:
            return Cell(state="not run")
        if self.state(variant) != "ok":
            return Cell(state=self.state(variant))
        if metric in THROUGHPUTS:
            samples = self.throughput_samples(variant, metric)
            value = median_interval(samples, self.level) if samples else None
        elif metric in SIZE_METRICS:
            key, scale = SIZE_METRICS[metric]
            values = [ev[key] / scale for r in self.seed_runs(variant).values()
                      if (ev := self.evals.get(r)) is not None and key in ev]
            if not values:
                value = None
            elif self.study.is_adaptive(variant) and key == "macs":  # expected MACs follow the learned gates
                value = estimate_over_seeds(values, self.level, "expected MACs over the test images")
            else:
                value = exact(values[0])
        else:
            table = paired_table([self.correct(variant)])
            value = mean_interval(table, self.level, self.power, self._seed_var(len(table), [variant])).scaled(100)
        return Cell(value, "ok" if value else "missing", self.run_ids(variant))

    @property
    def size_models(self) -> dict:
        """Architecture -> params, MACs, throughput rounds, from evaluate's size benchmark (T6 at every size)."""
        return ((self.benchmark or {}).get("sizes") or {}).get("models", {})

    def arch_cell(self, arch: str, metric: str) -> Cell:
        """A row of an architecture of the size benchmark: params, MACs, throughput; its top-1 is the paper's only
        (not trained here)."""
        row = self.size_models.get(arch)
        if metric not in THROUGHPUTS and metric not in SIZE_METRICS:
            return Cell(state=PAPER_ONLY)
        if row is None:
            return Cell(state="missing")
        if metric in THROUGHPUTS:
            return Cell(median_interval(row["throughput"]["samples"], self.level))
        key, scale = SIZE_METRICS[metric]
        return Cell(exact(row[key] / scale))

    def arch_delta(self, metric: str, arch: str, reference: str) -> Interval | None:
        """Ratio of two architectures of the size benchmark: per interleaved round for throughput."""
        a, b = self.size_models.get(arch), self.size_models.get(reference)
        if a is None or b is None:
            return None
        if metric in THROUGHPUTS:
            return self.round_ratio(a["throughput"]["samples"], b["throughput"]["samples"])
        key = SIZE_METRICS[metric][0]
        return exact(a[key] / b[key])

    def throughput_samples(self, variant: str, metric: str = THROUGHPUT) -> list[float] | None:
        """Images/s of the variant's deploy architecture in each interleaved round of the benchmark."""
        label = (self.benchmark or {}).get("runs", {}).get(variant)
        if label and metric == THROUGHPUT_FAST:
            label = fast_path_label(label)
        row = (self.benchmark or {}).get("models", {}).get(label)
        return row["throughput"]["samples"] if row else None

    def round_ratio(self, a: list[float], b: list[float]) -> Interval:
        """Median of the per-round ratios of two models timed in the same interleaved rounds, with its interval."""
        return median_interval([x / y for x, y in zip(a, b, strict=True)], self.level)

    def delta(self, metric: str, plus: list[str], minus: list[str], minus_metric: str | None = None) -> Interval | None:
        """mean(plus) - mean(minus) of the variants' metric in points for accuracies; a ratio for the others
        (one variant on each side): throughput per interleaved round, params and MACs exactly."""
        if any(self.state(v) != "ok" for v in plus + minus):
            return None
        if metric in THROUGHPUTS:
            a, b = self.throughput_samples(plus[0], metric), self.throughput_samples(minus[0], minus_metric or metric)
            return self.round_ratio(a, b) if a and b else None
        if metric in SIZE_METRICS:
            a, b = self.cell(plus[0], metric), self.cell(minus[0], metric)
            if not (a.ok and b.ok):
                return None
            return exact(a.value.mean / b.value.mean) if a.value.low == a.value.high else a.value.scaled(
                1 / b.value.mean)
        groups = [self.correct(v) for v in plus + minus]
        table = paired_table(groups[:len(plus)], groups[len(plus):])
        seed_var = self._seed_var(len(table), plus, minus)
        return mean_interval(table, self.level, self.power, seed_var).scaled(100)


def _maybe_json(path: Path):
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ tables
@dataclass
class Row:
    table: str
    row: str
    metric: str
    run: str | None
    ours: Cell
    paper: float | None
    ours_delta: Interval | None = None
    paper_delta: float | None = None
    reference: str = ""       # the row its Δ is taken against: its own `reference`, else the table's
    arch: str | None = None   # a row of the size benchmark (no run)
    note: str = ""            # why a row has no run of ours


def build_table(name: str, results: Results, paper: dict) -> list[Row]:
    spec = results.study.tables[name]
    paper_table = spec.get("paper_table", name)  # T6-sizes prints T6's numbers
    rows = []
    for r in spec["rows"]:
        metric = r.get("metric", "top1")
        cell = results.arch_cell(r["arch"], metric) if "arch" in r else results.cell(r.get("run"), metric)
        rows.append(Row(name, r["row"], metric, r.get("run"), cell, paper.get((paper_table, r["row"], metric)),
                        reference=r.get("reference", spec["reference"]), arch=r.get("arch"), note=r.get("note", "")))
    by_row = {(r.row, r.metric): r for r in rows}
    references = {r.reference for r in rows}
    for r in rows:
        if r.row in references:  # a row others are compared with is a reference itself (T9's s18-none, ...)
            r.reference = r.row
        # the fast path's throughput is compared with the reference row's throughput
        ref = by_row.get((r.reference, THROUGHPUT if r.metric == THROUGHPUT_FAST else r.metric))
        if ref is None:
            continue
        if r.ours.ok and ref.ours.ok:
            r.ours_delta = (results.arch_delta(r.metric, r.arch, ref.arch) if r.arch else
                            results.delta(r.metric, [r.run], [ref.run], ref.metric))
        r.paper_delta = _paper_delta(r.metric, r.paper, ref.paper)
    return rows


def _paper_delta(metric: str, value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None:
        return None
    return value / reference if metric in RATIO_METRICS else value - reference


def fmt_cell(cell: Cell, metric: str) -> str:
    if not cell.ok:
        return cell.state if cell.state in ("stale", PAPER_ONLY) else MISSING
    v = cell.value
    if metric in THROUGHPUTS:
        return f"{v.mean:.0f} [{v.low:.0f}, {v.high:.0f}]"
    if metric in SIZE_METRICS:
        return f"{v.mean:.4g}"
    return f"{v.mean:.2f} [{v.low:.2f}, {v.high:.2f}]"


def fmt_delta(d: Interval | float | None, metric: str) -> str:
    """A Δ: points with a sign for accuracies, a ratio otherwise; with its interval when it has a width."""
    if d is None:
        return MISSING
    if isinstance(d, int | float):
        return f"×{d:.3f}" if metric in RATIO_METRICS else f"{round(d, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"
    if metric in RATIO_METRICS:
        return f"×{d.mean:.3f}" + (f" [{d.low:.3f}, {d.high:.3f}]" if d.high > d.low else "")
    return f"{round(d.mean, 2) + 0.0:+.2f} [{round(d.low, 2) + 0.0:+.2f}, {round(d.high, 2) + 0.0:+.2f}]"


def fmt_paper(p: float | None) -> str:
    return MISSING if p is None else f"{p:.2f}"


HEADERS = ["row", "metric", "ours [95% CI]", "paper", "Δ ours [95% CI]", "Δ paper", "seeds", "run"]


def table_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "metric", "run", "state", "ours", "ours_low", "ours_high", "ours_seeds", "paper",
                "ours_delta", "ours_delta_low", "ours_delta_high", "ours_delta_mde", "ours_delta_seeds", "paper_delta",
                "mlflow_run_ids"])
    for r in rows:
        v, d = r.ours.value, r.ours_delta
        w.writerow([r.table, r.row, r.metric, r.run or "", r.ours.state,
                    *(_num(getattr(v, k, None)) for k in ("mean", "low", "high")), v.seeds if v else "",
                    _num(r.paper), *(_num(getattr(d, k, None)) for k in ("mean", "low", "high", "mde")),
                    d.seeds if d else "", _num(r.paper_delta), ";".join(r.ours.run_ids)])
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def table_markdown(name: str, rows: list[Row], title: str, reference: str, link) -> str:
    others = [f"`{x}`" for x in sorted({r.reference for r in rows}) if x != reference]
    lines = [f"### {name}: {title}", "",
             f"Reference row: `{reference}`" + (f" (and {', '.join(others)} for the rows that name it)"
                                                if others else "")
             + ". Δ: top-1 in points, throughput / params / MACs as a ratio. "
             "Intervals: 95%, over the seeds and test images for top-1, over the interleaved rounds for throughput; "
             "seeds: how many seeds the Δ pairs (1 where a teacher, trained once, is involved).", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        if r.arch:
            runs = ("the paper's value only: this size is not trained here" if r.ours.state == PAPER_ONLY
                    else f"size benchmark `{r.arch}`")
        else:
            runs = " ".join(link(rid) for rid in r.ours.run_ids) if r.ours.run_ids else (
                f"not run in this project{': ' + r.note if r.note else ''}" if r.run is None else r.ours.state)
        seeds = str(r.ours_delta.seeds) if r.ours_delta and r.metric not in RATIO_METRICS else ""
        deltas = [fmt_delta(r.ours_delta, r.metric), fmt_delta(r.paper_delta, r.metric)]
        if r.reference == r.row:
            deltas, seeds = ["reference", "reference"], ""
        lines.append(f"| {r.row} | {r.metric} | {fmt_cell(r.ours, r.metric)} | {fmt_paper(r.paper)} | "
                     f"{deltas[0]} | {deltas[1]} | {seeds} | {runs} |")
    return "\n".join(lines) + "\n"


def table_latex(name: str, rows: list[Row], title: str) -> str:
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    out = [r"\begin{table}[t]", r"\centering",
           rf"\caption{{{esc(name)}: {esc(title)} (ours with 95\% intervals, beside the paper's)}}",
           r"\begin{tabular}{llrrrr}", r"\toprule",
           r"Row & Metric & Ours & Paper & $\Delta$ ours & $\Delta$ paper \\", r"\midrule"]
    tex = lambda s: s.replace("×", r"$\times$").replace("—", "--")  # noqa: E731
    for r in rows:
        cells = [esc(r.row), esc(r.metric), fmt_cell(r.ours, r.metric), fmt_paper(r.paper),
                 fmt_delta(r.ours_delta, r.metric), fmt_delta(r.paper_delta, r.metric)]
        out.append(" & ".join(tex(c) for c in cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------------- guidelines
def guideline_delta(spec: dict, results: Results, paper: dict, reading: str | None = None) -> dict:
    """One delta of a guideline: mean(plus) - mean(minus) of table cells, ours with its interval and the paper's;
    with `reading`, each cell's run is replaced by its run under that reading of an open point (where it has one)."""
    study = results.study
    plus, minus = as_list(spec.get("plus")), as_list(spec.get("minus"))
    cells = [study.cell(ref) for ref in plus + minus]
    runs = [study.under_reading(c[3], reading) if reading else c[3] for c in cells]
    ours = results.delta("top1", runs[:len(plus)], runs[len(plus):])
    values = [paper.get(c[:3]) for c in cells]
    theirs = None
    if None not in values:
        theirs = float(np.mean(values[:len(plus)]) - (np.mean(values[len(plus):]) if minus else 0.0))
    label = spec.get("label") or f"{' + '.join(plus)} − {' + '.join(minus)}"
    return {"delta": label, "ours": ours, "paper": theirs, "changed": runs != [c[3] for c in cells]}


def verdict_of(g: dict, votes: list[dict]) -> str:
    """supported / contradicted / inconclusive from the voting deltas' intervals against the guideline's rule."""
    if any(d["ours"] is None for d in votes):
        return "not testable (missing or stale results)"
    sign = 1 if g["direction"] == "above" else -1
    sides = [sign * d["ours"].side(g["threshold"]) for d in votes]
    return "supported" if all(s == 1 for s in sides) else "contradicted" if -1 in sides else "inconclusive"


def guideline_verdicts(results: Results, paper: dict) -> list[dict]:
    """Each guideline's verdict from its voting deltas' intervals (params/study.yaml: guidelines)."""
    out = []
    for g in results.study.guidelines:
        votes = [guideline_delta(d, results, paper) for d in g["vote"]]
        shown = [guideline_delta(d, results, paper) for d in g.get("show", [])]
        out.append({"guideline": g["id"], "text": g["text"], "rule": g["rule"], "direction": g["direction"],
                    "threshold": g["threshold"], "verdict": verdict_of(g, votes), "votes": votes, "shown": shown})
    return out


def reading_verdicts(results: Results, paper: dict) -> list[dict]:
    """guideline x reading: for each open point the profile runs (study.yaml `readings`) and each of its readings,
    the study's own first, every guideline whose votes read a run the point changes, its voting deltas with each run
    replaced by its run under the reading, and the verdict they give."""
    study, out = results.study, []
    for point, spec in study.points.items():
        readings = [spec["study"]] + [r for r in spec["readings"] if r != spec["study"]]
        for g in study.guidelines:
            rows = []
            for reading in readings:
                votes = [guideline_delta(d, results, paper, reading) for d in g["vote"]]
                rows.append({"reading": reading, "study": reading == spec["study"], "votes": votes,
                             "verdict": verdict_of(g, votes)})
            if any(d["changed"] for row in rows for d in row["votes"]):
                out.append({"guideline": g["id"], "point": point, "direction": g["direction"],
                            "threshold": g["threshold"], "rows": rows})
    return out


def readings_markdown(study: Study, readings: list[dict]) -> str:
    """The report's table of verdicts under each reading, and which verdicts hold under every one."""
    if not readings:
        return ""
    lines = ["## Verdicts under each reading of the paper's open points", "",
             "Each guideline's voting Δ (top-1 points, 95% interval) with every deciding run trained under one reading "
             "of an open point (params/study.yaml `readings`), and the verdict those intervals give; the first row of "
             "each point is the study's own reading. A guideline appears under a point when one of its deciding runs "
             "changes with it (module imitation: the MI rows; KD: the soft-KD rows).", ""]
    for point, spec in study.points.items():
        lines += [f"**{point}**: {spec['text']}.", ""]
        for reading, r in spec["readings"].items():
            lines.append(f"- `{reading}`{' (the study’s)' if reading == spec['study'] else ''}: {r['text']}")
        lines.append("")
    lines += ["The voting Δs of a guideline are those of its section above, in the same order.", "",
              "| guideline | point | reading | voting Δ [95% CI] | verdict |", "|---|---|---|---|---|"]
    for item in readings:
        for row in item["rows"]:
            deltas = "; ".join(fmt_delta(d["ours"], "top1") for d in row["votes"])
            lines.append(f"| {item['guideline']} | {item['point']} | `{row['reading']}`"
                         f"{' (study)' if row['study'] else ''} | {deltas} | {row['verdict']} |")
    lines += ["", "Each guideline's verdict over every reading that changes its deciding runs:", ""]
    for g in study.guidelines:
        verdicts = {("the study's", "") if row["study"] else (item["point"], row["reading"]): row["verdict"]
                    for item in readings if item["guideline"] == g["id"] for row in item["rows"]}
        if not verdicts:
            lines.append(f"- **{g['id']}**: no open point of this profile changes its deciding runs.")
        elif len(set(verdicts.values())) == 1:
            others = len(verdicts) - 1
            lines.append(f"- **{g['id']}**: {next(iter(verdicts.values()))} under every reading (the study's and "
                         f"{others} other{'s' * (others != 1)}).")
        else:
            by = {}
            for (point, reading), v in verdicts.items():
                by.setdefault(v, []).append(f"{point}: {reading}" if reading else "the study's readings")
            lines.append(f"- **{g['id']}**: depends on the reading: "
                         + "; ".join(f"{v} under {', '.join(rs)}" for v, rs in by.items()) + ".")
    return "\n".join(lines) + "\n"


def readings_csv(readings: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["guideline", "point", "reading", "study_reading", "delta", "mean", "low", "high", "verdict"])
    for item in readings:
        for row in item["rows"]:
            for d in row["votes"]:
                iv = d["ours"]
                w.writerow([item["guideline"], item["point"], row["reading"], row["study"], d["delta"],
                            *(_num(x) for x in ((iv.mean, iv.low, iv.high) if iv else (None,) * 3)),
                            row["verdict"]])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- writing
def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def mlflow_links(profile: str):
    """A function run_id -> Markdown link to the run in the MLflow UI of this machine's store (`make ui`)."""
    exp_id = None
    try:
        mlflow = tracking.setup(tracking.experiment_name(profile))
        exp = mlflow.MlflowClient().get_experiment_by_name(tracking.experiment_name(profile))
        exp_id = exp.experiment_id if exp else None
    except Exception:  # a report never fails for want of a tracking store
        pass

    def link(run_id: str) -> str:
        if exp_id is None:
            return f"`{run_id[:8]}`"
        return f"[{run_id[:8]}]({tracking.ui_url(exp_id, run_id)})"
    return link


def invocation_wall_time(profile: str) -> float | None:
    """Seconds since this pipeline invocation's MLflow parent run started (None outside a session)."""
    run_id = tracking.parent_run_id(profile)
    if not run_id:
        return None
    try:
        mlflow = tracking.setup(tracking.experiment_name(profile))
        return time.time() - mlflow.MlflowClient().get_run(run_id).info.start_time / 1000
    except Exception:  # a report never fails for want of a tracking store
        return None


def write_report(study: Study, out: Path, links=None, wall_time_s: float | None = None) -> dict:
    out = Path(out)
    paper = load_paper()
    results = Results(study)
    link = links or (lambda rid: f"`{rid[:8]}`")
    tables = {name: build_table(name, results, paper) for name in study.tables}
    md_tables = []
    for name, rows in tables.items():
        spec = study.tables[name]
        _write_text(out / "tables" / f"{name}.csv", table_csv(rows))
        _write_text(out / "tables" / f"{name}.tex", table_latex(name, rows, spec.get("title", name)))
        md = table_markdown(name, rows, spec.get("title", name), spec["reference"], link)
        _write_text(out / "tables" / f"{name}.md", md)
        md_tables.append(md)
    f1 = figures.latency_table(results.latency, paper)
    _write_text(out / "tables" / "F1.md", f1)
    verdicts = guideline_verdicts(results, paper)
    readings = reading_verdicts(results, paper)
    if readings:
        _write_text(out / "tables" / "readings.csv", readings_csv(readings))
    figs = figures.make_all(study, results, tables, paper, out / "figures")
    adaptive = adaptive_summary(study, results)
    cells = [r for rows in tables.values() for r in rows]
    summary = {"profile": study.profile, "seeds": study.settings["seeds"], "test_images": results.test_images,
               "level": results.level, "verdicts": _plain(verdicts), "reading_verdicts": _plain(readings),
               "figures": figs, "adaptive": adaptive,
               "missing": [f"{r.table}/{r.row}/{r.metric}" for r in cells if r.ours.state == "missing"],
               "stale": sorted(results.stale), "machine": (results.benchmark or {}).get("machine"),
               "incomplete": results.incomplete,
               "single_seed_sd": None if results.seed_var is None else
               {"points": 100 * float(np.sqrt(results.seed_var[0])), "df": results.seed_var[1]},
               # each run's training recipe (its identity's config part): `compare` skips a row whose recipe changed
               "recipes": {r: ev["identity"]["config"] for r, ev in sorted(results.evals.items())
                           if (ev.get("identity") or {}).get("config")}}
    write_json(out / "summary.json", summary)
    md_tables += [adaptive_markdown(adaptive), loss_terms_markdown(study, results)]
    histories = {r: h for r in results.evals if (h := _maybe_json(study.run_dir(r) / "history.json"))}
    regimes = regime.run_regimes(study, histories)
    regime_md = regime.regime_markdown(study, regimes, regime.guideline_regimes(study, regimes, results.seed_runs))
    _write_text(out / "tables" / "regime.csv", regime.regime_csv(regimes))
    _write_text(out / "tables" / "regime.md", regime_md)
    _write_text(out / "README.md", _index(study, results, md_tables, f1, verdicts, figs, wall_time_s, regime_md,
                                          readings_markdown(study, readings)))
    return {**summary, "tables": tables}


def _plain(obj):
    """JSON-ready: intervals become dicts."""
    if isinstance(obj, Interval):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def cell_metrics(tables: dict[str, list[Row]]) -> dict[str, float]:
    """Every table cell as MLflow metrics: ours and its Δ, each with its interval (`T2/row/top1/delta_low`)."""
    out = {}
    for rows in tables.values():
        for r in rows:
            key = f"{r.table}/{r.row}/{r.metric}"
            for name, iv in (("", r.ours.value), ("delta", r.ours_delta)):
                if iv is not None:
                    prefix = f"{key}/{name + '_' if name else ''}"
                    out.update({f"{prefix}mean": iv.mean, f"{prefix}low": iv.low, f"{prefix}high": iv.high})
    return out


def adaptive_summary(study: Study, results: Results) -> dict:
    """Per AdaViT run: accuracy on both paths, expected vs dense MACs, usage, and the measured speed-ups."""
    out = {}
    for run in (r for r in study.runs if study.is_adaptive(r)):
        ev = results.evals.get(run)
        if ev is None or "fast_path" not in ev:
            continue
        dense_run = study.init_source(run)
        dense = results.evals.get(dense_run) if dense_run else None
        speed = ((results.benchmark or {}).get("adaptive") or {}).get(run, {})
        out[run] = {
            "top1": ev["test_top1"], "fast_path_top1": ev["fast_path"]["top1"],
            "fast_path_max_abs_logit_diff": ev["fast_path"]["max_abs_logit_diff"],
            "expected_mmacs": ev["expected_macs"]["mean"] / 1e6, "usage": ev["usage"],
            "dense_run": dense_run, "dense_top1": dense["test_top1"] if dense else None,
            "dense_mmacs": dense["macs"] / 1e6 if dense else None,
            "speed": {setting: {path: row["ratio_to_dense"] for path, row in rows.items() if path != "images"}
                      for setting, rows in speed.items() if setting != "dense"},
        }
    return out


def adaptive_markdown(adaptive: dict) -> str:
    lines = ["### AdaViT: both inference paths against the dense DeiT", ""]
    if not adaptive:
        return "\n".join(lines + [f"{MISSING} (no AdaViT result)", ""])
    lines += ["Top-1 of the masked path (the reference's inference) and of the fast path (kept patches gathered, "
              "dropped heads sliced away, gated branches skipped); expected MACs averaged over the test set; "
              "speed-up = images/s ÷ the dense DeiT's, median [min, max] over interleaved rounds.", "",
              "| run | top-1 masked / fast | max \\|Δlogit\\| | dense top-1 | expected MMACs (dense) | kept patches / "
              "heads / blocks | setting | masked ÷ dense | fast ÷ dense |", "|" + "---|" * 9]
    for run, a in adaptive.items():
        u = a["usage"]
        first = (f"| {run} | {a['top1']:.2f} / {a['fast_path_top1']:.2f} | {a['fast_path_max_abs_logit_diff']:.1e} | "
                 + (f"{a['dense_top1']:.2f}" if a["dense_top1"] is not None else MISSING) + " | "
                 + f"{a['expected_mmacs']:.2f} (" + (f"{a['dense_mmacs']:.2f}" if a["dense_mmacs"] else MISSING)
                 + f") | {u['patch']:.2f} / {u['head']:.2f} / {u['block']:.2f} |")
        speed = a["speed"] or {MISSING: {}}
        for i, (setting, paths) in enumerate(speed.items()):
            cells = [_ratio(paths.get("masked")), _ratio(paths.get("fast"))]
            lead = first if i == 0 else "| | | | | | |"
            lines.append(f"{lead} {setting.replace('_', ' ')} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


LOSS_TERMS = {"ce": "CE", "kd_soft": "soft KD", "kd_hard": "hard KD", "mi_in": "L'_in", "mi_out": "L_out",
              "mi_rel": "L_rel",
              "usage_head": "usage (heads)", "usage_block": "usage (blocks)", "usage_patch": "usage (patches)"}


def loss_terms_markdown(study: Study, results: Results) -> str:
    """Which loss term dominates: each weighted term's mean over the first epoch's steps (every imitation window
    is open then) for the runs of the first seed that combine terms."""
    lines = ["### Loss terms: the weighted magnitude of each term", "",
             "Mean over the first epoch's optimizer steps of each term as it enters the loss (weights applied), "
             "with its share of the total, first seed. KD is DeiT's soft term (summed KL ÷ numel of the logits, "
             "× τ²), so it is per logit; the imitation terms are squared errors summed over C·H·W and the chosen "
             "blocks and averaged over the batch (`mi.feature_reduction: sample_sum`; L_rel: `mi.rel_reduction`), "
             "then × λ (a run `--<reading>` of an open point: that reading's reduction and weights). A term whose "
             "window closes within the epoch counts 0 on the steps after it.", "",
             "| run | " + " | ".join(LOSS_TERMS.values()) + " |", "|---|" + "---|" * len(LOSS_TERMS)]
    first_seed = study.settings["seeds"][0]
    shown = 0
    for run in study.runs:
        if study.run_specs[run][2] != first_seed or run not in results.evals:
            continue
        history = _maybe_json(study.run_dir(run) / "history.json") or []
        terms = {k: history[0][f"train/{k}"] for k in LOSS_TERMS if history and f"train/{k}" in history[0]}
        if len(terms) < 2:
            continue
        total = sum(terms.values()) or 1.0
        cells = [f"{terms[k]:.3g} ({100 * terms[k] / total:.0f}%)" if k in terms else "" for k in LOSS_TERMS]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
        shown += 1
    return "\n".join(lines if shown else lines[:2] + [f"{MISSING} (no run combines loss terms yet)"]) + "\n"


def _ratio(r: dict | None) -> str:
    if not r:
        return MISSING
    iv = median_interval(r["samples"])
    return f"×{iv.mean:.2f} [{iv.low:.2f}, {iv.high:.2f}]"


def _onnx_section(bench: dict) -> list[str]:
    """T6's PoolFormer and deploy RIFormer in torch (eager) and in ONNX Runtime, from the same interleaved rounds."""
    twins = [name.removesuffix(ORT) for name in bench.get("models", {}) if name.endswith(ORT)]
    if not twins:
        return []
    lines = ["### Deploy models in ONNX Runtime", "",
             f"Images/s in evaluate's interleaved benchmark (batch {bench['batch_size']}, {bench['threads']} threads, "
             f"median [min, max] over {bench['repeats']} rounds); × is the per-round ratio to `{bench['reference']}` "
             "in the same runtime. `python -m pipeline export` checks every student's ONNX model against torch.", "",
             "| architecture | torch img/s | × in torch | ONNX Runtime img/s | × in ONNX Runtime |",
             "|---|---|---|---|---|"]
    for name in twins:
        cells = []
        for row in (bench["models"][name], bench["models"][name + ORT]):
            t, r = row["throughput"], row["ratio_to_reference"]
            cells += [f"{t['median']:,.0f} [{t['min']:,.0f}, {t['max']:,.0f}]",
                      f"×{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines + [""]


def _index(study: Study, results: Results, md_tables: list[str], f1: str, verdicts: list[dict],
           figs: list[str], wall_time_s: float | None, regime_md: str = "", readings_md: str = "") -> str:
    meta = _maybe_json(study.data_dir / "meta.json") or {}
    train_time = sum((_maybe_json(study.run_dir(r) / "metrics.json") or {}).get("train_wall_time_s", 0)
                     for r in results.evals)
    git = git_state()
    bench = results.benchmark or {}
    seeds, n = study.settings["seeds"], results.test_images
    rounds = (bench.get("repeats") or 0)
    lines = [
        f"# RIFormer study: `{study.profile}` profile", "",
        f"{study.settings.get('description', '')}. Every table below puts our figure beside the paper's and "
        "compares the changes relative to each table's reference row: absolute numbers on another dataset do not "
        "compare. Generated by `python -m pipeline report` (do not edit); run links open the MLflow UI of the "
        "machine that ran the study (`make ui`).", "",
        "| | |", "|---|---|",
        f"| profile | `{study.profile}` |",
        f"| dataset | {meta.get('source', MISSING)}, {meta.get('counts', MISSING)}, "
        f"hash `{meta.get('data_hash', '')[:16]}` |",
        f"| test images | {n:,} (every accuracy and Δ below is over all of them) |" if n else "| test images | — |",
        f"| seeds | {seeds}: every student variant once per seed; teachers once |",
        f"| git commit | `{git['git_commit'][:12]}` (dirty: {git['git_dirty']}) |",
        f"| device | {bench.get('device_name', platform.processor() or platform.machine())} |",
        f"| machine of the throughputs | {machine_line(bench.get('machine'))} |",
        f"| runs evaluated | {len(results.evals)} of {len(study.runs)}"
        + (f"; stale (inputs changed since, not shown): {', '.join(sorted(results.stale))}" if results.stale else "")
        + " |",
        "| total wall time | " + (f"{wall_time_s / 60:.1f} min for the pipeline invocation that wrote this report; "
                                   if wall_time_s else "") + f"{train_time / 60:.1f} min of training (sum over runs) |",
        "",
        "## How to read the intervals", "",
        f"Each top-1 and each Δ of top-1 has a {results.level:.0%} interval that counts both sources of chance: "
        f"the seeds (training randomness; variants of one seed see the same batches, so a Δ is paired by seed) and "
        f"the test images (paired by image). "
        + ("With one seed the interval covers the test images only: the seed-to-seed variation is not in it. "
           if len(seeds) == 1 else
           f"With {len(seeds)} seeds the t quantile has few degrees of freedom, so the intervals are wide. ")
        + (f"A row trained once (a teacher) gets the seed-to-seed part estimated from the multi-seed rows: "
           f"σ {100 * np.sqrt(results.seed_var[0]):.2f} points ({results.seed_var[1]:g} df, pooled). "
           if results.seed_var else "")
        + ("AdaViT's expected MACs follow its learned gates: their interval is over the seeds. "
           if any(study.is_adaptive(v) for v in study.variants) else "")
        + f"MDE is the minimal detectable effect: the true Δ these seeds and test images find with "
        f"{results.power:.0%} power; beside it, the seeds that would detect the paper's Δ with that power at the "
        "variance measured here (the test images held fixed; ∞: no number of seeds, the test images' share alone is "
        f"too large). Throughput intervals are over the {rounds} interleaved rounds of the "
        "benchmark (order statistics of the median). The method: `pipeline/stats.py` and the README.", "",
        "## The five guidelines (verdicts computed from the intervals)", "",
        "supported: every voting Δ's interval lies on the paper's side of the threshold; contradicted: one lies "
        "on the other side; inconclusive: an interval contains the threshold.", "",
    ]
    for v in verdicts:
        lines += [f"**{v['guideline']}. {v['text']}** — **{v['verdict']}**", "",
                  f"Rule: {v['rule']} (Δ {'>' if v['direction'] == 'above' else '<'} {v['threshold']:g} points).", "",
                  f"| Δ | ours [95% CI] | MDE | seeds × images | seeds for the paper's Δ ({results.power:.0%} power) "
                  "| paper | votes |", "|---|---|---|---|---|---|---|"]
        for d, votes in [(d, "yes") for d in v["votes"]] + [(d, "no (shown)") for d in v["shown"]]:
            iv = d["ours"]
            lines.append(f"| {d['delta']} | {fmt_delta(iv, 'top1')} | "
                         + (f"{iv.mde:.2f} | {iv.seeds} × {iv.n:,}" if iv else f"{MISSING} | {MISSING}")
                         + f" | {_seeds_needed(iv, d['paper'], results)} | {fmt_delta(d['paper'], 'top1')} | {votes} |")
        lines.append("")
    lines += [readings_md, regime_md, "## Tables", ""] + md_tables
    lines += ["### F1: latency breakdown of a 12-layer ViT-B", "", f1]
    lines += _onnx_section(bench) + ["## Figures", ""]
    for f in figs:
        lines += [f"![{f}](figures/{f}.png)", ""]
    return "\n".join(lines)


def machine_line(m: dict | None) -> str:
    """The machine record of a benchmark (pipeline.measure.machine_record) in one line."""
    if not m:
        return "not recorded"
    return (f"{m['gpu'] + ', ' if m.get('gpu') else ''}{m['cpu']} ({m['cpu_capability']}; "
            f"{' '.join(m['isa']) or 'no x86 SIMD flags'}), {m['threads']} threads of {m['cores']} cores; "
            f"torch {m['torch']}, oneDNN {m['onednn']}, ONNX Runtime {m['onnxruntime']}; "
            f"precision {throughput_precision(m)}")


def _seeds_needed(iv: Interval | None, paper: float | None, results: Results) -> str:
    """The seeds that would detect the paper's Δ with the report's power (pipeline.stats.seeds_for_power)."""
    if iv is None or paper is None or iv.components is None:
        return MISSING
    n = seeds_for_power(iv, paper, results.level, results.power)
    return "∞" if n is None else f"{n:,}"


def run(args: argparse.Namespace) -> dict:
    study = load_study(args.profile, check_data=False)
    out = Path(args.out) if args.out else study.report_dir
    incomplete = Results(study).incomplete
    if incomplete and not args.allow_missing:
        raise SystemExit(f"report: the evaluation is incomplete: {len(incomplete)} of {len(study.runs)} runs have no "
                         f"current result ({', '.join(incomplete[:8])}{', ...' if len(incomplete) > 8 else ''}); "
                         f"run the study (it evaluates them), or pass --allow-missing to report without them")
    if out.is_dir() and any(p.is_file() for p in out.rglob("*")) and not (out / "summary.json").is_file():
        raise SystemExit(f"report: {out} holds files but no report (no summary.json): not replacing it")
    with atomic_dir(out) as staging:  # the old report or the new one, whole: never a mix of both
        summary = write_report(study, staging, mlflow_links(args.profile), invocation_wall_time(args.profile))
    with tracking.stage_run(args.profile, "report", args.profile) as (mlflow, run):
        for v in summary["verdicts"]:
            mlflow.set_tag(f"guideline_{v['guideline']}", v["verdict"])
        mlflow.log_artifacts(str(out), "report")
        # the invocation's parent run carries every table cell, so one MLflow view compares invocations
        tracking.log_metrics(tracking.parent_run_id(args.profile) or run.info.run_id, cell_metrics(summary["tables"]))
    for v in summary["verdicts"]:
        print(f"guideline {v['guideline']}: {v['verdict']}")
    print(f"report -> {out}/README.md ({len(summary['missing'])} missing cells, {len(summary['stale'])} stale runs)")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--out", help="report folder (default results/<profile>/report)")
    p.add_argument("--allow-missing", action="store_true",
                   help="report even when some runs have no current evaluation (their cells say missing or stale)")
