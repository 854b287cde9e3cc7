"""The report stage on synthetic results (per-image predictions as evaluate writes them): tables with intervals,
a missing and a stale run, the three verdicts, and the comparison with a committed reference."""
import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.compare import compare, compare_reports
from pipeline.io import read_json, save_predictions, write_json
from pipeline.publish import publish
from pipeline.report import Results, guideline_verdicts, load_paper, write_report
from pipeline.study import load_study

MISSING_RUN = "identity-label-hard"
N = 1000
LABELS = np.arange(N) % 10


MACHINE = {"cpu": "test CPU", "isa": ["avx2"], "cpu_capability": "AVX2", "cores": 2, "threads": 2, "gpu": None,
           "torch": "2.0", "onednn": "3.0", "onnxruntime": "1.0"}


def fake_results(study, top1, seed_sd=0.0, jitter=0.0, skip=(MISSING_RUN,), machine=MACHINE, speed=1.0,
                 teacher_noise=0.0):
    """Eval JSONs with per-image predictions, histories, a benchmark and a latency breakdown, as the stages write
    them. `top1(variant)` is the accuracy in %, moved by N(0, seed_sd) points per seed. Images have one shared
    difficulty, so runs are paired like real ones; `jitter` adds per-run noise to it (discordant images).
    Another machine: its `machine` record, throughputs × `speed`, and each teacher moved by N(0, teacher_noise)
    points (attention models do not train bit-identically on other CPUs; the students are the same)."""
    rng, machine_rng = np.random.default_rng(0), np.random.default_rng(1)
    write_json(study.data_dir / "meta.json", {"data_hash": "f" * 64, "source": "fake", "counts": {"test": N}})
    difficulty = rng.random(N)
    for run in study.runs:
        variant = study.variant_of(run)
        if variant in skip:
            continue
        accuracy = (top1(variant) + rng.normal(0, seed_sd)) / 100
        if run in study.teachers and teacher_noise:
            accuracy += machine_rng.normal(0, teacher_noise) / 100
        correct = np.argsort(np.argsort(difficulty + rng.normal(0, jitter, N))) < round(accuracy * N)
        pred = np.where(correct, LABELS, (LABELS + 1) % 10)
        save_predictions(study.predictions_path(run), torch.tensor(pred), torch.tensor(LABELS))
        write_json(study.eval_path(run), {
            "run": run, "test_top1": 100 * correct.mean(), "test_top5": 99.0, "test_images": N,
            "params": 2_000_000 if variant == "lightvit" else 1_000_000, "macs": 5e8,
            "identity": study.identity(run), "train_run_id": hashlib.md5(run.encode()).hexdigest()})
        if study.is_adaptive(run):
            write_json(study.eval_path(run), {**read_json(study.eval_path(run)), "macs": 2.5e8,
                       "expected_macs": {"mean": 2.5e8, "min": 2e8, "max": 3e8},
                       "usage": {"patch": 0.5, "head": 0.6, "block": 0.7},
                       "fast_path": {"top1": 50.0, "argmax_agreement": 1.0, "max_abs_logit_diff": 1e-7}})
        write_json(study.run_dir(run) / "metrics.json", {"train_wall_time_s": 10.0})
        write_json(study.run_dir(run) / "history.json",
                   [{"epoch": e, "train/top1": 70 + e, "train/kd_soft": 1.0 / e, "train/mi_in": 0.1 / e,
                     "train/loss": 2.0 / e} for e in (1, 2)]
                   + [{"epoch": 3, "train/top1": 73, "test/top1": 75.0, "train/kd_soft": 0.3, "train/loss": 0.9}])
    archs = {r: ("pool" if "pooling" in r else "ada" if study.is_adaptive(r) else "rif") for r in study.runs}

    def rounds(median):
        median *= speed
        return {"median": median, "min": median - 10, "max": median + 10,
                "samples": [median - 10, median - 5, median, median + 5, median + 10, median, median]}
    ratio = rounds(1.5)
    write_json(study.benchmark_path, {
        "device_name": "test CPU", "machine": machine, "reference": "pool", "runs": archs, "repeats": 7,
        "models": {"pool": {"throughput": rounds(100.0)}, "rif": {"throughput": rounds(120.0)},
                   "ada": {"throughput": rounds(80.0)}, "ada (fast path)": {"throughput": rounds(160.0)}},
        "adaptive": {"adavit": {"dense": "rif", "batch_1": {"images": 4, "fast": {"ratio_to_dense": ratio}}}},
        "sizes": {"models": {"riformer_s12:pooling": {"params": 11.9e6, "macs": 1.8e9, "throughput": rounds(100.0)},
                             "riformer_s12:deploy": {"params": 11.9e6, "macs": 1.8e9, "throughput": rounds(130.0)}}}})
    write_json(study.latency_path, {
        "device_name": "test CPU", "batch_size": 2, "img_size": 224,
        "steps": [{"step": s, "cumulative_ms": 10.0 * (i + 1), "min_ms": 9.0, "max_ms": 11.0}
                  for i, s in enumerate(["embedding", "+layernorm1", "+attention", "+residual1", "+layernorm2",
                                         "+mlp", "+residual2"])],
        "token_mixer_share": {"median": 0.14, "min": 0.1, "max": 0.2}})


