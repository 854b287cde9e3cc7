"""`python -m pipeline publish` and `python -m pipeline compare`: the committed reference report of a profile.

The report stage writes results/<profile>/report/, never the committed reports/<profile>/: a fresh clone
therefore runs the whole study instead of finding its targets present. `publish` copies a fresh report to
reports/<profile>/ (refusing one with stale results). `compare` reads the fresh tables beside the committed ones
and says, per table, whether each committed figure lies inside the fresh 95% interval: "reproduced", or
exactly which cells differ. Throughputs in images/s depend on the machine and are not compared; their ratios
are. Parameters and MACs are counts and must be equal.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

from pipeline.io import read_json
from pipeline.report import SIZE_METRICS, THROUGHPUTS
from pipeline.study import load_study

REPORTS = Path("reports")


def publish(profile: str) -> Path:
    study = load_study(profile, check_data=False)
    fresh, target = study.report_dir, REPORTS / profile
    if not (fresh / "summary.json").is_file():
        raise SystemExit(f"publish: no report in {fresh}; run the study first (`make repro`)")
    summary = read_json(fresh / "summary.json")
    if summary["stale"]:
        raise SystemExit(f"publish: {fresh} shows stale runs ({', '.join(summary['stale'])}); rerun the study")
    if summary["missing"]:
        print(f"publish: note, {len(summary['missing'])} cells have no result: {', '.join(summary['missing'])}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{profile}.", dir=target.parent))
    try:  # copy beside the target, then swap: a killed publish leaves the old reference or the new one
        shutil.copytree(fresh, staging / profile)
        old = staging / "old"
        if target.exists():
            target.rename(old)
        (staging / profile).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"published {fresh} -> {target}")
    return target


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(r["row"], r["metric"]): r for r in csv.DictReader(f)}


def _inside(value: str, low: str, high: str) -> bool:
    return float(low) <= float(value) <= float(high)


def compare_cell(fresh: dict, ref: dict) -> list[str]:
    """What differs between one fresh cell and the committed one ([] when it agrees within its intervals)."""
    metric = fresh["metric"]
    if fresh["state"] != "ok" or ref["state"] != "ok":
        return [] if fresh["state"] == ref["state"] else [f"fresh {fresh['state']}, committed {ref['state']}"]
    problems = []
    if metric in SIZE_METRICS:
        if abs(float(fresh["ours"]) - float(ref["ours"])) > 1e-6 * abs(float(ref["ours"])):
            problems.append(f"count {fresh['ours']} vs committed {ref['ours']}")
    elif metric not in THROUGHPUTS and not _inside(ref["ours"], fresh["ours_low"], fresh["ours_high"]):
        problems.append(f"committed {float(ref['ours']):.2f} outside the fresh interval "
                        f"[{float(fresh['ours_low']):.2f}, {float(fresh['ours_high']):.2f}]")
    if ref["ours_delta"] and metric not in SIZE_METRICS:
        if not fresh["ours_delta"]:
            problems.append("fresh Δ missing")
        elif not _inside(ref["ours_delta"], fresh["ours_delta_low"], fresh["ours_delta_high"]):
            problems.append(f"committed Δ {float(ref['ours_delta']):+.3f} outside the fresh Δ interval "
                            f"[{float(fresh['ours_delta_low']):+.3f}, {float(fresh['ours_delta_high']):+.3f}]")
    return problems


def compare(profile: str) -> bool:
    """Print, per table, whether the fresh report reproduces the committed one; True when every cell agrees."""
    study = load_study(profile, check_data=False)
    fresh_dir, ref_dir = study.report_dir / "tables", REPORTS / profile / "tables"
    if not ref_dir.is_dir():
        print(f"compare: no committed reference for profile {profile!r} ({ref_dir}); `make publish` makes one")
        return True
    if not fresh_dir.is_dir():
        raise SystemExit(f"compare: no fresh report in {study.report_dir}; run the study first")
    all_ok = True
    for name in study.tables:
        if not (ref_dir / f"{name}.csv").is_file():  # a table added since the reference was published
            print(f"{name}: not in the committed reference (a new table); `make publish` adds it")
            all_ok = False
            continue
        fresh, ref = _rows(fresh_dir / f"{name}.csv"), _rows(ref_dir / f"{name}.csv")
        if "ours_low" not in next(iter(ref.values()), {"ours_low": ""}):
            print(f"{name}: the committed table has no intervals (written by an older version); not compared")
            all_ok = False
            continue
        diffs = []
        for key in ref.keys() | fresh.keys():
            if key not in fresh or key not in ref:
                diffs.append(f"  {key[0]} {key[1]}: only in the {'committed' if key in ref else 'fresh'} table")
                continue
            diffs += [f"  {key[0]} {key[1]}: {p}" for p in compare_cell(fresh[key], ref[key])]
        compared = sum(1 for k in ref if k in fresh and fresh[k]["state"] == "ok")
        print(f"{name}: " + (f"reproduced ({compared} cells within their intervals)" if not diffs else
                             f"{len(diffs)} difference(s)"))
        for line in sorted(diffs):
            print(line)
        all_ok &= not diffs
    fresh_v = {v["guideline"]: v["verdict"] for v in read_json(study.report_dir / "summary.json")["verdicts"]}
    ref_v = {v["guideline"]: v["verdict"] for v in read_json(REPORTS / profile / "summary.json")["verdicts"]}
    for g in sorted(fresh_v.keys() | ref_v.keys()):
        same = fresh_v.get(g) == ref_v.get(g)
        all_ok &= same
        print(f"guideline {g}: {fresh_v.get(g)}" + ("" if same else f" (committed: {ref_v.get(g)})"))
    print(f"\n{profile}: " + ("reproduced: every committed figure lies within the fresh intervals" if all_ok else
                              f"differs from the committed reference {REPORTS / profile} (lines above)"))
    return all_ok


def run(args: argparse.Namespace) -> None:
    if args.stage == "publish":
        publish(args.profile)
    elif not compare(args.profile) and args.strict:
        raise SystemExit(1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--strict", action="store_true", help="compare: exit 1 when the fresh report differs")
