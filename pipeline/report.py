"""`python -m pipeline report`: every paper table beside the paper's numbers, the figures, the guideline verdicts.

Inputs are the results of the other stages (eval/<run>.json, benchmark.json, latency.json, histories) and
the project's copy of the paper's numbers (params/paper_results.csv). A missing result is shown as missing;
it never stops the report. Each table compares changes: every row gives ours and the paper's value and
both changes relative to the table's reference row (top-1: difference in points; throughput, params and
MACs: ratio).
Several seeds of a variant give mean +- std and n. Outputs (reports/<profile>/): README.md (the index),
tables/<T>.{md,tex,csv}, figures/*.{png,pdf} (fixed metadata: a rerun that changes nothing gives
byte-identical files), summary.json.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import tracking
from pipeline.benchmark import fast_path_label
from pipeline.io import atomic_path, read_json, write_json
from pipeline.study import Study, load_study

PAPER_CSV = Path(__file__).resolve().parent.parent / "params" / "paper_results.csv"
THROUGHPUT = "throughput"
THROUGHPUT_FAST = "throughput_fast"  # AdaViT's fast inference path
# metrics read from eval/<run>.json, with their scale; like throughput, their change is a ratio
SIZE_METRICS = {"params_m": ("params", 1e6), "macs_g": ("macs", 1e9)}
THROUGHPUTS = (THROUGHPUT, THROUGHPUT_FAST)
RATIO_METRICS = (*THROUGHPUTS, *SIZE_METRICS)
MISSING = "—"
FIGURES = ["accuracy_vs_throughput", "ablation_deltas", "training_curves", "latency_breakdown",
           "reparameterization_error", "adavit_decisions"]
GUIDELINES = {
    1: "Soft distillation without ground-truth labels is best for a token-mixer-free student.",
    2: "The affine re-parameterization alone, without tailored distillation, hardly helps.",
    3: "Block-wise knowledge distillation (module imitation) lets the affine operator use its capacity.",
    4: "A teacher with a large receptive field (GFNet) helps a student with a small one.",
    5: "Loading the teacher's weights (all but the token mixer) improves accuracy.",
}


def load_paper(path: Path = PAPER_CSV) -> dict[tuple[str, str, str], float]:
    with open(path, newline="") as f:
        return {(r["table"], r["row"], r["metric"]): float(r["value"]) for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------ values
@dataclass
class Value:
    """Our figure for one cell: the seeds' values and the MLflow runs they came from."""
    samples: list[float] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    spread: tuple[float, float] | None = None  # throughput: min, max over rounds

    @property
    def ok(self) -> bool:
        return bool(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else None

    @property
    def n(self) -> int:
        return len(self.samples)


class Results:
    """Everything the stages wrote for one profile; absent files are simply absent."""

    def __init__(self, study: Study):
        self.study = study
        self.evals = {r: _maybe_json(study.eval_path(r)) for r in study.runs}
        self.benchmark = _maybe_json(study.benchmark_path)
        self.latency = _maybe_json(study.latency_path)

    def seed_runs(self, variant: str) -> list[str]:
        if variant in self.study.teachers:
            return [variant]
        return [self.study.seed_name(variant, s) for s in self.study.settings["seeds"]]

    def value(self, variant: str | None, metric: str) -> Value:
        v = Value()
        if variant is None:
            return v
        if metric in THROUGHPUTS:
            label = (self.benchmark or {}).get("runs", {}).get(variant)
            if label and metric == THROUGHPUT_FAST:
                label = fast_path_label(label)
            if label and label in self.benchmark["models"]:
                row = self.benchmark["models"][label]["throughput"]
                v.samples, v.spread = [row["median"]], (row["min"], row["max"])
                ev = self.evals.get(variant)
                v.run_ids = [ev["train_run_id"]] if ev else []
            return v
        key, scale = SIZE_METRICS.get(metric, ("test_top1", 1.0))
        for run in self.seed_runs(variant):
            ev = self.evals.get(run)
            if ev is not None and key in ev:
                v.samples.append(ev[key] / scale)
                v.run_ids.append(ev["train_run_id"])
        return v


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
    ours: Value
    paper: float | None
    ours_delta: float | None = None
    paper_delta: float | None = None


def build_table(name: str, results: Results, paper: dict) -> list[Row]:
    spec = results.study.tables[name]
    rows = []
    for r in spec["rows"]:
        metric = r.get("metric", "top1")
        rows.append(Row(name, r["row"], metric, r.get("run"), results.value(r.get("run"), metric),
                        paper.get((name, r["row"], metric))))
    refs = {r.metric: r for r in rows if r.row == spec["reference"]}
    for r in rows:
        # the fast path's throughput is compared with the reference row's throughput
        ref = refs.get(THROUGHPUT if r.metric == THROUGHPUT_FAST else r.metric)
        if ref is None:
            continue
        r.ours_delta = _delta(r.metric, r.ours.mean if r.ours.ok else None, ref.ours.mean if ref.ours.ok else None)
        r.paper_delta = _delta(r.metric, r.paper, ref.paper)
    return rows


def _delta(metric: str, value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None:
        return None
    return value / reference if metric in RATIO_METRICS else value - reference


def fmt_value(v: Value, metric: str) -> str:
    if not v.ok:
        return MISSING
    if metric in THROUGHPUTS:
        return f"{v.mean:.0f} [{v.spread[0]:.0f}, {v.spread[1]:.0f}]" if v.spread else f"{v.mean:.0f}"
    if metric in SIZE_METRICS:
        return f"{v.mean:.4g}"
    if v.n > 1:
        return f"{v.mean:.2f} ± {v.std:.2f} (n={v.n})"
    return f"{v.mean:.2f}"


def fmt_delta(d: float | None, metric: str) -> str:
    if d is None:
        return MISSING
    return f"×{d:.3f}" if metric in RATIO_METRICS else f"{round(d, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"


def fmt_paper(p: float | None) -> str:
    return MISSING if p is None else f"{p:.2f}"


HEADERS = ["row", "metric", "ours", "paper", "Δ ours", "Δ paper", "run"]


def table_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "metric", "run", "ours_mean", "ours_std", "ours_n", "paper", "ours_delta",
                "paper_delta", "mlflow_run_ids"])
    for r in rows:
        w.writerow([r.table, r.row, r.metric, r.run or "", _num(r.ours.mean if r.ours.ok else None),
                    _num(r.ours.std if r.ours.ok else None), r.ours.n, _num(r.paper), _num(r.ours_delta),
                    _num(r.paper_delta), ";".join(r.ours.run_ids)])
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def table_markdown(name: str, rows: list[Row], title: str, reference: str, link) -> str:
    lines = [f"### {name}: {title}", "",
             f"Reference row: `{reference}`. Δ: top-1 in points, throughput / params / MACs as a ratio.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        runs = " ".join(link(rid) for rid in r.ours.run_ids) if r.ours.run_ids else (
            "not run in this project" if r.run is None else "missing")
        lines.append(f"| {r.row} | {r.metric} | {fmt_value(r.ours, r.metric)} | {fmt_paper(r.paper)} | "
                     f"{fmt_delta(r.ours_delta, r.metric)} | {fmt_delta(r.paper_delta, r.metric)} | {runs} |")
    return "\n".join(lines) + "\n"