def paper_like(changes=None):
    """Our top-1 = the paper's shape of results, plus `changes` {variant: top-1}."""
    values = {"pooling-ce": 2.7, "identity-ce": 0.0, "identity-label-soft": 1.3, "identity-nolabel-hard": 0.5,
              "identity-nolabel-soft": 4.0, "affine-label-nokd": -0.06, "affine-label-hard": 1.1,
              "affine-nolabel-hard": 0.4, "affine-label-soft": -0.2, "affine-nolabel-soft": 4.0,
              "affine-mi-feat80-rel20-l4": 7.0, "affine-mi-partial": 10.0, "affine-pbig-nolabel-soft": 1.3,
              "affine-pbig-mi": 2.5, "gfnet": 10.0, "poolformer-big": 9.0, "identity-feature-distill": 2.6}
    values.update({k: v - 70.0 for k, v in (changes or {}).items()})
    return lambda variant: 70.0 + values.get(variant, 2.0)


@pytest.fixture()
def study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # results/ and reports/ land here; params/ are read from the repository
    return load_study("smoke", check_data=False)


def verdicts_of(study):
    return {v["guideline"]: v for v in guideline_verdicts(Results(study), load_paper())}


def test_tables_with_intervals_and_a_missing_run(study, tmp_path):
    fake_results(study, paper_like(), jitter=0.05)
    summary = write_report(study, study.report_dir)
    out = study.report_dir
    for t in list(study.tables) + ["F1"]:
        assert (out / "tables" / f"{t}.md").is_file()
    for t in study.tables:
        assert "\\toprule" in (out / "tables" / f"{t}.tex").read_text()
    assert "T2/identity-label-hard/top1" in summary["missing"] and summary["test_images"] == N
    t2 = {r["row"]: r for r in csv.DictReader(open(out / "tables" / "T2.csv"))}
    missing = t2["identity-label-hard"]
    assert missing["ours"] == "" and missing["state"] == "missing" and missing["paper"] == "73.51"
    present = t2["identity-nolabel-soft"]
    assert present["mlflow_run_ids"] == hashlib.md5(b"identity-nolabel-soft").hexdigest()
    assert float(present["ours_delta"]) == pytest.approx(4.0, abs=0.05)
    assert float(present["ours_delta_low"]) < float(present["ours_delta"]) < float(present["ours_delta_high"])
    assert float(present["ours_low"]) < float(present["ours"]) < float(present["ours_high"])
    assert float(present["paper_delta"]) == pytest.approx(1.74)
    md = (out / "tables" / "T2.md").read_text()
    assert "| identity-label-hard | top1 | — | 73.51 | — | +1.20 |  | missing |" in md
    t5 = {(r["row"], r["metric"]): r for r in csv.DictReader(open(out / "tables" / "T5.csv"))}
    assert all(t5["pyramid_vig_b", m]["state"] == "ok" for m in ("teacher_top1", "top1_wo_mi", "top1_w_mi"))
    t8 = {(r["row"], r["metric"]): r for r in csv.DictReader(open(out / "tables" / "T8.csv"))}
    riformer = t8["riformer_s12", "throughput"]  # a ratio of the per-round samples, with its interval
    assert float(riformer["ours_delta"]) == pytest.approx(1.2, abs=0.01)
    assert float(riformer["ours_delta_low"]) < 1.2 < float(riformer["ours_delta_high"])
    t6 = {(r["row"], r["metric"]): r for r in csv.DictReader(open(out / "tables" / "T6.csv"))}
    assert float(t6["lightvit_tiny", "params_m"]["ours"]) == 2.0  # params and MACs: counts, a ratio Δ
    assert float(t6["lightvit_tiny", "params_m"]["ours_delta"]) == 2.0
    assert t6["lightvit_tiny", "params_m"]["ours_delta_low"] == t6["lightvit_tiny", "params_m"]["ours_delta_high"]
    assert float(t6["ada_deit_small", "throughput_fast"]["ours"]) == 160.0  # AdaViT's fast path
    assert float(t6["ada_deit_small", "macs_g"]["ours"]) == 0.25  # expected MACs
    readme = (out / "README.md").read_text()
    assert "| adavit | " in readme and "×1.50 [" in readme  # the AdaViT speed-up section
    assert f"{N:,} (every accuracy and Δ below is over all of them)" in readme
    assert "the seed-to-seed variation is not in it" in readme  # one seed, said so
    for name in summary["figures"]:
        assert f"figures/{name}.png" in readme and (out / "figures" / f"{name}.pdf").is_file()


