"""`python -m pipeline <stage>`: the one entry point; each stage is one function in the package.

Snakemake rules and DVC stages call these commands and nothing else.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from pipeline.tracking import close_run

# stage name -> (module, one-line help). Each module has add_arguments(parser) and run(args).
STAGES = {
    "prepare-data": ("pipeline.prepare", "validate a dataset and write the prepared copy training reads"),
    "train": ("pipeline.train", "train a teacher or a student variant (one training loop for both)"),
    "reparameterize": ("pipeline.reparameterize", "merge the affine token mixer into the norm (deploy form)"),
    "evaluate": ("pipeline.evaluate", "test accuracy, params and MACs of a run's deploy model"),
    "export": ("pipeline.export", "every student's deploy model as ONNX, checked in ONNX Runtime and logged to MLflow"),
    "benchmark": ("pipeline.benchmark", "params, MACs and interleaved throughput of registry models"),
    "bench-train": ("pipeline.bench_train", "training images/s, FLOPs per image and share of matmul peak per model"),
    "bench-data": ("pipeline.bench_data", "files/s of prepare-data's image check, each mode, at ImageNet shape"),
    "latency-breakdown": ("pipeline.latency", "the paper's Fig. 1: ViT-B latency built up by component"),
    "sensitivity": ("pipeline.sensitivity", "T1 (identity - pooling) with its interval at several training budgets"),
    "report": ("pipeline.report", "tables beside the paper's numbers, figures, guideline verdicts"),
    "publish": ("pipeline.publish", "copy the fresh report to reports/<profile>/, the committed reference"),
    "compare": ("pipeline.compare", "does the fresh report reproduce the committed (or another) report?"),
    "session": ("pipeline.tracking", "start or end the MLflow parent run of one pipeline invocation"),
    "dvc-yaml": ("pipeline.dvcgen", "write dvc.yaml from the study definition (or --check it)"),
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a plain `kill`, Slurm's preemption) raised like Ctrl-C, so that a stage records itself KILLED and
    keeps what it finished (pipeline.tracking: run status)."""


def _terminate(signum, frame):
    # once: a second SIGTERM (Slurm signals every process of a step, a wrapper forwards what the group got too) would
    # interrupt the clean-up that records the run KILLED
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # torchrun ... -m pipeline -- train --run X: without `--`, torchrun takes --run for its own
        argv = argv[1:]
    for name, (module, help_) in STAGES.items():
        stage = sub.add_parser(name, help=help_, description=help_)
        # Only the chosen stage's module is imported, so `--help` stays fast.
        if name in argv[:1]:
            importlib.import_module(module).add_arguments(stage)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        importlib.import_module(STAGES[args.stage][0]).run(args)
    except BaseException as e:
        _end_active_runs(e)
        if not isinstance(e, KeyboardInterrupt):
            raise
        print(f"{args.stage}: stopped by {str(e) or 'SIGINT'}; finished work is kept, the same command resumes",
              file=sys.stderr, flush=True)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    return 0


def _end_active_runs(error: BaseException) -> None:
    """A safety net: an MLflow run still active when a stage ends by an exception is ended FAILED or KILLED, never
    left to MLflow's exit handler (which ends it FINISHED)."""
    mlflow = sys.modules.get("mlflow")
    for _ in range(16):  # runs nest (a stage's run under its parent); end_run pops one each time
        active = mlflow and mlflow.active_run()
        if active is None:
            return
        close_run(mlflow, active.info.run_id, error)


if __name__ == "__main__":
    sys.exit(main())
