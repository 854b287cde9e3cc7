"""`python -m pipeline compare`: does a fresh report reproduce a reference report (by default the committed
reports/<profile>/), within what separates two honest runs?

Per cell (docs/statistics.md, "Comparing two reports"):
- a count (params, MACs of a fixed architecture) must be equal;
- an accuracy, a Δ, or an estimate over seeds (AdaViT's expected MACs) agrees when the two values are within the
  two intervals combined: |fresh − ref| <= sqrt(h_fresh² + h_ref²), each half-width taken on the side facing the
  other value (the interval of a difference of two independent estimates);
- a throughput or a throughput ratio is compared only when both reports record the same machine and precision
  policy (pipeline.measure.MACHINE_KEYS; a report from before the policy reads as fp32 on a CPU), on the log
  scale, with the spread between two invocations of one machine added to the rounds' intervals (`report.compare`:
  `throughput_rsd` for images/s, which drift with the machine's speed, `ratio_rsd` for ratios of models timed in
  the same rounds); otherwise "not compared: other machine";
- a row whose training recipe changed between the two reports (its run identity's config) is not compared;
- a report written before one-seed rows carried a seed part (its summary has no `single_seed_sd`) gets the other
  report's estimate added to its one-seed cells (σ for a value, σ√2 for a one-seed Δ, whose two sides each have
  a seed effect); an AdaViT expected-MACs cell that neither report gives an interval is not compared.

The verdict comes first: **reproduced** (every compared cell agrees and every guideline verdict is the same),
**reproduced except N cells** (the verdicts and every Δ agree; N cells of a row's own value or throughput do not),
or **differs** (a guideline verdict, a count or a Δ moved).
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import read_json
from pipeline.measure import MACHINE_KEYS, throughput_precision
from pipeline.publish import REPORTS
from pipeline.report import SIZE_METRICS, THROUGHPUTS
from pipeline.study import load_study

Z95 = 1.959964


@dataclass
class Comparison:
    """What a comparison found: per table, the differing cells (kind, line) and the cells not compared (reason)."""
    reference: Path
    tables: dict[str, dict] = field(default_factory=dict)  # name -> {"compared": n, "diffs": [...], "skipped": {}}
    verdicts: list[tuple[int | str, str | None, str | None]] = field(default_factory=list)  # (guideline, fresh, ref)
    notes: list[str] = field(default_factory=list)

    @property
    def diffs(self) -> list[tuple[str, str]]:
        return [d for t in self.tables.values() for d in t["diffs"]]

    @property
    def skipped(self) -> Counter:
        return sum((Counter(t["skipped"]) for t in self.tables.values()), Counter())

    def verdict(self) -> str:
        moved = [g for g, f, r in self.verdicts if f != r]
        decisive = [line for kind, line in self.diffs if kind in ("effect", "count", "table")]
        if moved or decisive:
            return "differs"
        n = len(self.diffs)
        return "reproduced" if not n else f"reproduced except {n} cell{'s' * (n != 1)}"


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(r["row"], r["metric"]): r for r in csv.DictReader(f)}


def _tables(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted((folder / "tables").glob("*.csv")) if p.stem not in ("regime", "readings")}


def machine_difference(fresh: dict | None, ref: dict | None) -> str | None:
    """None when both reports' throughputs were measured on the same kind of machine under the same precision
    policy; else what differs."""
    if not fresh or not ref:
        return f"the {'fresh' if not fresh else 'reference'} report records no machine"
    fresh, ref = ({**m, "precision": throughput_precision(m)} for m in (fresh, ref))
    diff = [f"{k} {_short(ref.get(k))} vs {_short(fresh.get(k))}" for k in MACHINE_KEYS if fresh.get(k) != ref.get(k)]
    return "; ".join(diff) or None


def _short(v) -> str:
    return " ".join(v) if isinstance(v, list) else str(v)


def agree(f: float, f_low: float, f_high: float, c: float, c_low: float, c_high: float,
          extra: float = 0.0) -> bool:
    """Two estimates agree when their difference lies within the combined half-widths facing each other, plus an
    `extra` half-width of spread that neither interval holds."""
    hf, hc = (f - f_low, c_high - c) if f >= c else (f_high - f, c - c_low)
    return abs(f - c) <= math.sqrt(hf ** 2 + hc ** 2 + extra ** 2) * (1 + 1e-9) + 1e-12


def _agree_log(f, f_low, f_high, c, c_low, c_high, rsd: float) -> bool:
    if min(f, f_low, c, c_low) <= 0:
        return agree(f, f_low, f_high, c, c_low, c_high)
    return agree(*(math.log(x) for x in (f, f_low, f_high, c, c_low, c_high)), extra=Z95 * rsd * math.sqrt(2))


def _show(cell: dict, col: str) -> str:
    """A cell's value and interval, as the tables print them."""
    metric, delta = cell["metric"], col == "ours_delta"
    ratio = metric in THROUGHPUTS or metric in SIZE_METRICS

    def f(x: str) -> str:
        v = float(x)
        return (f"×{v:.3f}" if delta else f"{v:.4g}") if ratio else (f"{v:+.2f}" if delta else f"{v:.2f}")
    return f"{f(cell[col])} [{f(cell[col + '_low'])}, {f(cell[col + '_high'])}]"


