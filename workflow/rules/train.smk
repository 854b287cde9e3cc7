# Data preparation, teacher training and student training: one command, `python -m pipeline train`.


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
        config=run_config_json,
    threads: STUDY.settings["train"]["threads"]
    resources:
        mem_mb=4000,
    shell:
        "python -m pipeline train --profile {params.profile} --run {wildcards.run} --threads {threads} "
        "--no-progress > {log} 2>&1"


rule train_student:
    input:
        code=STAGE_CODE["train"],
        data=f"{R}/data",
        teachers=teacher_models,
    output:
        model=f"{R}/runs/{{run}}/model.pt",
        metrics=f"{R}/runs/{{run}}/metrics.json",
        history=f"{R}/runs/{{run}}/history.json",
    conda:
        "../envs/pipeline.yaml"
    log:
        f"{LOGS}/train/{{run}}.log",
    wildcard_constraints:
        run="|".join(STUDY.student_runs),
    params:
        profile=PROFILE,
        config=run_config_json,
    threads: STUDY.settings["train"]["threads"]
    resources:
        mem_mb=4000,
    shell:
        "python -m pipeline train --profile {params.profile} --run {wildcards.run} --threads {threads} "
        "--no-progress > {log} 2>&1"
