"""The report's figures (matplotlib + seaborn, one style). Saved as PNG and PDF with fixed metadata so that a
rerun that changes nothing writes byte-identical files."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from pipeline.io import atomic_path, read_json  # noqa: E402
from pipeline.models.adavit import fast_path_label  # noqa: E402
from pipeline.study import FIGURES  # noqa: E402

OURS, PAPER = "#1f77b4", "#ff7f0e"
F1_STEPS = ["embedding", "+layernorm1", "+attention", "+residual1", "+layernorm2", "+mlp", "+residual2"]


def _style() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=0.9)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "pdf.fonttype": 42, "svg.hashsalt": "riformer"})


def save(fig, folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for ext, meta in (("png", {"Software": None}),
                      ("pdf", {"Creator": None, "Producer": None, "CreationDate": None})):
        with atomic_path(folder / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, metadata=meta, bbox_inches="tight")
    plt.close(fig)
    return name


def make_all(study, results, tables, paper, folder: Path) -> list[str]:
    """Every figure of pipeline.study.FIGURES; one whose results are missing says so instead of failing."""
    _style()
    figs = [accuracy_throughput(study, results, paper, folder), ablation_bars(tables, folder),
            training_curves(study, results, folder), latency(results.latency, paper, folder),
            reparam_errors(study, folder), adavit_decisions(study, folder)]
    assert figs == FIGURES, figs
    return figs


def placeholder(folder: Path, name: str, what: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{what}: no results yet", ha="center", va="center")
    return save(fig, folder, name)


def accuracy_throughput(study, results, paper, folder: Path) -> str:
    """Our accuracy against measured throughput for every evaluated variant (95% intervals on both axes: seeds and
    test images, interleaved rounds), beside the paper's T6."""
    bench = results.benchmark
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 4.2))
    points = {}
    if bench:
        for variant in [*study.teachers, *study.variants]:
            top1, speed = results.cell(variant, "top1"), results.cell(variant, "throughput")
            if top1.ok and speed.ok:
                points[variant] = (speed.value, top1.value)
        for variant, (x, y) in points.items():
            kind = _family(study.run_config(variant).model, study.run_config(variant).model_kwargs)
            ax.errorbar(x.mean, y.mean, xerr=_err(x), yerr=_err(y), fmt="o", ms=3.5, color=_FAMILY_COLORS[kind],
                        elinewidth=0.6, capsize=1.5, label=kind, zorder=3)
        _pair_arrows(ax, {v: (x.mean, y.mean) for v, (x, y) in points.items()}, study)
        for variant, (x, y) in points.items():  # AdaViT: an arrow from its masked path to its fast path
            fast = results.cell(variant, "throughput_fast")
            if fast.ok:
                ax.errorbar(fast.value.mean, y.mean, xerr=_err(fast.value), fmt="D", ms=3.5,
                            color=_FAMILY_COLORS["AdaViT"], elinewidth=0.6, capsize=1.5, zorder=3)
                ax.annotate("", (fast.value.mean, y.mean), (x.mean, y.mean),
                            arrowprops={"arrowstyle": "->", "color": "0.4", "lw": 0.8})
                ax.annotate(fast_path_label(variant), (fast.value.mean, y.mean), fontsize=5, xytext=(2, 2),
                            textcoords="offset points")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    ax.set(xlabel=f"throughput (img/s, {bench['device_name'] if bench else 'not measured'})", ylabel="test top-1 (%)",
           title=f"ours ({study.profile}), 95% intervals")
    sizes = ["s12", "s24", "s36", "m36", "m48"]
    for s in sizes:
        p = (paper.get(("T6", f"poolformer_{s}", "throughput")), paper.get(("T6", f"poolformer_{s}", "top1")))
        r = (paper.get(("T6", f"riformer_{s}", "throughput")), paper.get(("T6", f"riformer_{s}", "top1")))
        if None not in p + r:
            axp.annotate("", xy=r, xytext=p, arrowprops={"arrowstyle": "->", "color": "0.4"})
            axp.scatter(*p, color=_FAMILY_COLORS["PoolFormer"], s=18, label="PoolFormer", zorder=3)
            axp.scatter(*r, color=_FAMILY_COLORS["RIFormer"], s=18, label="RIFormer", zorder=3)
            axp.annotate(s.upper(), r, fontsize=6, xytext=(3, 3), textcoords="offset points")
    for g in ("gfnet_h_ti", "gfnet_h_s", "gfnet_b", "gfnet_h_b"):
        x, y = paper.get(("T6", g, "throughput")), paper.get(("T6", g, "top1"))
        if x and y:
            axp.scatter(x, y, color=_FAMILY_COLORS["GFNet"], s=18, label="GFNet", zorder=3)
    handles, labels = axp.get_legend_handles_labels()
    axp.legend(dict(zip(labels, handles, strict=True)).values(), dict(zip(labels, handles, strict=True)).keys(),
               fontsize=7, loc="lower right")
    axp.set(xlabel="throughput (img/s, A100)", ylabel="ImageNet top-1 (%)", title="paper (Table 6)")
    return save(fig, folder, "accuracy_vs_throughput")


