# One rule per stage of pipeline.stages (the declaration dvc.yaml is generated from too): its code and inputs,
# its outputs, the settings it reruns on, its threads, cluster resources, priority and log. The teachers are one
# rule with a wildcard (train_teacher); the student jobs train_<job> (study.train_batches), export_seed<S> and the
# rest one rule each.
for stage in STAGES:

    rule:
        name:
            stage.rule
        input:
            code=stage.code,
            deps=stage.deps,
        output:
            [output(stage, p) for p in stage.outputs],
        conda:
            "../envs/pipeline.yaml"
        log:
            f"{LOGS}/{stage.log}.log",
        params:
            # values of this loop's stage, bound now: the shell command below runs after the loop has ended
            command=lambda wildcards, threads, s=stage: command_line(s, wildcards, threads),
            settings=(lambda wildcards, s=stage.settings: s[wildcards.run])
            if stage.foreach
            else stage.settings,
        wildcard_constraints:
            run="|".join(re.escape(r) for r in stage.foreach or []) or "[A-Za-z0-9_.-]+",
        threads: THREADS[stage.threads]
        priority: stage.priority
        resources:
            **stage.resources,
        shell:
            "{params.command} > {log} 2>&1"
