"""`python -m pipeline evaluate --profile P`: test top-1/top-5, params and MACs of every run's deploy model. The stage
of both drivers is one job per training job (`--job J`), which re-parameterizes the job's affine students and
evaluates its runs as soon as the job has trained them, beside the training jobs still running (one thread each).
The study's throughput benchmark is a stage of its own (`python -m pipeline benchmark --profile P`).
AdaViT runs also get their fast path checked against the masked path, expected MACs averaged over the test
set (their `macs`), usage ratios and decision examples for the report (their speed-up: the benchmark stage).

The deploy model is the re-parameterized checkpoint for affine students and the trained one otherwise.
Each run's per-image predictions on the test set are saved beside its JSON (eval/<run>.predictions.npz):
the report's intervals are computed from them (pipeline.stats).
A checkpoint whose recorded inputs differ from the run's current ones (config, data, teacher or init files,
training code: pipeline.identity) is a stale result: it is an error naming what changed, never silently
mixed in.

Where: `evaluate.device` (cpu | cuda | auto) with `evaluate.workers` data workers; on either device the model runs
channels_last in strict fp32 (pipeline.measure's `fp32` policy: no TF32, no autocast), so that an accuracy does
not depend on the device's fast modes.
"""
from __future__ import annotations

import argparse

import torch

from pipeline import tracking
from pipeline.adaptive import decision_examples, evaluate_adaptive
from pipeline.data import build_loader, load_prepared, test_images
from pipeline.io import model_from_checkpoint, read_json, save_predictions, write_json
from pipeline.measure import count_macs, count_params, evaluate, precision_policy, setting_device
from pipeline.reparameterize import reparameterize_file
from pipeline.study import Study, load_study


def evaluate_run(study: Study, run: str, mlflow, device: torch.device) -> dict:
    """One run's deploy model on the test set, on `device`; `run` calls it under the fp32 policy."""
    ckpt = study.current_checkpoint(run, study.deployed_model(run))
    prepared = load_prepared(study.data_dir)
    # channels_last: faster on CPU too
    model = model_from_checkpoint(ckpt).eval().to(device, memory_format=torch.channels_last)
    img_size = ckpt.get("config", {}).get("img_size", study.settings["train"]["data"]["img_size"])
    transform = ckpt.get("config", {}).get("transform")  # image folders: the model's own eval transform
    loader = build_loader(prepared, "test", study.settings["evaluate"]["batch_size"], img_size, train=False,
                          transform_cfg=transform, workers=study.settings["evaluate"]["workers"], device=device)
    acc = evaluate(model, loader, device, fmt=torch.channels_last)
    save_predictions(study.predictions_path(run), acc["pred"], acc["label"])
    train_metrics = read_json(study.run_dir(run) / "metrics.json")
    result = {
        "run": run, "variant": study.variant_of(run), "profile": study.profile, "model": ckpt["model"],
        "model_kwargs": ckpt.get("model_kwargs", {}), "deploy_checkpoint": str(study.deployed_model(run)),
        "test_top1": acc["top1"], "test_top5": acc["top5"], "test_loss": acc["loss"],
        "params": count_params(model), "macs": count_macs(model, (prepared.meta["in_chans"], img_size, img_size)),
        "train_top1": train_metrics["test_top1"], "train_images_per_s": train_metrics["train_images_per_s"],
        "train_run_id": train_metrics["run_id"], "identity": ckpt["identity"], "data_hash": prepared.data_hash,
        "seed": study.run_config(run).seed, "tables": study.tables_of(run), "test_images": len(acc["pred"]),
        "predictions": str(study.predictions_path(run)), "device": str(device), "precision": "fp32",
    }
    if study.is_adaptive(run):  # AdaViT: both paths, and the expected MACs the paper reports
        ada = evaluate_adaptive(model, loader)
        result.update(ada, macs=ada["expected_macs"]["mean"], macs_masked_path=result["macs"])
        n = study.settings["evaluate"]["decision_examples"]
        images, labels = (t.to(device) for t in test_images(prepared, n, img_size, transform))
        write_json(study.decisions_path(run), decision_examples(model, images, labels,
                                                                model.patch_embed.patch_size[0]))
        mlflow.log_metrics({f"expected_macs/{run}": result["macs"], f"fast_path_top1/{run}": ada["fast_path"]["top1"]})
    if study.needs_reparameterize(run):
        result["reparam_max_abs_logit_diff"] = read_json(study.deploy_dir(run) / "reparam.json")[
            "max_abs_logit_diff"]
    mlflow.log_metrics({f"deploy_top1/{run}": acc["top1"], f"params/{run}": result["params"]})
    # the training run carries the deploy accuracy too, so a whole table compares in one MLflow view
    mlflow.MlflowClient().log_metric(result["train_run_id"], "deploy/test_top1", acc["top1"])
    return result


def job_runs(study: Study, job: str) -> list[str]:
    """The runs of one training job (study.train_batches), or the teachers (`teachers`)."""
    if job == "teachers":
        return study.teacher_runs
    if job not in study.train_batches:
        raise SystemExit(f"evaluate: {study.profile} has no training job {job!r}; its jobs: teachers, "
                         + ", ".join(study.train_batches))
    return study.train_batches[job]


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    study = load_study(args.profile, check_data=False)
    device = setting_device(study.settings["evaluate"]["device"], "evaluate.device")
    runs = job_runs(study, args.job) if args.job else args.run or study.runs
    results = {}
    # accuracy in strict fp32 on any device (module docstring)
    with (tracking.stage_run(study.profile, "evaluate", args.job or ",".join(args.run or ["all"])[:200]) as (mlflow, _),
          precision_policy("fp32", device)):
        for run in runs:
            if args.job and study.needs_reparameterize(run):  # the job's deploy models first, as the stage would
                d = study.deploy_dir(run)
                rep = reparameterize_file(study.model_path(run), study.data_dir, d / "model.pt", d / "reparam.json")
                mlflow.log_metric(f"max_abs_logit_diff/{run}", rep["max_abs_logit_diff"])
            results[run] = evaluate_run(study, run, mlflow, device)
            write_json(study.eval_path(run), results[run])
            print(f"[{run}] deploy test top-1 {results[run]['test_top1']:.2f} top-5 {results[run]['test_top5']:.2f}, "
                  f"{results[run]['params']:,} params, {results[run]['macs'] / 1e6:.1f} M MACs", flush=True)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run", nargs="+", help="evaluate only these runs (their deploy models must exist)")
    which.add_argument("--job", help="one training job's runs (study.train_batches, or `teachers`), re-parameterizing "
                                     "its affine students first: the stage of both drivers")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