_FAMILY_COLORS = {"RIFormer": OURS, "PoolFormer": PAPER, "identity": "#2ca02c", "GFNet": "#9467bd",
                  "LightViT": "#8c564b", "AdaViT": "#e377c2", "DeiT": "#7f7f7f", "other": "#17becf"}


def _family(model: str, kwargs: dict) -> str:
    if model.startswith(("riformer", "poolformer")):
        mixer = kwargs.get("token_mixer", "pooling" if model.startswith("poolformer") else "affine")
        return {"pooling": "PoolFormer", "identity": "identity", "affine": "RIFormer"}[mixer]
    for prefix, fam in (("gfnet", "GFNet"), ("lightvit", "LightViT"), ("ada_", "AdaViT"), ("deit", "DeiT")):
        if model.startswith(prefix):
            return fam
    return "other"


def _err(iv) -> list[list[float]]:
    """An interval as matplotlib's asymmetric error: [[below], [above]]."""
    return [[iv.mean - iv.low], [iv.high - iv.mean]]


def _pair_arrows(ax, points: dict, study) -> None:
    """PoolFormer -> RIFormer of the same shape: T8's PoolFormer row to its RIFormer row."""
    t8 = {r["row"]: r["run"] for r in study.tables.get("T8", {}).get("rows", [])}
    src, dst = t8.get("poolformer_s12"), t8.get("riformer_s12")
    if src in points and dst in points:
        ax.annotate("", xy=points[dst], xytext=points[src], arrowprops={"arrowstyle": "->", "color": "0.4"})
    for run, (x, y) in points.items():
        ax.annotate(run, (x, y), fontsize=5, xytext=(2, 2), textcoords="offset points", color="0.3")


def ablation_bars(tables, folder: Path) -> str:
    """One panel per ablation table: the change from the reference row, ours beside the paper's."""
    names = [t for t in ("T1", "T2", "T3", "T4", "T5", "PL", "T7", "T8", "T9") if t in tables]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(14, 3.4 * math.ceil(len(names) / cols)))
    for ax, name in zip(axes.flat, names, strict=False):
        rows = [r for r in tables[name] if r.metric != "throughput" and r.metric != "teacher_top1"]
        labels = [f"{r.row}" + (f"\n{r.metric}" if r.metric not in ("top1",) else "") for r in rows]
        xs = range(len(rows))
        deltas = [r.ours_delta for r in rows]
        ours = [d.mean if d else 0 for d in deltas]
        errors = [[d.mean - d.low if d else 0 for d in deltas], [d.high - d.mean if d else 0 for d in deltas]]
        papers = [r.paper_delta if r.paper_delta is not None else 0 for r in rows]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, color=OURS, label="ours (95% interval)", yerr=errors,
               error_kw={"elinewidth": 0.7, "capsize": 1.5})
        ax.bar([x + 0.2 for x in xs], papers, 0.4, color=PAPER, label="paper")
        for x, r in zip(xs, rows, strict=True):
            if r.ours_delta is None:
                ax.annotate("missing", (x - 0.2, 0), fontsize=5, rotation=90, ha="center", va="bottom")
        ax.axhline(0, color="0.2", lw=0.6)
        ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=5)
        ax.set_title(f"{name}: Δ top-1 vs reference (points, 95% interval)", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, folder, "ablation_deltas")