def compare_cell(fresh: dict, ref: dict, throughput_rsd: float = 0.16, seed_sd: float = 0.0,
                 ratio_rsd: float = 0.05) -> list[tuple[str, str]]:
    """The differences (kind, text) between a fresh and a reference cell of the same machine (module doc).
    `seed_sd`: points of seed-to-seed spread that one report's one-seed intervals lack (module doc)."""
    metric = fresh["metric"]
    if fresh["state"] != "ok" or ref["state"] != "ok":
        same = fresh["state"] == ref["state"]
        return [] if same else [("value", f"fresh {fresh['state']}, reference {ref['state']}")]
    out = []
    for col, kind in (("ours", "value"), ("ours_delta", "effect")):
        if not ref.get(col):
            continue
        name = "Δ " if col == "ours_delta" else ""
        if not fresh.get(col):
            out.append((kind, f"fresh {name}missing"))
            continue
        f, f_lo, f_hi, c, c_lo, c_hi = (float(cell[col + s]) for cell in (fresh, ref) for s in ("", "_low", "_high"))
        shown = f"{name}fresh {_show(fresh, col)} vs reference {_show(ref, col)}"
        if metric in THROUGHPUTS:
            if not _agree_log(f, f_lo, f_hi, c, c_lo, c_hi, ratio_rsd if col == "ours_delta" else throughput_rsd):
                out.append(("throughput", f"{shown}: beyond the rounds' and the between-invocation spread"))
        elif metric in SIZE_METRICS and f_lo == f_hi == f and c_lo == c_hi == c:  # counts
            if abs(f - c) > 1e-6 * abs(c):
                out.append(("count", f"{name}count {fresh[col]} vs reference {ref[col]}"))
        else:
            one_seed = fresh.get("ours_delta_seeds" if col == "ours_delta" else "ours_seeds") == "1"
            extra = Z95 * seed_sd * (math.sqrt(2) if col == "ours_delta" else 1) if one_seed else 0.0
            if not agree(f, f_lo, f_hi, c, c_lo, c_hi, extra):
                out.append((kind, f"{shown}: apart by more than the two intervals"))
    return out