def test_rows_with_their_own_reference_and_size_benchmark_rows(study):
    """T9's 18-layer rows are compared with s18-none, not the table's s12-none; T6-sizes rows come from the size
    benchmark, each RIFormer against the PoolFormer of its size, their top-1 the paper's only."""
    fake_results(study, paper_like({"v2-12-none": 70.0, "v2-18-none": 75.0, "v2-18-convformer-mi": 77.0}),
                 jitter=0.05)
    write_report(study, study.report_dir)
    tables = study.report_dir / "tables"
    t9 = {r["row"]: r for r in csv.DictReader(open(tables / "T9.csv"))}
    assert float(t9["s18-convformer_s18"]["ours_delta"]) == pytest.approx(2.0, abs=0.05)  # vs s18-none (75)
    assert float(t9["s18-convformer_s18"]["paper_delta"]) == pytest.approx(77.53 - 75.01)
    assert float(t9["s12-poolformerv2_s12"]["ours_delta"]) == pytest.approx(2.0, abs=0.05)  # 72 vs s12-none (70)
    assert float(t9["s18-none"]["ours_delta"]) == 0.0 and float(t9["s18-none"]["paper_delta"]) == 0.0  # a reference
    assert "(and `s18-none` for the rows that name it)" in (tables / "T9.md").read_text()
    sizes = {(r["row"], r["metric"]): r for r in csv.DictReader(open(tables / "T6-sizes.csv"))}
    thr = sizes["riformer_s12", "throughput"]
    assert float(thr["ours_delta"]) == pytest.approx(1.3, abs=0.01)  # per-round ratio to PoolFormer-S12
    assert float(thr["ours_delta_low"]) < 1.3 < float(thr["ours_delta_high"])
    assert float(thr["paper"]) == 4899.80 and float(thr["paper_delta"]) == pytest.approx(4899.80 / 4160.18, rel=1e-5)
    assert sizes["riformer_s12", "top1"]["state"] == "paper only" and sizes["riformer_s12", "top1"]["ours"] == ""
    assert sizes["riformer_s24", "params_m"]["state"] == "missing"  # smoke's size benchmark has S12 only
    md = (tables / "T6-sizes.md").read_text()
    assert "| riformer_s12 | top1 | paper only | 76.90 |" in md and "this size is not trained here" in md