def training_curves(study, results, folder: Path) -> str:
    """Training top-1 (test top-1 where training measured it) and each loss term against the epoch, for the
    module-imitation runs of the first seed."""
    runs = [v for v in study.variants
            if study.run_config(v).mi.teacher and (study.run_dir(v) / "history.json").exists()]
    if not runs:
        return placeholder(folder, "training_curves", "training curves of the module-imitation runs")
    terms = ["train/ce", "train/kd_soft", "train/kd_hard", "train/mi_in", "train/mi_out", "train/mi_rel"]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    palette = sns.color_palette("tab20", len(runs))
    for color, run in zip(palette, runs, strict=True):
        hist = read_json(study.run_dir(run) / "history.json")
        epochs = [h["epoch"] for h in hist]
        ax_acc.plot(epochs, [h["train/top1"] for h in hist], color=color, label=run, marker=".")
        tested = [(h["epoch"], h["test/top1"]) for h in hist if "test/top1" in h]
        ax_acc.scatter([e for e, _ in tested], [t for _, t in tested], color=color, marker="x", zorder=3)
        for style, term in zip(["-", "--", "-.", ":", (0, (1, 1)), (0, (3, 1, 1, 1))], terms, strict=True):
            values = [h.get(term, float("nan")) for h in hist]  # a term outside its window is not drawn
            if any(v == v for v in values):
                ax_loss.plot(epochs, values, color=color, linestyle=style, lw=1)
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="module-imitation runs, first seed: training (line), test (x)")
    ax_acc.legend(fontsize=6)
    ax_loss.set(xlabel="epoch", ylabel="loss term (epoch mean, weighted)", yscale="log",
                title="loss terms: - CE, -- KD soft, -. KD hard, : MI in, ... MI out, -.. MI rel")
    fig.tight_layout()
    return save(fig, folder, "training_curves")


def latency_table(lat: dict | None, paper: dict) -> str:
    lines = ["| step | ours cumulative ms | paper cumulative ms (A100, batch 2048) |", "|---|---|---|"]
    ours = {s["step"]: s for s in lat["steps"]} if lat else {}
    for step in F1_STEPS:
        o = ours.get(step)
        p = paper.get(("F1", step, "cumulative_ms"))
        lines.append(f"| {step} | {o['cumulative_ms']:.1f} [{o['min_ms']:.1f}, {o['max_ms']:.1f}] |" if o else
                     f"| {step} | — |")
        lines[-1] += f" {p:.2f} |" if p is not None else " — |"
    if lat:
        share = lat["token_mixer_share"]
        p_att = paper.get(("F1", "+attention", "cumulative_ms"))
        p_ln = paper.get(("F1", "+layernorm1", "cumulative_ms"))
        p_tot = paper.get(("F1", "+residual2", "cumulative_ms"))
        paper_share = (p_att - p_ln) / p_tot if None not in (p_att, p_ln, p_tot) else None
        lines += ["", f"Token mixer share: ours {100 * share['median']:.1f}% [{100 * share['min']:.1f}, "
                  f"{100 * share['max']:.1f}] on {lat['device_name']} (batch {lat['batch_size']}, "
                  f"{lat['img_size']} px); paper " + (f"{100 * paper_share:.1f}%" if paper_share else "—") + "."]
    return "\n".join(lines) + "\n"