def compare_reports(fresh_dir: Path, ref_dir: Path, throughput_rsd: float = 0.16,
                    tables: list[str] | None = None, fallback_seed_sd: float | None = None,
                    ratio_rsd: float = 0.05) -> Comparison:
    """Compare two report folders (README.md, summary.json, tables/*.csv), cell by cell. `fallback_seed_sd`:
    the seed part (points) for one-seed cells when neither report records one (module doc)."""
    result = Comparison(ref_dir)
    fs, rs = read_json(fresh_dir / "summary.json"), read_json(ref_dir / "summary.json")
    machine = machine_difference(fs.get("machine"), rs.get("machine"))
    f_rec, r_rec = fs.get("recipes"), rs.get("recipes")
    if not r_rec:
        result.notes.append("the reference records no training recipes: a cell may differ because its recipe "
                            "changed")
    if fs.get("seeds") != rs.get("seeds") or fs.get("test_images") != rs.get("test_images"):
        result.notes.append(f"other study size: seeds {rs.get('seeds')} × {rs.get('test_images')} test images "
                            f"in the reference, {fs.get('seeds')} × {fs.get('test_images')} here")
    seed_sd = _missing_seed_sd(fs, rs, fallback_seed_sd, result.notes)
    learned = set(fs.get("adaptive") or {}) | set(rs.get("adaptive") or {})  # runs whose MACs follow their gates
    fresh_tables, ref_tables = _tables(fresh_dir), _tables(ref_dir)
    for name in tables or list(fresh_tables):
        entry = result.tables.setdefault(name, {"compared": 0, "diffs": [], "skipped": {}})
        if name not in ref_tables:
            entry["diffs"].append(("table", f"{name}: not in the reference (a new table); `make publish` adds it"))
            continue
        if name not in fresh_tables:
            entry["diffs"].append(("table", f"{name}: not in the fresh report"))
            continue
        fresh, ref = _rows(fresh_tables[name]), _rows(ref_tables[name])
        if "ours_low" not in next(iter(ref.values()), {"ours_low": ""}):
            entry["skipped"]["the reference table has no intervals (an older version)"] = len(ref)
            continue
        for key in sorted(ref.keys() | fresh.keys()):
            if key not in fresh or key not in ref:
                entry["diffs"].append(("value", f"{key[0]} {key[1]}: only in the "
                                                f"{'reference' if key in ref else 'fresh'} table"))
                continue
            run = fresh[key]["run"]
            if f_rec and r_rec and run in f_rec and run in r_rec and f_rec[run] != r_rec[run]:
                _skip(entry, f"other recipe ({run}'s training config changed)")
                continue
            if key[1] in THROUGHPUTS and machine:
                _skip(entry, f"other machine ({machine})")
                continue
            if key[1] == "macs_g" and run in learned and all(
                    c[col] == c[col + "_low"] == c[col + "_high"] for c in (fresh[key], ref[key]) for col in ("ours",)):
                _skip(entry, "expected MACs of learned gates, with no interval in either report (one seed, or an "
                                   "older version)")
                continue
            metric_seed_sd = 0.0 if key[1] in THROUGHPUTS or key[1] in SIZE_METRICS else seed_sd
            found = compare_cell(fresh[key], ref[key], throughput_rsd, metric_seed_sd, ratio_rsd)
            entry["compared"] += fresh[key]["state"] == "ok"
            entry["diffs"] += [(kind, f"{key[0]} {key[1]}: {text}") for kind, text in found]
    fv = {v["guideline"]: v["verdict"] for v in fs.get("verdicts", [])}
    rv = {v["guideline"]: v["verdict"] for v in rs.get("verdicts", [])}
    result.verdicts = [(g, fv.get(g), rv.get(g)) for g in sorted(fv.keys() | rv.keys())]
    # under each reading of an open point (a profile with `readings`): "3 under mi-weights: mean"
    fr, rr = _reading_verdicts(fs), _reading_verdicts(rs)
    result.verdicts += [(g, fr.get(g), rr.get(g)) for g in sorted(fr.keys() | rr.keys())]
    return result


def _reading_verdicts(summary: dict) -> dict[str, str]:
    return {f"{item['guideline']} under {item['point']}: {row['reading']}": row["verdict"]
            for item in summary.get("reading_verdicts", []) for row in item["rows"] if not row["study"]}


