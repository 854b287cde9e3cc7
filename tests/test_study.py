"""The study definition: resolution of runs and configs, and validation before anything runs (issue 4)."""
import shutil

import pytest
import yaml

from pipeline.study import PARAMS, StudyError, load_study


@pytest.fixture()
def params(tmp_path):
    dst = tmp_path / "params"
    shutil.copytree(PARAMS, dst)
    return dst


def edit(path, update):
    data = yaml.safe_load(path.read_text())
    update(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_readings_profile_runs_the_deciding_variants_under_each_reading():
    """params/readings.yaml: only the runs the guidelines' votes read (and their teachers), each MI variant once
    more per other reading of the imitation weights and blocks, each soft-KD variant under DeiT's paper values."""
    study = load_study("readings", check_data=False)
    assert set(study.teachers) == {"gfnet", "poolformer-big", "swin"}  # no LightViT, DeiT, ViG, T9 teachers
    assert "adavit" not in study.variants and "pooling-ce" in study.variants  # the imitation teacher stays
    mi = ["affine-mi-feat80-rel20-l4", "affine-pbig-mi", "affine-swin-mi", "affine-mi-partial"]
    for reading, check in [("mean", lambda c: c.mi.feature_reduction == "mean"),
                           ("per-batch", lambda c: c.mi.weights == "per_batch"),
                           ("balanced", lambda c: c.mi.weights == "balanced"),
                           ("first", lambda c: c.mi.pick == "first"),
                           ("deit-paper", lambda c: (c.kd.tau, c.kd.alpha) == (3.0, 0.1))]:
        for v in mi:
            cfg = study.run_config(study.under_reading(v, reading))
            assert check(cfg) and cfg.mi.teacher.endswith("runs/pooling-ce/model.pt"), (v, reading)
    assert study.under_reading("affine-nolabel-soft", "mean") == "affine-nolabel-soft"  # no imitation: unchanged
    assert study.under_reading("affine-label-nokd", "deit-paper") == "affine-label-nokd"  # no KD: unchanged
    assert study.run_config("identity-label-soft--deit-paper").kd.tau == 3.0
    assert study.study_key("affine-pbig-mi--first") == ["variants.affine-pbig-mi", "readings.mi-blocks"]
    assert len(study.variants) == 17 + 4 * 4 + 10  # 17 deciding, 4 readings of 4 MI variants, 10 soft-KD variants
    # tables keep the rows of the runs it has; guideline 4 keeps no `show` delta of LightViT or ViG
    assert [r["run"] for r in study.tables["T4"]["rows"]] == ["affine-nolabel-soft", "affine-mi-feat80-rel20-l4"]
    assert "T9" not in study.tables and study.guidelines[3]["show"] == []


def test_the_grid_resolves():
    study = load_study("default", check_data=False)
    seeds = study.settings["seeds"]
    assert len(study.teacher_runs) == 10 and len(study.variants) == 37
    assert len(study.student_runs) == 37 * len(seeds)  # every student variant once per seed, teachers once
    last = study.run_config(f"affine-mi-partial-seed{seeds[-1]}")
    assert last.variant == "affine-mi-partial" and last.seed == seeds[-1]
    # a variant that several tables use is one run: T3's label-free soft run is T4's first row and T5's
    assert study.tables_of("affine-nolabel-soft") == ["T3", "T4", "T5"]
    cfg = study.run_config("affine-mi-partial")
    assert cfg.kd.type == "soft" and not cfg.kd.labels and cfg.kd.teacher.endswith("runs/gfnet/model.pt")
    assert cfg.mi.teacher.endswith("runs/pooling-ce/model.pt") and cfg.partial_init == cfg.mi.teacher
    assert (cfg.mi.lambda_in, cfg.mi.lambda_out, cfg.mi.lambda_rel) == (1e-4, 1e-3, 1.0)  # Table 10
    feature = study.run_config("identity-feature-distill").mi
    assert feature.lambda_in == 1e-4 and feature.lambda_out == 0.0 and feature.lambda_rel == 0.0
    assert study.run_config("gfnet").optim.epochs == 10 and cfg.optim.epochs == 4  # teacher_train
    assert study.references("affine-mi-partial") == ["gfnet", "pooling-ce"]
    # AdaViT fine-tunes the dense DeiT run; the LightViT run is T6's row and a T5 logit teacher
    assert study.init_source("adavit") == "deit" and study.run_config("adavit").init.endswith("runs/deit/model.pt")
    assert study.is_adaptive("adavit") and not study.is_adaptive("deit") and study.tables_of("lightvit") == ["T5", "T6"]
    # T9: the 18-layer student imitates CAFormer with GFNet as its logit teacher; "none" reads no teacher
    t9 = study.run_config("v2-18-caformer-mi")
    assert t9.model == "riformerv2_n18" and t9.kd.teacher.endswith("runs/gfnet/model.pt")
    assert t9.mi.teacher.endswith("runs/caformer/model.pt") and study.references("v2-12-none") == []
    paper = load_study("paper", check_data=False)
    assert paper.run_config("affine-mi-partial").model == "riformer_s12"
    assert paper.run_config("gfnet").model == "gfnet_h_b"
    assert paper.run_config("v2-18-caformer-mi").model == "riformerv2_s18" and paper.run_config(
        "caformer").model == "caformer_s18" and paper.run_config("swin").model == "swin_base_patch4_window7_224"


@pytest.mark.parametrize("profile,runs_per_job", [("default", None), ("smoke", None), ("paper", None),
                                                  ("default", 1), ("default", 4), ("default", 100)])
def test_training_jobs_partition_the_students_in_dependency_order(profile, runs_per_job):
    overrides = {"train": {"runs_per_job": runs_per_job}} if runs_per_job else None
    study = load_study(profile, check_data=False, overrides=overrides)
    n = study.settings["train"]["runs_per_job"]
    jobs = list(study.train_batches.values())
    assert sorted(r for job in jobs for r in job) == sorted(study.student_runs)  # each student once
    job_of = {r: i for i, job in enumerate(jobs) for r in job}
    for i, job in enumerate(jobs):
        assert 1 <= len(job) <= n
        assert len({study.run_config(r).seed for r in job}) == 1
        for run in job:  # what a run reads is a teacher or comes from an earlier job, never its own or a later one
            assert all(ref in study.teachers or job_of[ref] < i for ref in study.references(run)), run
    if n == 1:
        assert list(study.train_batches) == [job[0] for job in jobs]  # a job per run, named by it
    # no config of a run depends on how runs are grouped into jobs
    plain = load_study(profile, check_data=False, overrides={"train": {"runs_per_job": 1}})
    assert all(study.run_config(r).to_dict() == plain.run_config(r).to_dict() for r in study.runs)


@pytest.mark.parametrize("case,update,message", [
    ("unknown model", lambda d: d.setdefault("models", {}).update(student={"name": "riformer_huge"}),
     "models.student: unknown model 'riformer_huge'"),
    ("negative epochs", lambda d: d.setdefault("train", {}).setdefault("optim", {}).update(epochs=-1),
     "train.optim.epochs: -1 is less than the minimum of 1"),
    ("unknown run override", lambda d: d["runs"].update({"no-such-variant": {}}),
     "runs.no-such-variant: unknown variant or teacher"),
    ("missing dataset", lambda d: d["data"].update(raw_dir="/no/such/folder"),
     "Fashion-MNIST not found in /no/such/folder"),
])
def test_profile_errors(params, case, update, message):
    edit(params / "default.yaml", update)
    with pytest.raises(StudyError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_study("default", params=params)


@pytest.mark.parametrize("update,message", [
    (lambda d: d["tables"]["T2"]["rows"].append({"row": "x", "run": "no-such-variant"}),
     "tables.T2 row x: unknown run 'no-such-variant'"),
    (lambda d: d["variants"]["identity-label-hard"]["kd"].update(teacher="no-such-teacher"),
     "identity-label-hard: kd.teacher names an unknown run 'no-such-teacher'"),
    (lambda d: d["variants"]["identity-ce"].update(optim={"epochs": 0}),
     "optim.epochs must be >= 1"),
    (lambda d: d["variants"]["identity-ce"].update(kd={"type": "medium"}),
     "kd.type must be none, hard or soft"),
])
def test_study_errors(params, update, message):
    edit(params / "study.yaml", update)
    with pytest.raises(StudyError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_study("default", check_data=False, params=params)


def test_unknown_profile_and_table(params):
    with pytest.raises(StudyError, match="unknown profile 'huge'.*profiles: default, gpu, paper, readings, smoke"):
        load_study("huge", params=params)
    with pytest.raises(StudyError, match="unknown profile 'study'"):
        load_study("study", params=params)
    edit(params / "study.yaml", lambda d: d["tables"]["T1"].update(reference="nothing"))
    with pytest.raises(StudyError, match="tables.T1: reference 'nothing' is not one of its rows"):
        load_study("default", check_data=False, params=params)


def test_image_folder_root_must_exist():
    with pytest.raises(StudyError, match="data.root '/data/imagenet': image-folder dataset not found"):
        load_study("paper")


def test_any_profile_file_is_a_profile_and_is_validated(params):
    """A user's params/<name>.yaml is a profile like the shipped ones; its own content is what is checked."""
    mine = yaml.safe_load((params / "smoke.yaml").read_text())
    (params / "mine.yaml").write_text(yaml.safe_dump({**mine, "seeds": [3, 4]}))
    study = load_study("mine", check_data=False, params=params)
    assert "pooling-ce-seed4" in study.runs and study.run_config("pooling-ce").seed == 3
    (params / "mine.yaml").write_text(yaml.safe_dump({**mine, "seeds": []}))
    with pytest.raises(StudyError, match="params/mine.yaml .* seeds: \\[\\] should be non-empty"):
        load_study("mine", check_data=False, params=params)


@pytest.mark.parametrize("update,message", [
    (lambda d: d["guidelines"][0]["vote"].append({"plus": "T2/no-such-row", "minus": "T2/identity-label-nokd"}),
     "guidelines 1: no table cell 'T2/no-such-row'"),
    (lambda d: d["guidelines"][1].update(direction="sideways"), "guidelines 2: needs direction"),
    (lambda d: d["guidelines"][2].update(vote=[]), "guidelines 3: no `vote` deltas"),
    (lambda d: (d["guidelines"][3]["vote"].append({"plus": "T5/pyramid_vig_b/top1_wo_mi"}),
                d["tables"]["T5"]["rows"][7].update(run=None)),
     "guidelines 4: cell 'T5/pyramid_vig_b/top1_wo_mi' has no run of ours"),
])
def test_guideline_errors(params, update, message):
    edit(params / "study.yaml", update)
    with pytest.raises(StudyError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_study("default", check_data=False, params=params)


def test_readings_are_checked_and_resolved_in_order():
    """A profile's override of a variant reaches its reading variants, under the reading's own keys; a reading that
    changes nothing, or a badly named or empty one, is an error; `variants: deciding` drops the overrides of the runs
    it does not train."""
    on = {"readings": {"points": ["mi-weights"], "variants": "deciding"}}
    study = load_study("smoke", check_data=False,
                       overrides={**on, "runs": {"affine-mi-partial": {"mi": {"lambda_in": 2.0e-4}}}})
    cfg = study.run_config("affine-mi-partial--per-batch")
    assert cfg.mi.lambda_in == 2.0e-4 and cfg.mi.weights == "per_batch"
    assert "pooling-width-cut" not in study.runs and "pooling-width-cut" not in study.settings["runs"]
    with pytest.raises(StudyError, match="readings.mi-weights.mean: changes nothing in variant 'affine-mi-partial'"):
        load_study("smoke", check_data=False,
                   overrides={**on, "runs": {"affine-mi-partial": {"mi": {"feature_reduction": "mean"}}}})


@pytest.mark.parametrize("update,message", [
    (lambda d: d["readings"]["kd"]["readings"].update({"Deit--X": {"text": "t", "set": {"kd": {"tau": 2.0}}}}),
     "name 'Deit--X' must be lower-case words"),
    (lambda d: d["readings"]["kd"]["readings"]["deit-paper"].pop("set"), "readings.kd.deit-paper: no `set`"),
    (lambda d: d["readings"]["kd"].update(applies_to="everything"), "readings.kd.applies_to: one of"),
])
def test_reading_definition_errors(params, update, message):
    edit(params / "study.yaml", update)
    with pytest.raises(StudyError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_study("default", check_data=False, params=params)
