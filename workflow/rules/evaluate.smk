# Re-parameterization of every affine student, evaluation of every deploy model with one interleaved
# benchmark of all architectures (all cores, nothing else running), and the latency breakdown.
AFFINE = [r for r in STUDY.runs if STUDY.needs_reparameterize(r)]
FIRST_SEED = [r for r in STUDY.runs if STUDY.run_specs[r][2] == STUDY.settings["seeds"][0]]


rule reparameterize:
    input:
        code=STAGE_CODE["reparameterize"],
        models=[str(STUDY.model_path(r)) for r in AFFINE],
        data=f"{R}/data",
    output:
        models=[str(STUDY.deploy_dir(r) / "model.pt") for r in AFFINE],
        reports=[str(STUDY.deploy_dir(r) / "reparam.json") for r in AFFINE],
    conda:
        "../envs/pipeline.yaml"
    log:
        f"{LOGS}/reparameterize.log",
    params:
        profile=PROFILE,
    threads: MAX_THREADS
    shell:
        "python -m pipeline reparameterize --profile {params.profile} --threads {threads} > {log} 2>&1"


rule evaluate:
    input:
        code=STAGE_CODE["evaluate"],
        models=[str(STUDY.deployed_model(r)) for r in STUDY.runs],
        metrics=[str(STUDY.run_dir(r) / "metrics.json") for r in STUDY.runs],
        data=f"{R}/data",
    output:
        evals=[str(STUDY.eval_path(r)) for r in STUDY.runs],
        predictions=[str(STUDY.predictions_path(r)) for r in STUDY.runs],
        decisions=[str(STUDY.decisions_path(r)) for r in STUDY.runs if STUDY.is_adaptive(r)],
        benchmark=f"{R}/benchmark.json",
    conda:
        "../envs/pipeline.yaml"
    log:
        f"{LOGS}/evaluate.log",
    params:
        profile=PROFILE,
        settings=json.dumps(STUDY.settings["evaluate"], sort_keys=True),
    threads: MAX_THREADS
    resources:
        **gpu_of(STUDY.settings["evaluate"]["benchmark"]),
    shell:
        "python -m pipeline evaluate --profile {params.profile} --threads {threads} > {log} 2>&1"


rule latency_breakdown:
    input:
        code=STAGE_CODE["latency-breakdown"],
    output:
        f"{R}/latency.json",
    conda:
        "../envs/pipeline.yaml"
    log:
        f"{LOGS}/latency_breakdown.log",
    params:
        profile=PROFILE,
        settings=json.dumps(STUDY.settings["latency"], sort_keys=True),
    threads: MAX_THREADS
    resources:
        **gpu_of(STUDY.settings["latency"]),
    shell:
        "python -m pipeline latency-breakdown --profile {params.profile} --threads {threads} > {log} 2>&1"


# ONNX export: one job per seed (rules export_seed<S>), side by side with each other and the report: no timing
# here (ONNX Runtime is timed in evaluate's benchmark). The first seed's job registers the study's best student.
for seed in STUDY.settings["seeds"]:
    runs = [r for r in STUDY.export_runs if STUDY.run_specs[r][2] == seed]
    rule:
        name:
            f"export_seed{seed}"
        input:
            code=STAGE_CODE["export"],
            models=[str(STUDY.deployed_model(r)) for r in runs],
            evals=[str(STUDY.eval_path(r)) for r in STUDY.export_runs],
            data=f"{R}/data",
        output:
            onnx=[str(STUDY.export_dir(r) / "model.onnx") for r in runs],
            checks=[str(STUDY.export_dir(r) / "export.json") for r in runs],
            summary=str(STUDY.export_summary_path(seed)),
        conda:
            "../envs/pipeline.yaml"
        log:
            f"{LOGS}/export-seed{seed}.log",
        params:
            profile=PROFILE,
            seed=seed,
            settings=json.dumps(STUDY.settings["export"], sort_keys=True),
        threads: 1
        shell:
            "python -m pipeline export --profile {params.profile} --seed {params.seed} --threads {threads} "
            "--no-progress > {log} 2>&1"