def _missing_seed_sd(fs: dict, rs: dict, fallback: float | None, notes: list[str]) -> float:
    """Points of seed spread to add to the one-seed cells of a report that lacks its seed part (module doc)."""
    lacking = [name for name, s in (("fresh", fs), ("reference", rs)) if "single_seed_sd" not in s]
    if not lacking:
        return 0.0
    known = [s["single_seed_sd"]["points"] for s in (fs, rs) if s.get("single_seed_sd")]
    sd = known[0] if known else fallback
    if sd is None:
        notes.append(f"the {' and '.join(lacking)} report's one-seed intervals hold no seed part, and no estimate "
                     f"is at hand: its one-seed cells are compared over the test images alone")
        return 0.0
    notes.append(f"the {' and '.join(lacking)} report's one-seed intervals hold no seed part (an older version): "
                 f"σ {sd:.2f} points of seed spread is added to them"
                 + ("" if known else " (the committed report's estimate)"))
    return sd


def _skip(entry: dict, reason: str) -> None:
    entry["skipped"][reason] = entry["skipped"].get(reason, 0) + 1


def print_comparison(c: Comparison, label: str) -> None:
    """The verdict first, then each table's differences and what was not compared, then the guidelines."""
    skipped = c.skipped
    tail = "; ".join(f"{n} cells not compared: {why}" for why, n in skipped.items())
    print(f"{label}: {c.verdict()} (against {c.reference}{'; ' + tail if tail else ''})")
    for note in c.notes:
        print(f"  note: {note}")
    print()
    for name, t in c.tables.items():
        skip = "; ".join(f"{n} not compared ({why.split(' (')[0]})" for why, n in t["skipped"].items())
        head = (f"reproduced ({t['compared']} cells within their intervals)" if not t["diffs"] else
                f"{len(t['diffs'])} difference(s) of {t['compared']} cells")
        print(f"{name}: {head}" + (f"; {skip}" if skip else ""))
        for kind, line in t["diffs"]:
            print(f"  [{kind}] {line}")
    for g, f, r in c.verdicts:
        print(f"guideline {g}: {f}" + ("" if f == r else f" (reference: {r})"))


def compare(profile: str, reference: str | Path | None = None, fresh: str | Path | None = None) -> Comparison | None:
    """Compare the profile's fresh report (or `fresh`) with `reference` (default: the committed reports/<profile>/)
    and print it; None when there is no reference to compare with."""
    study = load_study(profile, check_data=False)
    fresh_dir = Path(fresh) if fresh else study.report_dir
    ref_dir = Path(reference) if reference else REPORTS / profile
    if not (ref_dir / "summary.json").is_file():
        if reference:
            raise SystemExit(f"compare: {ref_dir} is not a report folder (no summary.json)")
        print(f"compare: no committed reference for profile {profile!r} ({ref_dir}); `make publish` makes one")
        return None
    if not (fresh_dir / "summary.json").is_file():
        raise SystemExit(f"compare: no fresh report in {fresh_dir}; run the study first")
    spread = study.settings["report"].get("compare", {})
    committed = REPORTS / profile / "summary.json"
    fallback = (read_json(committed).get("single_seed_sd") or {}).get("points") if committed.is_file() else None
    result = compare_reports(fresh_dir, ref_dir, spread.get("throughput_rsd", 0.16),
                             None if fresh else list(study.tables), fallback, spread.get("ratio_rsd", 0.05))
    print_comparison(result, profile)
    return result


def run(args: argparse.Namespace) -> None:
    result = compare(args.profile, args.reference, args.fresh)
    if args.strict and result is not None and result.verdict() != "reproduced":
        raise SystemExit(1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--reference", metavar="DIR", help="a report folder to compare with (default: the committed "
                                                      "reports/<profile>/): a colleague's, another machine's")
    p.add_argument("--fresh", metavar="DIR", help="the report to check (default: results/<profile>/report/)")
    p.add_argument("--strict", action="store_true", help="exit 1 unless the verdict is 'reproduced'")
