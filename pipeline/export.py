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
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.benchmark import ORT
from pipeline.data import build_loader, load_prepared
from pipeline.io import atomic_path, model_from_checkpoint, read_json, write_json
from pipeline.reparameterize import max_logit_difference

ALIAS = "best"


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> None:
    """The model as ONNX (input `images`, output `logits`, dynamic batch), written atomically. The TorchScript
    exporter (deprecated in torch 2.15, which warns that it will be removed): ~0.3-0.5 s for a nano model against
    ~9 s for the dynamo exporter, 81 models per default study. Both give logits within 1e-7 of torch's here."""
    model.eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # group_norm's "batch of one" check is a Python branch: traced as the constant it is for the example
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's: see the docstring
        torch.onnx.export(model, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def ort_session(path: str | Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # ONNX Runtime's pool threads spin after each call by default: in an interleaved benchmark they would take the
    # CPU from the model timed next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModel(torch.nn.Module):
    """An ONNX Runtime session behind a torch module's call, so pipeline.benchmark times it like the others."""

    def __init__(self, session):
        super().__init__()
        self.session, self.input = session, session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input: images.numpy()})[0])


def onnx_pair(models: dict[str, torch.nn.Module], example: torch.Tensor, folder: Path,
              threads: int) -> dict[str, torch.nn.Module]:
    """Each torch model beside its ONNX Runtime twin (`name [onnxruntime]`), exported into `folder`."""
    out = {}
    for i, (name, model) in enumerate(models.items()):
        path = folder / f"model{i}.onnx"
        export_onnx(model, example, path)
        out[name], out[name + ORT] = model, OrtModel(ort_session(path, threads))
    return out


def best_variant(study, runs: list[str]) -> str:
    """The exported variant with the highest mean deploy top-1 over its seeds (its first seed's run)."""
    by_variant: dict[str, list[float]] = {}
    for run in runs:
        by_variant.setdefault(study.variant_of(run), []).append(read_json(study.eval_path(run))["test_top1"])
    return max(by_variant, key=lambda v: statistics.mean(by_variant[v]))


def export_study(study, seed: int, threads: int, progress: bool = True) -> dict:
    """Export, check and log the students of one seed (a job of its own: the seeds' jobs run in parallel); the
    first seed's job also registers the best student."""
    from mlflow.models import infer_signature

    from pipeline import tracking
    from pipeline.evaluate import checked_checkpoint

    s = study.settings["export"]
    prepared = load_prepared(study.data_dir)
    img = study.settings["train"]["data"]["img_size"]
    images = next(iter(build_loader(prepared, "test", s["num_images"], img, train=False)))[0].contiguous()
    if seed not in study.settings["seeds"]:
        raise ValueError(f"export: seed {seed} is not one of profile {study.profile}'s seeds {study.settings['seeds']}")
    runs = [r for r in study.export_runs if study.run_specs[r][2] == seed]
    results: dict = {"seed": seed, "runs": {}, "tolerance": s["tolerance"], "opset": s["opset"]}
    with tracking.stage_run(study.profile, "export", f"seed{seed}") as (mlflow, _):
        import onnx
        import onnxruntime

        requirements = [f"onnxruntime=={onnxruntime.__version__}"]
        for run in tqdm(runs, desc="export", disable=not progress):
            model = model_from_checkpoint(checked_checkpoint(study, run, study.deployed_model(run))).eval()
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
            results["runs"][run] = check

        if seed == study.settings["seeds"][0]:
            best = best_variant(study, study.export_runs)  # its first seed's run is this job's
            name = f"{tracking.experiment_name(study.profile)}-deploy"
            version = mlflow.register_model(results["runs"][best]["model_uri"], name)
            mlflow.MlflowClient().set_registered_model_alias(name, ALIAS, version.version)
            results["registered"] = {"name": name, "version": int(version.version), "alias": ALIAS, "run": best}
        write_json(study.export_summary_path(seed), results)
    print_summary(results)
    return results


def print_summary(results: dict) -> None:
    worst = max(results["runs"].values(), key=lambda r: r["max_abs_logit_diff"])
    print(f"{len(results['runs'])} deploy models exported; worst ONNX Runtime max |logit diff| "
          f"{worst['max_abs_logit_diff']:.2e} (tolerance {results['tolerance']})")
    if "registered" in results:
        reg = results["registered"]
        print(f"registered {reg['name']} version {reg['version']} (alias {reg['alias']!r}): {reg['run']}")


def run(args: argparse.Namespace) -> dict:
    from pipeline.study import load_study

    torch.set_num_threads(args.threads)
    study = load_study(args.profile)
    seeds = study.settings["seeds"] if args.seed is None else [args.seed]
    return {seed: export_study(study, seed, args.threads, progress=not args.no_progress) for seed in seeds}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    p.add_argument("--seed", type=int, help="export the students of this seed only (default: every seed, in turn)")
    p.add_argument("--no-progress", action="store_true")