def latency(lat: dict | None, paper: dict, folder: Path) -> str:
    if not lat:
        return placeholder(folder, "latency_breakdown", "latency breakdown")
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(11, 3.6))
    ours = [next(s["cumulative_ms"] for s in lat["steps"] if s["step"] == step) for step in F1_STEPS]
    pap = [paper.get(("F1", step, "cumulative_ms"), 0.0) for step in F1_STEPS]
    colors = ["#d62728" if s == "+attention" else OURS for s in F1_STEPS]
    ax.bar(F1_STEPS, ours, color=colors)
    axp.bar(F1_STEPS, pap, color=["#d62728" if s == "+attention" else PAPER for s in F1_STEPS])
    share = lat["token_mixer_share"]["median"]
    ax.set(ylabel="cumulative latency (ms)",
           title=f"ours: {lat['device_name']}, batch {lat['batch_size']} — mixer {100 * share:.1f}%")
    p_share = (pap[2] - pap[1]) / pap[-1] if pap[-1] else float("nan")
    axp.set(ylabel="cumulative latency (ms)", title=f"paper: A100, batch 2048 — mixer {100 * p_share:.1f}%")
    for a in (ax, axp):
        a.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    return save(fig, folder, "latency_breakdown")


def reparam_errors(study, folder: Path) -> str:
    rows = []
    for run in study.runs:
        path = study.deploy_dir(run) / "reparam.json"
        if study.needs_reparameterize(run) and path.exists():
            rows.append((run, max(read_json(path)["max_abs_logit_diff"], 1e-12)))
    if not rows:
        return placeholder(folder, "reparameterization_error", "re-parameterization error")
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(rows) + 1.2))
    ax.barh([r for r, _ in rows], [d for _, d in rows], color=OURS)
    ax.axvline(1e-4, color="#d62728", lw=1, ls="--", label="tolerance 1e-4")
    ax.set(xscale="log", xlabel="max |logit difference|, training vs deploy form (fp32, test images)")
    ax.tick_params(axis="y", labelsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, folder, "reparameterization_error")


def adavit_decisions(study, folder: Path) -> str:
    """AdaViT: which patches each block kept on a few test images (dropped patches shaded red); a block whose
    attention and MLP were both gated off is marked 'skipped'."""
    runs = [r for r in study.runs if study.is_adaptive(r) and study.decisions_path(r).exists()]
    if not runs:
        return placeholder(folder, "adavit_decisions", "AdaViT decisions")
    d = read_json(study.decisions_path(runs[0]))
    images, patch, block = np.array(d["images"]), np.array(d["patch"]), np.array(d["block"])
    (gh, gw), p = d["grid"], d["patch_size"]
    n, depth = patch.shape[:2]
    dropped_cmap = matplotlib.colors.ListedColormap([(0, 0, 0, 0), (0.85, 0.1, 0.1, 0.55)])
    fig, axes = plt.subplots(n, depth + 1, figsize=(1.25 * (depth + 1), 1.3 * n), squeeze=False)
    for i in range(n):
        img = images[i]
        axes[i, 0].imshow(img, cmap="gray")
        axes[i, 0].set_title(f"label {d['labels'][i]} / pred {d['pred'][i]}", fontsize=6)
        for j in range(depth):
            kept = np.kron(patch[i, j].reshape(gh, gw), np.ones((p, p)))[: img.shape[0], : img.shape[1]]
            ax = axes[i, j + 1]
            ax.imshow(img, cmap="gray")
            ax.imshow(1 - kept, cmap=dropped_cmap, vmin=0, vmax=1, interpolation="nearest")
            gated = j >= depth - block.shape[1] and not block[i, j - (depth - block.shape[1])].any()
            title = "skipped" if gated else f"block {j + 1}: {int(patch[i, j].sum())}/{gh * gw}"
            ax.set_title(title, fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"AdaViT ({runs[0]}): patches kept per block (red: dropped)", fontsize=8)
    fig.tight_layout()
    return save(fig, folder, "adavit_decisions")