def test_figures_are_byte_identical_on_rerun(study):
    fake_results(study, paper_like(), jitter=0.05)
    write_report(study, study.report_dir)
    first = {p.name: p.read_bytes() for p in (study.report_dir / "figures").iterdir()}
    write_report(study, study.report_dir)
    assert first == {p.name: p.read_bytes() for p in (study.report_dir / "figures").iterdir()}


@pytest.mark.parametrize("partial,verdict", [(80.0, "supported"), (74.0, "contradicted"), (77.2, "inconclusive")])
def test_verdicts_reach_all_three(tmp_path, monkeypatch, partial, verdict):
    """Guideline 5 (partial init - none, paper +0.23) at 77.0: +3 points, -3, and +0.2 with 3 seeds."""
    monkeypatch.chdir(tmp_path)
    study = load_study("smoke", check_data=False, overrides={"seeds": [0, 1, 2]})
    fake_results(study, paper_like({"affine-mi-partial": partial}), seed_sd=0.3, jitter=0.05, skip=())
    g5 = verdicts_of(study)[5]
    assert g5["verdict"] == verdict
    vote = g5["votes"][0]["ours"]
    assert vote.seeds == 3 and vote.n == N and vote.mde > 0
    assert vote.mean == pytest.approx(partial - 77.0, abs=1.5)


