"""`python -m pipeline reparameterize`: training checkpoint -> deploy checkpoint + equivalence JSON.

The merge itself is `timm.utils.reparameterize_model` (RIFormerBlock.reparameterize, riformer.md Sec. 1).
The deploy checkpoint describes the identity-mixer model with its first layer scale folded into the norm
(`token_mixer='identity', fold_layer_scale=True`), whose keys are PoolFormer's less `layer_scale1`, and the JSON
records the max |logit difference| between the two forms on real test images.
"""
from __future__ import annotations

import argparse

import timm
import torch

from pipeline import tracking
from pipeline.data import load_prepared, test_images
from pipeline.identity import check_model_file
from pipeline.io import load_checkpoint, model_from_checkpoint, save_checkpoint, write_json
from pipeline.measure import count_params, max_logit_difference
from pipeline.study import load_study


def reparameterize_checkpoint(ckpt: dict) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(training model, deploy model, deploy checkpoint) for a training checkpoint."""
    model = model_from_checkpoint(ckpt)
    deploy = timm.utils.reparameterize_model(model)
    kwargs = dict(ckpt.get("model_kwargs", {}))
    if ckpt["model"].startswith("riformer") and kwargs.get("token_mixer", "affine") in ("affine", "identity"):
        # the deploy form: the affine and the first layer scale are merged into the norm
        kwargs.update(token_mixer="identity", fold_layer_scale=True)
    deploy_ckpt = {k: v for k, v in ckpt.items() if k in ("config", "identity")}
    deploy_ckpt.update(model=ckpt["model"], model_kwargs=kwargs, state_dict=deploy.state_dict())
    # The deploy state dict must load into the identity-mixer model: check it here, not at evaluation time.
    model_from_checkpoint(deploy_ckpt)
    return model, deploy, deploy_ckpt


def reparameterize_file(checkpoint, data, out, report, num_images=256, batch_size=128, img_size=32,
                        tolerance=1e-4) -> dict:
    check_model_file(checkpoint, "trained model")
    ckpt = load_checkpoint(checkpoint)
    model, deploy, deploy_ckpt = reparameterize_checkpoint(ckpt)
    prepared = load_prepared(data)
    img_size = ckpt.get("config", {}).get("img_size", img_size)
    images = test_images(prepared, num_images, img_size, ckpt.get("config", {}).get("transform"))[0]
    result = max_logit_difference(model, deploy, [(batch, None) for batch in images.split(batch_size)])
    result.update(checkpoint=str(checkpoint), model=ckpt["model"], params_train=count_params(model),
                  params_deploy=count_params(deploy), data_hash=prepared.data_hash,
                  affine_modules_left=sum(type(m).__name__ == "Affine" for m in deploy.modules()))
    if result["max_abs_logit_diff"] > tolerance:
        raise RuntimeError(f"{checkpoint}: re-parameterization changed the logits by "
                           f"{result['max_abs_logit_diff']:.3g} > tolerance {tolerance}")
    save_checkpoint(out, deploy_ckpt)
    write_json(report, result)
    print(f"{ckpt['model']}: params {result['params_train']:,} -> {result['params_deploy']:,}, max |logit diff| "
          f"{result['max_abs_logit_diff']:.2e} on {result['num_images']} test images -> {out}")
    return result


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    opts = dict(num_images=args.num_images, batch_size=args.batch_size, img_size=args.img_size,
                tolerance=args.tolerance)
    if args.checkpoint:
        if not (args.data and args.out and args.report):
            raise SystemExit("reparameterize: --checkpoint needs --data, --out and --report")
        return reparameterize_file(args.checkpoint, args.data, args.out, args.report, **opts)
    study = load_study(args.profile, check_data=False)
    runs = [args.run] if args.run else [r for r in study.runs if study.needs_reparameterize(r)]
    results = {}
    with tracking.stage_run(args.profile, "reparameterize", args.run or "all") as (mlflow, _):
        for run in runs:
            d = study.deploy_dir(run)
            results[run] = reparameterize_file(study.model_path(run), study.data_dir, d / "model.pt",
                                               d / "reparam.json", **opts)
            mlflow.log_metric(f"max_abs_logit_diff/{run}", results[run]["max_abs_logit_diff"])
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default")
    p.add_argument("--run", help="one run of the study (default: every affine student of the profile)")
    p.add_argument("--checkpoint", help="training checkpoint (python -m pipeline train)")
    p.add_argument("--data", help="prepared dataset folder; its test split is the input")
    p.add_argument("--num-images", type=int, default=256, help="test images the two forms are compared on")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=32, help="used when the checkpoint's config has none")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |logit difference| (fp32)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", help="deploy checkpoint to write")
    p.add_argument("--report", help="JSON with the measured difference")
