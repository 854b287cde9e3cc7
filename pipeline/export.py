"""`python -m pipeline export --profile P [--seed S]`: every MetaFormer student's deploy model as ONNX, checked
in ONNX Runtime. One job per seed (they run in parallel: no timing here, one thread each).

For each student run (AdaViT excepted: its per-input token skipping is not one static graph) the deploy model
that `evaluate` reads is exported with a dynamic batch axis (results/<profile>/export/<run>/model.onnx), run in
ONNX Runtime on the first `export.num_images` test images and compared with torch: a max |logit difference|
over `export.tolerance` is an error, not a result. ONNX Runtime's throughput is measured in `evaluate`'s
interleaved benchmark, where T6's PoolFormer and RIFormer deploy models run in both runtimes.

MLflow: each ONNX model is logged as an MLflow model (flavour onnx) with its signature (images -> logits),
under its job's run; the study's best student (the variant with the highest mean deploy top-1 over its
seeds, its first seed's model) is registered by the first seed's job as `riformer-<profile>-deploy` and given
the alias `best`.
"""
from __future__ import annotations

import argparse
import statistics

import onnx
import onnxruntime
import torch
from mlflow.models import infer_signature
from tqdm import tqdm

from pipeline import tracking
from pipeline.data import load_prepared, test_images
from pipeline.io import model_from_checkpoint, read_json, write_json
from pipeline.measure import OrtModel, export_onnx, max_logit_difference, ort_session
from pipeline.study import load_study

ALIAS = "best"


def best_variant(study, runs: list[str]) -> str:
    """The exported variant with the highest mean deploy top-1 over its seeds (its first seed's run); a run under
    another reading of an open point (`<variant>--<reading>`) is a comparison, not a candidate."""
    by_variant: dict[str, list[float]] = {}
    for run in (r for r in runs if study.variant_of(r) not in study.reading_runs):
        by_variant.setdefault(study.variant_of(run), []).append(read_json(study.eval_path(run))["test_top1"])
    return max(by_variant, key=lambda v: statistics.mean(by_variant[v]))


def export_study(study, seed: int, threads: int, progress: bool = True) -> dict:
    """Export, check and log the students of one seed (a job of its own: the seeds' jobs run in parallel); the
    first seed's job also registers the best student."""
    s = study.settings["export"]
    if seed not in study.settings["seeds"]:
        raise ValueError(f"export: seed {seed} is not one of profile {study.profile}'s seeds {study.settings['seeds']}")
    images = test_images(load_prepared(study.data_dir), s["num_images"],
                         study.settings["train"]["data"]["img_size"])[0].contiguous()
    runs = [r for r in study.export_runs if study.run_specs[r][2] == seed]
    results: dict = {"seed": seed, "runs": {}, "tolerance": s["tolerance"], "opset": s["opset"]}
    with tracking.stage_run(study.profile, "export", f"seed{seed}") as (mlflow, _):
        requirements = [f"onnxruntime=={onnxruntime.__version__}"]
        for run in tqdm(runs, desc="export", disable=not progress):
            results["runs"][run] = export_run(study, run, images, threads, mlflow, requirements)
        if seed == study.settings["seeds"][0]:
            results["registered"] = register_best(study, results["runs"], mlflow)
        write_json(study.export_summary_path(seed), results)
    print_summary(results)
    return results


def export_run(study, run: str, images: torch.Tensor, threads: int, mlflow, requirements: list[str]) -> dict:
    """One run's deploy model as ONNX, checked against torch on `images` and logged as an MLflow model."""
    s = study.settings["export"]
    model = model_from_checkpoint(study.current_checkpoint(run, study.deployed_model(run))).eval()
    path = study.export_dir(run) / "model.onnx"
    export_onnx(model, images[:2], path, s["opset"])
    check = max_logit_difference(model, OrtModel(ort_session(path, threads)), [(images, None)])
    if check["max_abs_logit_diff"] > s["tolerance"]:
        raise RuntimeError(f"{path}: ONNX Runtime's logits differ from torch's by "
                           f"{check['max_abs_logit_diff']:.3g} > export.tolerance {s['tolerance']}")
    with torch.no_grad():
        signature = infer_signature(images[:2].numpy(), model(images[:2]).numpy())
    info = mlflow.onnx.log_model(onnx.load(str(path)), name=run, signature=signature,
                                 pip_requirements=requirements, tags={"study_run": run})
    check.update(onnx=str(path), bytes=path.stat().st_size, model_uri=info.model_uri)
    write_json(study.export_dir(run) / "export.json", check)
    mlflow.log_metric(f"onnx_max_abs_logit_diff/{run}", check["max_abs_logit_diff"])
    return check


def register_best(study, checks: dict[str, dict], mlflow) -> dict:
    """Register the study's best student (its first seed's ONNX model, logged by this job) and alias it `best`."""
    best = best_variant(study, study.export_runs)
    name = f"{tracking.experiment_name(study.profile)}-deploy"
    version = mlflow.register_model(checks[best]["model_uri"], name)
    mlflow.MlflowClient().set_registered_model_alias(name, ALIAS, version.version)
    return {"name": name, "version": int(version.version), "alias": ALIAS, "run": best}


def print_summary(results: dict) -> None:
    worst = max(results["runs"].values(), key=lambda r: r["max_abs_logit_diff"])
    print(f"{len(results['runs'])} deploy models exported; worst ONNX Runtime max |logit diff| "
          f"{worst['max_abs_logit_diff']:.2e} (tolerance {results['tolerance']})")
    if "registered" in results:
        reg = results["registered"]
        print(f"registered {reg['name']} version {reg['version']} (alias {reg['alias']!r}): {reg['run']}")


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    study = load_study(args.profile)
    seeds = study.settings["seeds"] if args.seed is None else [args.seed]
    return {seed: export_study(study, seed, args.threads, progress=not args.no_progress) for seed in seeds}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    p.add_argument("--seed", type=int, help="export the students of this seed only (default: every seed, in turn)")
    p.add_argument("--no-progress", action="store_true")
