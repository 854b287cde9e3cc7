"""`python -m pipeline publish`: make a fresh report the committed reference of its profile.

The report stage writes results/<profile>/report/, never the committed reports/<profile>/: a fresh clone
therefore runs the whole study instead of finding its targets present. `publish` copies a fresh report to
reports/<profile>/ (refusing one with stale results); `python -m pipeline compare` (pipeline.compare) checks a
fresh report against it.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from pipeline.io import read_json
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


def run(args: argparse.Namespace) -> None:
    publish(args.profile)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