def test_guideline_interval_is_the_paired_t_interval_with_one_seed(study):
    fake_results(study, paper_like(), jitter=0.2)
    g5 = verdicts_of(study)[5]["votes"][0]["ours"]
    from pipeline.io import load_predictions
    a, la = load_predictions(study.predictions_path("affine-mi-partial"))
    b, lb = load_predictions(study.predictions_path("affine-mi-feat80-rel20-l4"))
    ci = stats.ttest_rel(100.0 * (a == la), 100.0 * (b == lb)).confidence_interval(0.95)
    assert (g5.low, g5.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_a_stale_result_is_never_shown_as_current(study, tmp_path):
    fake_results(study, paper_like(), jitter=0.05)
    changed = load_study("smoke", check_data=False,  # the run's config changed after it was evaluated
                         overrides={"runs": {"affine-mi-partial": {"optim": {"lr": 1.0e-3}}}})
    summary = write_report(changed, changed.report_dir)
    assert summary["stale"] == ["affine-mi-partial"]
    pl = {r["row"]: r for r in csv.DictReader(open(changed.report_dir / "tables" / "PL.csv"))}
    assert pl["mi-gfnet-partial-init"]["state"] == "stale" and pl["mi-gfnet-partial-init"]["ours"] == ""
    assert "| mi-gfnet-partial-init | top1 | stale |" in (changed.report_dir / "tables" / "PL.md").read_text()
    assert next(v for v in summary["verdicts"] if v["guideline"] == 5)["verdict"].startswith("not testable")
    with pytest.raises(SystemExit, match="stale runs"):
        publish("smoke")  # a report with stale results is never published


def test_compare_with_the_committed_reference(study, capsys):
    fake_results(study, paper_like(), jitter=0.05)
    write_report(study, study.report_dir)
    with pytest.raises(SystemExit, match="written without 1 runs' evaluations"):
        publish("smoke")
    publish("smoke", allow_missing=True)
    assert (study.report_dir / "README.md").read_text() == open("reports/smoke/README.md").read()
    capsys.readouterr()
    assert compare("smoke").verdict() == "reproduced"
    out = capsys.readouterr().out
    assert out.startswith("smoke: reproduced (against reports/smoke; 1 cells not compared: expected MACs of learned")
    fake_results(study, paper_like({"affine-mi-partial": 70.0}), jitter=0.05)  # one variant changes
    write_report(study, study.report_dir)
    assert compare("smoke").verdict() == "differs"
    out = capsys.readouterr().out
    assert out.startswith("smoke: differs") and "PL: 2 difference(s)" in out
    assert "[effect] mi-gfnet-partial-init top1: Δ fresh" in out and "apart by more than the two intervals" in out
    assert "T1: reproduced" in out and "guideline 5: contradicted (reference: supported)" in out
    (Path("reports/smoke/tables") / "T9.csv").unlink()  # a table added after the reference was published
    assert compare("smoke").verdict() == "differs"
    assert "T9: not in the reference (a new table)" in capsys.readouterr().out


@pytest.fixture()
def seeded(tmp_path, monkeypatch):
    """The smoke study at three seeds: the one-seed rows (teachers) get a pooled seed part."""
    monkeypatch.chdir(tmp_path)
    return load_study("smoke", check_data=False, overrides={"seeds": [0, 1, 2]})


def test_two_machines_reproduce(seeded, tmp_path):
    """Same seeds on another CPU: the students are the same, each teacher's accuracy moved by a seed-sized amount,
    every throughput is another: "reproduced", with the throughputs not compared (other machine)."""
    fake_results(seeded, paper_like(), seed_sd=2.0, jitter=0.05)
    summary = write_report(seeded, tmp_path / "a")
    assert summary["machine"] == MACHINE and 1 < summary["single_seed_sd"]["points"] < 4
    assert "seed part" in Results(seeded).cell("gfnet", "top1").value.method  # a teacher's interval holds it
    seeded.settings["report"]["single_seed_sd"] = None
    write_report(seeded, tmp_path / "a0")  # the same, with images-only intervals for the one-seed rows
    other = {**MACHINE, "cpu": "other CPU", "isa": ["avx2", "avx512f"]}
    fake_results(seeded, paper_like(), seed_sd=2.0, jitter=0.05, machine=other, speed=0.6, teacher_noise=2.0)
    write_report(seeded, tmp_path / "b0")
    seeded.settings["report"]["single_seed_sd"] = "pooled"
    write_report(seeded, tmp_path / "b")
    t5, t5b = ({(r["row"], r["metric"]): r for r in csv.DictReader(open(tmp_path / d / "tables" / "T5.csv"))}
               for d in ("a", "b"))
    assert all(t5[k]["ours"] != t5b[k]["ours"] for k in t5 if k[1] == "teacher_top1" and t5[k]["state"] == "ok")
    result = compare_reports(tmp_path / "b", tmp_path / "a")
    assert result.verdict() == "reproduced", result.diffs
    reason = next(iter(result.skipped))
    assert reason.startswith("other machine (cpu test CPU vs other CPU; isa avx2 vs avx2 avx512f)")
    # images-only intervals tell the same two honest runs apart: the seed part is what makes them agree
    assert compare_reports(tmp_path / "b0", tmp_path / "a0").verdict() != "reproduced"


def test_same_machine_compares_throughput_and_a_moved_effect_differs(seeded, tmp_path):
    fake_results(seeded, paper_like(), seed_sd=0.5, jitter=0.05)
    write_report(seeded, tmp_path / "a")
    fake_results(seeded, paper_like(), seed_sd=0.5, jitter=0.05, speed=0.5)  # same machine, everything at half
    write_report(seeded, tmp_path / "b")
    result = compare_reports(tmp_path / "b", tmp_path / "a")
    assert not any(why.startswith("other machine") for why in result.skipped)  # images/s compared
    assert result.verdict().startswith("reproduced except")
    assert {kind for kind, _ in result.diffs} == {"throughput"}
    fake_results(seeded, paper_like({"affine-mi-partial": 76.0}), seed_sd=0.5, jitter=0.05)  # +6 points
    write_report(seeded, tmp_path / "c")
    result = compare_reports(tmp_path / "c", tmp_path / "a")
    assert result.verdict() == "differs"
    assert any(kind == "effect" and "mi-gfnet-partial-init top1" in line for kind, line in result.diffs)


def test_an_older_reference_gets_the_seed_part(seeded, tmp_path):
    """Reports written before one-seed rows had a seed part: the other report's estimate (or, when neither has one,
    the committed report's) is added to their one-seed cells."""
    fake_results(seeded, paper_like(), seed_sd=2.0, jitter=0.05)
    sd = write_report(seeded, tmp_path / "new")["single_seed_sd"]["points"]
    seeded.settings["report"]["single_seed_sd"] = None
    write_report(seeded, tmp_path / "new-old-style")
    fake_results(seeded, paper_like(), seed_sd=2.0, jitter=0.05, teacher_noise=2.0)  # another machine
    write_report(seeded, tmp_path / "old")
    for folder in ("old", "new-old-style"):
        summary = read_json(tmp_path / folder / "summary.json")
        del summary["single_seed_sd"]
        write_json(tmp_path / folder / "summary.json", summary)
    result = compare_reports(tmp_path / "new", tmp_path / "old")
    assert result.verdict() == "reproduced", result.diffs
    assert any(f"reference report's one-seed intervals hold no seed part (an older version): σ {sd:.2f}" in n
               for n in result.notes)
    both_old = compare_reports(tmp_path / "new-old-style", tmp_path / "old", fallback_seed_sd=sd)
    assert both_old.verdict() == "reproduced", both_old.diffs
    assert compare_reports(tmp_path / "new-old-style", tmp_path / "old").verdict() != "reproduced"


def test_several_seeds_pair_by_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = load_study("smoke", check_data=False, overrides={"seeds": [0, 1, 2]})
    assert "affine-mi-partial-seed2" in study.runs and "gfnet-seed1" not in study.runs  # teachers run once
    fake_results(study, paper_like(), seed_sd=0.3, jitter=0.05)
    summary = write_report(study, study.report_dir)
    t5 = {(r["row"], r["metric"]): r for r in csv.DictReader(open(study.report_dir / "tables" / "T5.csv"))}
    assert t5["gfnet_h_b", "top1_w_mi"]["ours_seeds"] == "3" and t5["gfnet_h_b", "top1_w_mi"]["ours_delta_seeds"] == "3"
    assert t5["poolformer_m48", "teacher_top1"]["ours_delta_seeds"] == "1"  # two teachers: trained once each
    readme = (study.report_dir / "README.md").read_text()
    assert "| 3 × 1,000 |" in readme and "With 3 seeds" in readme
    json.dumps(summary["verdicts"])  # intervals are plain JSON in summary.json


def test_loss_terms_table_shows_which_term_dominates(study):
    """Each weighted term's first-epoch mean and its share, for the first seed's runs that combine terms."""
    fake_results(study, paper_like())
    write_report(study, study.results / "report")
    section = (study.results / "report" / "README.md").read_text().split("### Loss terms")[1]
    row = next(line for line in section.splitlines() if line.startswith("| pooling-ce |"))
    assert "| 1 (91%) |" in row and "| 0.1 (9%) |" in row  # soft KD 1.0, L'_in 0.1 in the fake history
    assert "soft KD" in section and "L'_in" in section


def test_training_regime_flags_runs_still_improving(study):
    """The last epoch's change per run (tables/regime.csv) and per guideline the deciding runs still improving."""
    fake_results(study, paper_like())
    plateau = [{"epoch": 1, "train/loss": 1.0, "test/top1": 80.0}, {"epoch": 2, "train/loss": 0.999, "test/top1": 80.5}]
    write_json(study.run_dir("pooling-ce") / "history.json", plateau)
    write_report(study, study.report_dir)
    rows = {r["run"]: r for r in csv.DictReader(open(study.report_dir / "tables" / "regime.csv"))}
    assert rows["pooling-ce"]["still_improving"] == "False"
    assert float(rows["pooling-ce"]["last_epoch_top1_change"]) == 0.5
    # loss 1.0 -> 0.9 in its last epoch, less the imitation term L'_in of 0.05 before: 0.95 -> 0.9
    assert rows["identity-ce"]["still_improving"] == "True"
    assert float(rows["identity-ce"]["last_epoch_loss_change_rel"]) == pytest.approx(-0.05 / 0.95)
    assert rows["identity-ce"]["last_epoch_top1_change"] == ""  # one test pass: not measured
    readme = (study.report_dir / "README.md").read_text()
    section = readme.split("## Training regime")[1].split("## Tables")[0]
    evaluated = len(rows)
    assert f"**{evaluated - 1} of {evaluated} runs are still improving**" in section
    assert "| pooling-ce | 2 | 0.999 | -0.1% | +0.50 | 0 of 1 |" in section
    assert "PL copies a trained PoolFormer" in section
    assert "seeds for the paper's Δ" in readme
    # an imitation term that stops within the run is not progress: the loss is compared without it
    write_json(study.run_dir("pooling-ce") / "history.json",
               [{**plateau[0], "train/mi_out": 0.5, "train/loss": 1.5}, plateau[1]])
    write_report(study, study.report_dir)
    rows = {r["run"]: r for r in csv.DictReader(open(study.report_dir / "tables" / "regime.csv"))}
    assert rows["pooling-ce"]["still_improving"] == "False"


def test_verdicts_under_each_reading(tmp_path, monkeypatch):
    """The readings profile's table: guideline 3 contradicted under the study's reading of the imitation weights and
    supported under `mean`; guideline 1 reads no imitation run, so it is not under that point but under KD's."""
    monkeypatch.chdir(tmp_path)
    study = load_study("readings", check_data=False, overrides={"seeds": [0, 1]})
    changes = {"affine-mi-feat80-rel20-l4": 60.0, "affine-mi-feat80-rel20-l4--mean": 90.0}
    fake_results(study, paper_like(changes), seed_sd=0.3, jitter=0.05, skip=())
    summary = write_report(study, study.report_dir)
    rows = {(item["guideline"], item["point"], row["reading"]): row
            for item in summary["reading_verdicts"] for row in item["rows"]}
    study_row = rows[3, "mi-weights", "sample-sum"]
    assert study_row["verdict"] == "contradicted" and study_row["study"]
    assert rows[3, "mi-weights", "mean"]["verdict"] == "supported"
    assert (1, "mi-weights", "mean") not in rows and (1, "kd", "deit-paper") in rows
    g3 = {v["guideline"]: v for v in summary["verdicts"]}[3]["verdict"]
    assert g3 == study_row["verdict"]  # the study's reading is the main verdict
    readme = (study.report_dir / "README.md").read_text()
    assert "## Verdicts under each reading" in readme
    assert "- **3**: depends on the reading: contradicted under the study's readings" in readme
    table = list(csv.DictReader(open(study.report_dir / "tables" / "readings.csv")))
    assert {r["reading"] for r in table if r["point"] == "mi-weights"} == {"sample-sum", "mean", "per-batch",
                                                                            "balanced"}
    # compare checks the verdicts under each reading too: a reading whose verdict moved is a difference
    shutil.copytree(study.report_dir, tmp_path / "reference")
    assert compare_reports(study.report_dir, tmp_path / "reference").verdict() == "reproduced"
    fake_results(study, paper_like({**changes, "affine-mi-feat80-rel20-l4--mean": 60.0}), seed_sd=0.3, jitter=0.05,
                 skip=())
    write_report(study, study.report_dir)
    moved = compare_reports(study.report_dir, tmp_path / "reference")
    assert moved.verdict() == "differs" and ("3 under mi-weights: mean", "contradicted", "supported") in moved.verdicts
