# Data preparation, teacher training and student training: one command, `python -m pipeline train` (under
# torchrun when the profile's `train.nproc` > 1). A job's cluster resources come from the profile's `train`.


rule prepare_data:
    input:
        code=STAGE_CODE["prepare-data"],
    output:
        directory(f"{R}/data"),
    conda:
        "../envs/pipeline.yaml"
    log:
        f"{LOGS}/prepare_data.log",
    params:
        profile=PROFILE,
        data=json.dumps(STUDY.settings["data"], sort_keys=True),
    shell:
        "python -m pipeline prepare-data --profile {params.profile} > {log} 2>&1"


rule train_teacher:
    input:
        code=STAGE_CODE["train"],
        data=f"{R}/data",
    output:
        model=f"{R}/runs/{{run}}/model.pt",
        metrics=f"{R}/runs/{{run}}/metrics.json",
        history=f"{R}/runs/{{run}}/history.json",
    conda:
        "../envs/pipeline.yaml"
    log:
        f"{LOGS}/train/{{run}}.log",
    wildcard_constraints:
        run="|".join(STUDY.teacher_runs),
    params:
        profile=PROFILE,
        config=lambda wildcards: run_config_json(wildcards.run),
    threads: STUDY.settings["train"]["threads"]
    priority: WAITED_FOR
    resources:
        **STUDY.train_resources,
    shell:
        f"{STUDY.train_launcher} train --profile {{params.profile}} --run {{wildcards.run}} --threads {{threads}} "
        "--no-progress > {log} 2>&1"


# Students: one job per batch of runs (STUDY.train_batches, `train.runs_per_job` in params/), trained one after
# another in one process, so the start-up of a process is paid once per batch. Snakemake reruns a batch when one
# of its runs' configs or inputs changed; the runs whose identity is unchanged resume from their finished
# checkpoint (seconds) instead of training again. Rules named train_<batch>, made by this loop.
for batch, runs in STUDY.train_batches.items():

    rule:
        name:
            job_rule_name(batch)
        input:
            code=STAGE_CODE["train"],
            data=f"{R}/data",
            teachers=sorted({str(STUDY.model_path(t)) for r in runs for t in STUDY.references(r)}),
        output:
            model=[f"{R}/runs/{r}/model.pt" for r in runs],
            metrics=[f"{R}/runs/{r}/metrics.json" for r in runs],
            history=[f"{R}/runs/{r}/history.json" for r in runs],
        conda:
            "../envs/pipeline.yaml"
        log:
            f"{LOGS}/train/{batch}.log",
        params:
            profile=PROFILE,
            runs=" ".join(runs),
            config=json.dumps([run_config_json(r) for r in runs]),
        threads: STUDY.settings["train"]["threads"]
        priority: job_priority(runs)
        resources:
            **STUDY.train_resources,
        shell:
            f"{STUDY.train_launcher} train --profile {{params.profile}} --run {{params.runs}} --threads {{threads}} "
            "--no-progress > {log} 2>&1"
