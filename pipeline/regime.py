"""How trained the report's models are: per run, what its last epoch still changed, and which guidelines rest on
runs that were still improving when their budget ended.

A run's last-epoch change is read from its history (history.json): the relative change of the mean train loss
between the last two epochs, without the module-imitation terms (their windows close within the run, and a term
that stops is not progress), and the change of test top-1 between them (the training job measures the test set at
each of its last `eval_last` epochs: the first `data.test_limit` test images, paired between the two epochs). A
run is *still improving* when its last epoch lowered the train loss by at least `report.improving.loss_rel` or
raised test top-1 by at least `report.improving.top1` points: a comparison of such runs is a comparison at one
point of unfinished training, and its Δ may change sign with a longer budget.
"""
from __future__ import annotations

import csv
import io

import numpy as np

from pipeline.study import Study, as_list

NOT_MEASURED = "—"

# What a short budget inflates, for the report's paragraph (the study's own rows, named by their tables).
SHORT_BUDGET = (
    "A short training budget inflates whatever gives a run a head start, and shrinks what needs training to show: "
    "a trained initialisation (PL copies a trained PoolFormer's weights into the student, so PL's Δ here measures "
    "that head start more than guideline 5's +0.23 of a converged student), a teacher's signal early in training "
    "(KD and module imitation act most while the student is far from its plateau), and the gaps between "
    "architectures that converge at different speeds (the vision transformers of T5, T6 and the AdaViT rows learn "
    "slower than the convolutional ones on few images). A guideline whose deciding runs are still improving cannot "
    "be decided by this budget: its verdict is the verdict at this point of training.")


def last_epoch_change(history: list[dict]) -> dict:
    """{'loss_rel': relative change of the train loss over the last epoch, 'top1': change of test top-1 (points)};
    None where the history has fewer than two epochs (or two test passes)."""
    out = {"epochs": len(history), "loss_rel": None, "top1": None, "loss": None, "test_top1": None}
    if history:
        out["loss"] = _loss(history[-1])
        out["test_top1"] = history[-1].get("test/top1")
    if len(history) >= 2:
        a, b = _loss(history[-2]), _loss(history[-1])
        if a and b is not None:
            out["loss_rel"] = (b - a) / a
        a, b = history[-2].get("test/top1"), history[-1].get("test/top1")
        if a is not None and b is not None:
            out["top1"] = b - a
    return out


MI_TERMS = ("train/mi_in", "train/mi_out", "train/mi_rel")


def _loss(row: dict) -> float | None:
    """The epoch's mean train loss less its module-imitation terms."""
    if row.get("train/loss") is None:
        return None
    return row["train/loss"] - sum(row.get(k, 0.0) for k in MI_TERMS)


def still_improving(change: dict, opts: dict) -> bool | None:
    """True when the last epoch lowered the loss by >= loss_rel or raised top-1 by >= top1; None: not measured."""
    if change["loss_rel"] is None and change["top1"] is None:
        return None
    return bool((change["loss_rel"] is not None and -change["loss_rel"] >= opts["loss_rel"])
                or (change["top1"] is not None and change["top1"] >= opts["top1"]))


def run_regimes(study: Study, histories: dict[str, list[dict]]) -> dict[str, dict]:
    """run -> its last-epoch change and flag, for the runs with a history."""
    opts = study.settings["report"]["improving"]
    out = {}
    for run, history in histories.items():
        change = last_epoch_change(history)
        out[run] = {**change, "improving": still_improving(change, opts), "variant": study.variant_of(run)}
    return out


def guideline_regimes(study: Study, regimes: dict[str, dict], seed_runs) -> list[dict]:
    """Per guideline: its deciding (voting) runs and how many of them are still improving."""
    out = []
    for g in study.guidelines:
        variants = sorted({study.cell(ref)[3] for d in g["vote"] for ref in as_list(d.get("plus")) + as_list(
            d.get("minus")) if study.cell(ref)[3]})
        runs = [r for v in variants for r in seed_runs(v).values() if r in regimes]
        improving = [r for r in runs if regimes[r]["improving"]]
        out.append({"guideline": g["id"], "runs": len(runs), "improving": len(improving),
                    "variants": sorted({regimes[r]["variant"] for r in improving})})
    return out


def _pct(x: float | None) -> str:
    return NOT_MEASURED if x is None else f"{100 * x:+.1f}%"


def _pts(x: float | None) -> str:
    return NOT_MEASURED if x is None else f"{x:+.2f}"


def regime_csv(regimes: dict[str, dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["run", "variant", "epochs", "train_loss", "last_epoch_loss_change_rel", "test_top1_limited",
                "last_epoch_top1_change", "still_improving"])
    for run, r in regimes.items():
        w.writerow([run, r["variant"], r["epochs"], *("" if v is None else f"{v:.6g}" for v in (
            r["loss"], r["loss_rel"], r["test_top1"], r["top1"])), "" if r["improving"] is None else r["improving"]])
    return buf.getvalue()


def regime_markdown(study: Study, regimes: dict[str, dict], guidelines: list[dict]) -> str:
    """The report's section: per variant (its seeds pooled) the last epoch's change, then per guideline how many
    deciding runs are still improving, then what the short budget inflates."""
    opts = study.settings["report"]["improving"]
    test_limit = study.settings["train"]["data"].get("test_limit")
    images = f"the first {test_limit:,} test images" if test_limit else "the test set"
    lines = ["## Training regime: how trained these models are", "",
             f"Per variant, the last epoch's change in mean train loss (relative; without the module-imitation terms, "
             f"whose windows close within the run) and in test top-1 (points, on "
             f"{images}, the training job's own pass), as the median over its seeds; a run is *still improving* when "
             f"its last epoch lowered the train loss by ≥ {100 * opts['loss_rel']:g}% or raised that top-1 by ≥ "
             f"{opts['top1']:g} points (`report.improving`). Every run: `tables/regime.csv`.", "",
             "| variant | epochs | train loss | last epoch: Δ loss | last epoch: Δ top-1 | still improving |",
             "|---|---|---|---|---|---|"]
    by_variant: dict[str, list[dict]] = {}
    for r in regimes.values():
        by_variant.setdefault(r["variant"], []).append(r)
    for variant, rs in by_variant.items():
        flagged = [r["improving"] for r in rs if r["improving"] is not None]

        def med(key, rs=rs):
            vals = [r[key] for r in rs if r[key] is not None]
            return float(np.median(vals)) if vals else None
        loss = med("loss")
        lines.append(f"| {variant} | {rs[0]['epochs']} | {NOT_MEASURED if loss is None else f'{loss:.3f}'} | "
                     f"{_pct(med('loss_rel'))} | {_pts(med('top1'))} | "
                     + (f"{sum(flagged)} of {len(flagged)}" if flagged else NOT_MEASURED) + " |")
    total = [r["improving"] for r in regimes.values() if r["improving"] is not None]
    lines += ["", f"**{sum(total)} of {len(total)} runs are still improving** at the end of their budget.", "",
              "| guideline | deciding runs | still improving | their variants |", "|---|---|---|---|"]
    for g in guidelines:
        lines.append(f"| {g['guideline']} | {g['runs']} | {g['improving']} | "
                     + (", ".join(g["variants"]) or NOT_MEASURED) + " |")
    return "\n".join(lines + ["", SHORT_BUDGET, ""])