def table_latex(name: str, rows: list[Row], title: str) -> str:
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(name)}: {esc(title)} (ours beside the paper's)}}",
           r"\begin{tabular}{llrrrr}", r"\toprule",
           r"Row & Metric & Ours & Paper & $\Delta$ ours & $\Delta$ paper \\", r"\midrule"]
    tex = lambda s: s.replace("±", r"$\pm$").replace("×", r"$\times$").replace("—", "--")  # noqa: E731
    for r in rows:
        cells = [esc(r.row), esc(r.metric), fmt_value(r.ours, r.metric), fmt_paper(r.paper),
                 fmt_delta(r.ours_delta, r.metric), fmt_delta(r.paper_delta, r.metric)]
        out.append(" & ".join(tex(c) for c in cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------------- guidelines
def _cell(tables: dict[str, list[Row]], table: str, row: str, metric: str = "top1") -> Row | None:
    return next((r for r in tables.get(table, []) if r.row == row and r.metric == metric), None)


def _compare(a: Row | None, b: Row | None, label: str) -> dict:
    """Delta a - b with the seed test: does it exceed the seed-to-seed spread?"""
    if a is None or b is None or not a.ours.ok or not b.ours.ok:
        return {"delta": label, "ours": None, "paper": None, "seed_test": "missing result"}
    d = a.ours.mean - b.ours.mean
    paper = a.paper - b.paper if a.paper is not None and b.paper is not None else None
    if a.ours.n > 1 and b.ours.n > 1:
        spread = math.sqrt(a.ours.std ** 2 + b.ours.std ** 2)
        test = f"{'exceeds' if abs(d) > spread else 'within'} the seed spread ({spread:.2f})"
    else:
        test = "one seed: no seed-spread test could be made"
    return {"delta": label, "ours": d, "paper": paper, "seed_test": test}


def guideline_verdicts(tables: dict[str, list[Row]], hardly_pp: float = 0.5) -> list[dict]:
    """Each guideline's verdict, computed from the tables (never typed in)."""
    out = []
    # 1: soft KD without labels is the best row of T2 and of T3
    deltas, checks = [], []
    for t, prefix in (("T2", "identity"), ("T3", "affine")):
        target = _cell(tables, t, f"{prefix}-nolabel-soft")
        others = [r for r in tables.get(t, []) if r.ours.ok and r is not target]
        if target is None or not target.ours.ok or not others:
            checks.append(None)
            continue
        runner_up = max(others, key=lambda r: r.ours.mean)
        deltas.append(_compare(target, runner_up, f"{t}: {target.row} − best other row ({runner_up.row})"))
        checks.append(deltas[-1]["ours"] > 0)
    out.append(_verdict(1, None if None in checks else all(checks), deltas))
    # 2: affine alone hardly helps: affine - identity for each labels x KD setting stays small
    deltas = []
    for setting in ("label-nokd", "label-hard", "nolabel-hard", "label-soft", "nolabel-soft"):
        deltas.append(_compare(_cell(tables, "T3", f"affine-{setting}"), _cell(tables, "T2", f"identity-{setting}"),
                               f"affine − identity, {setting}"))
    known = [d["ours"] for d in deltas if d["ours"] is not None]
    ok = (statistics.fmean(known) < hardly_pp) if known else None
    out.append(_verdict(2, ok, deltas, f"supported when the mean gain is below {hardly_pp} points"))
    # 3: module imitation helps the affine student (T4 best MI row over soft KD alone)
    t4 = [r for r in tables.get("T4", []) if r.row != "feat0-rel0-none" and r.ours.ok]
    ref = _cell(tables, "T4", "feat0-rel0-none")
    deltas = [_compare(_cell(tables, "T4", "feat80-rel20-l4"), ref, "T4: feat80-rel20-l4 − no imitation")]
    if t4:
        best = max(t4, key=lambda r: r.ours.mean)
        deltas.append(_compare(best, ref, f"T4: best imitation row ({best.row}) − no imitation"))
    ok = deltas[0]["ours"] > 0 if deltas[0]["ours"] is not None else None
    out.append(_verdict(3, ok, deltas))
    # 4: the large-receptive-field teacher (GFNet) beats the PoolFormer teacher, with and without MI
    deltas = [_compare(_cell(tables, "T5", "gfnet_h_b", m), _cell(tables, "T5", "poolformer_m48", m),
                       f"T5 {m}: GFNet teacher − PoolFormer teacher") for m in ("top1_wo_mi", "top1_w_mi")]
    known = [d["ours"] for d in deltas if d["ours"] is not None]
    ok = all(k > 0 for k in known) if known else None
    # LightViT (global through its global tokens) as a second large-receptive-field teacher: shown, not voted
    deltas += [_compare(_cell(tables, "T5", "lightvit_tiny", m), _cell(tables, "T5", "poolformer_m48", m),
                        f"T5 {m}: LightViT teacher − PoolFormer teacher (not in the paper)")
               for m in ("top1_wo_mi", "top1_w_mi") if _cell(tables, "T5", "lightvit_tiny", m) is not None]
    out.append(_verdict(4, ok, deltas, "verdict from the paper's GFNet − PoolFormer deltas"))
    # 5: partial loading improves
    deltas = [_compare(_cell(tables, "PL", "mi-gfnet-partial-init"), _cell(tables, "PL", "mi-gfnet"),
                       "PL: partial init − none")]
    ok = deltas[0]["ours"] > 0 if deltas[0]["ours"] is not None else None
    out.append(_verdict(5, ok, deltas))
    return out


def _verdict(n: int, ok: bool | None, deltas: list[dict], rule: str = "") -> dict:
    verdict = "not testable (missing results)" if ok is None else ("supported" if ok else "not supported")
    return {"guideline": n, "text": GUIDELINES[n], "verdict": verdict, "rule": rule, "deltas": deltas}


# ----------------------------------------------------------------------------------------------- writing
def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def mlflow_links(profile: str):
    """A function run_id -> Markdown link into the MLflow UI (`make ui`)."""
    base = "http://localhost:5000"
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
        return f"[{run_id[:8]}]({base}/#/experiments/{exp_id}/runs/{run_id})"
    return link


def invocation_wall_time(profile: str) -> float | None:
    """Seconds since this pipeline invocation's MLflow parent run started (None outside a session)."""
    import time

    run_id = tracking.parent_run_id(profile)
    if not run_id:
        return None
    try:
        mlflow = tracking.setup(tracking.experiment_name(profile))
        return time.time() - mlflow.MlflowClient().get_run(run_id).info.start_time / 1000
    except Exception:  # a report never fails for want of a tracking store
        return None


def write_report(study: Study, out: Path, links=None, wall_time_s: float | None = None) -> dict:
    from pipeline import figures

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
    verdicts = guideline_verdicts(tables, study.settings.get("report", {}).get("hardly_helps_pp", 0.5))
    figs = figures.make_all(study, results, tables, paper, out / "figures")
    adaptive = adaptive_summary(study, results)
    summary = {"profile": study.profile, "verdicts": verdicts, "figures": figs, "adaptive": adaptive,
               "missing": [f"{r.table}/{r.row}/{r.metric}" for rows in tables.values() for r in rows if not r.ours.ok]}
    write_json(out / "summary.json", summary)
    md_tables.append(adaptive_markdown(adaptive))
    _write_text(out / "README.md", _index(study, results, md_tables, f1, verdicts, figs, wall_time_s))
    return summary


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


def _ratio(r: dict | None) -> str:
    return MISSING if not r else f"×{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"


def _index(study: Study, results: Results, md_tables: list[str], f1: str, verdicts: list[dict],
           figs: list[str], wall_time_s: float | None) -> str:
    meta = _maybe_json(study.data_dir / "meta.json") or {}
    evals = [e for e in results.evals.values() if e]
    train_time = sum(_maybe_json(study.run_dir(e["run"]) / "metrics.json")["train_wall_time_s"] for e in evals)
    git = tracking.git_state()
    bench = results.benchmark or {}
    lines = [
        f"# RIFormer study: `{study.profile}` profile", "",
        f"{study.settings.get('description', '')}. Every table below puts our figure beside the paper's and "
        "compares the changes relative to each table's reference row: absolute numbers on another dataset do not "
        "compare. Generated by `python -m pipeline report` (do not edit).", "",
        "| | |", "|---|---|",
        f"| profile | `{study.profile}` |",
        f"| dataset | {meta.get('source', MISSING)}, {meta.get('counts', MISSING)}, "
        f"hash `{meta.get('data_hash', '')[:16]}` |",
        f"| git commit | `{git['git_commit'][:12]}` (dirty: {git['git_dirty']}) |",
        f"| device | {bench.get('device_name', platform.processor() or platform.machine())} |",
        f"| runs evaluated | {len(evals)} of {len(study.runs)} |",
        "| total wall time | " + (f"{wall_time_s / 60:.1f} min for the pipeline invocation that wrote this report; "
                                   if wall_time_s else "") + f"{train_time / 60:.1f} min of training (sum over runs) |",
        f"| seeds | {study.settings['seeds']} |", "",
        "## The five guidelines (verdicts computed from the tables)", "",
    ]
    for v in verdicts:
        rule = f" ({v['rule']})" if v["rule"] else ""
        lines.append(f"**{v['guideline']}. {v['text']}** — **{v['verdict']}**{rule}")
        lines.append("")
        for d in v["deltas"]:
            ours = MISSING if d["ours"] is None else fmt_delta(d["ours"], "top1")
            paper = MISSING if d["paper"] is None else fmt_delta(d["paper"], "top1")
            lines.append(f"- {d['delta']}: ours {ours}, paper {paper}; {d['seed_test']}")
        lines.append("")
    lines += ["## Tables", ""] + md_tables + ["### F1: latency breakdown of a 12-layer ViT-B", "", f1, "## Figures", ""]
    for f in figs:
        lines += [f"![{f}](figures/{f}.png)", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    study = load_study(args.profile, check_data=False)
    out = Path(args.out or f"reports/{args.profile}")
    summary = write_report(study, out, mlflow_links(args.profile), invocation_wall_time(args.profile))
    with tracking.stage_run(args.profile, "report", args.profile) as (mlflow, _):
        for v in summary["verdicts"]:
            mlflow.set_tag(f"guideline_{v['guideline']}", v["verdict"])
        mlflow.log_artifacts(str(out), "report")
    for v in summary["verdicts"]:
        print(f"guideline {v['guideline']}: {v['verdict']}")
    print(f"report -> {out}/README.md ({len(summary['missing'])} missing cells)")
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--out", help="report folder (default reports/<profile>)")
