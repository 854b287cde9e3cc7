"""`python -m pipeline sensitivity`: can the default study see T1, and at what training budget?

T1 is the paper's largest effect: removing the token mixer (identity - pooling, labels only) costs 2.7 points of
top-1 on ImageNet. For each configuration (training images x epochs over the profile), this trains T1's two
variants, `pooling-ce` and `identity-ce`, at every seed, two 1-thread jobs at a time as `make repro` runs them,
evaluates each on the whole test split and reports the T1 difference with the report's interval (paired by seed
and by test image, pipeline.stats) and the wall time of those runs. Everything is written under
results/sensitivity/<profile>/<configuration>/ (its own prepared data, runs and result.json), so the study's
results are never touched; a configuration already done is read back, not retrained.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.data import build_loader, load_prepared
from pipeline.io import load_checkpoint, model_from_checkpoint, read_json, write_json
from pipeline.measure import evaluate
from pipeline.prepare import prepare
from pipeline.stats import mean_interval, paired_table
from pipeline.study import load_study
from pipeline.train import train

VARIANTS = ("pooling-ce", "identity-ce")


def _train(args: tuple) -> float:
    profile, overrides, results, run = args
    study = load_study(profile, check_data=False, overrides=overrides)
    study.results = results
    start = time.perf_counter()
    train(study.run_config(run, threads=1), study.run_dir(run), experiment=f"sensitivity-{profile}", progress=False)
    return time.perf_counter() - start


def _correct(study, run: str):
    ckpt = load_checkpoint(study.model_path(run))
    loader = build_loader(load_prepared(study.data_dir), "test", 500, ckpt["config"]["img_size"], train=False)
    model = model_from_checkpoint(ckpt).to(memory_format=torch.channels_last)  # as the evaluate stage
    acc = evaluate(model, loader, torch.device("cpu"), fmt=torch.channels_last)
    return (acc["pred"] == acc["label"]).numpy().astype(float)


def configuration(profile: str, name: str, train_images: int, epochs: int, seeds: list[int], jobs: int = 2) -> dict:
    results = Path("results") / "sensitivity" / profile / name
    if (results / "result.json").exists():
        return read_json(results / "result.json")
    overrides = {"data": {"train_subset": train_images}, "train": {"optim": {"epochs": epochs}}, "seeds": seeds}
    study = load_study(profile, check_data=False, overrides=overrides)
    study.results = results
    start = time.perf_counter()
    if not study.data_dir.exists():
        d = study.settings["data"]
        prepare(d["source"], study.data_dir, raw_dir=d["raw_dir"], root=d["root"], train_subset=train_images,
                test_subset=d["test_subset"], seed=d["seed"])
    runs = [study.seed_name(v, s) for s in seeds for v in VARIANTS]
    tracking.setup(f"sensitivity-{profile}")  # the store and experiment exist before parallel jobs log to them
    with ProcessPoolExecutor(jobs) as pool:
        train_s = dict(zip(runs, pool.map(_train, [(profile, overrides, results, r) for r in runs]), strict=True))
    torch.set_num_threads(jobs)
    correct = {v: {s: _correct(study, study.seed_name(v, s)) for s in seeds} for v in VARIANTS}
    t1 = mean_interval(paired_table([correct["identity-ce"]], [correct["pooling-ce"]])).scaled(100)
    result = {"configuration": name, "train_images": train_images, "epochs": epochs, "seeds": seeds,
              "t1": {"mean": t1.mean, "low": t1.low, "high": t1.high, "mde": t1.mde, "method": t1.method},
              "top1": {v: {str(s): 100 * c.mean() for s, c in correct[v].items()} for v in VARIANTS},
              "train_s": train_s, "wall_s": time.perf_counter() - start}
    write_json(results / "result.json", result)
    return result


def run(args: argparse.Namespace) -> list[dict]:
    out = []
    for spec in args.configs:
        images, epochs = (int(x) for x in spec.split("x"))
        r = configuration(args.profile, spec, images, epochs, args.seeds, args.jobs)
        t1 = r["t1"]
        side = "excludes 0 (paper's side)" if t1["high"] < 0 else "excludes 0 (other side)" if t1["low"] > 0 else \
            "includes 0"
        print(f"{spec:>10}: T1 identity - pooling {t1['mean']:+.2f} [{t1['low']:+.2f}, {t1['high']:+.2f}] "
              f"(MDE {t1['mde']:.2f}; {side}); T1 runs {r['wall_s'] / 60:.1f} min of wall time", flush=True)
        out.append(r)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--configs", nargs="+", default=["1200x4"], metavar="IMAGESxEPOCHS",
                   help="training images x student epochs, e.g. 1200x4 2400x4 1200x8")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="training jobs at a time (1 thread each)")
