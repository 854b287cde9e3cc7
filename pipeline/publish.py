"""`python -m pipeline publish`: make a fresh report the committed reference of its profile.

The report stage writes results/<profile>/report/, never the committed reports/<profile>/: a fresh clone
therefore runs the whole study instead of finding its targets present. `publish` copies a fresh report to
reports/<profile>/ (refusing one with stale results); `python -m pipeline compare` (pipeline.compare) checks a
fresh report against it.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pipeline.io import atomic_dir, read_json
from pipeline.study import load_study

REPORTS = Path("reports")


def publish(profile: str, allow_missing: bool = False) -> Path:
    study = load_study(profile, check_data=False)
    fresh, target = study.report_dir, REPORTS / profile
    if not (fresh / "summary.json").is_file():
        raise SystemExit(f"publish: no report in {fresh}; run the study first (`make repro`)")
    summary = read_json(fresh / "summary.json")
    if summary["stale"]:
        raise SystemExit(f"publish: {fresh} shows stale runs ({', '.join(summary['stale'])}); rerun the study")
    if summary.get("incomplete") and not allow_missing:
        raise SystemExit(f"publish: {fresh} was written without {len(summary['incomplete'])} runs' evaluations "
                         f"({', '.join(summary['incomplete'][:8])}); rerun the study, or pass --allow-missing")
    if summary["missing"]:
        print(f"publish: note, {len(summary['missing'])} cells have no result: {', '.join(summary['missing'])}")
    leftovers = [str(p.relative_to(fresh)) for p in fresh.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    if leftovers or not (fresh / "README.md").is_file():
        raise SystemExit(f"publish: {fresh} is not a whole report (README.md missing, or temporary files: "
                         f"{', '.join(leftovers[:5])}); run `python -m pipeline report --profile {profile}` again")
    with atomic_dir(target) as staging:  # a killed publish leaves the old reference or the new one
        shutil.copytree(fresh, staging, dirs_exist_ok=True)
    print(f"published {fresh} -> {target}")
    return target


def run(args: argparse.Namespace) -> None:
    publish(args.profile, args.allow_missing)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--allow-missing", action="store_true", help="publish a report written without some runs")
