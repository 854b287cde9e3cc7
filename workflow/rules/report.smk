# The report: tables beside the paper's numbers, figures and guideline verdicts, in results/<profile>/report/.
# `python -m pipeline publish` copies it to reports/<profile>/, the committed reference (never a target here).
REPORT = str(STUDY.report_dir)
TABLES = list(STUDY.tables) + ["F1"]
REPORT_FILES = [f"{REPORT}/README.md", f"{REPORT}/summary.json"]


rule report:
    input:
        code=STAGE_CODE["report"],
        evals=[str(STUDY.eval_path(r)) for r in STUDY.runs],
        decisions=[str(STUDY.decisions_path(r)) for r in STUDY.runs if STUDY.is_adaptive(r)],
        histories=[str(STUDY.run_dir(r) / "history.json") for r in STUDY.runs],
        predictions=[str(STUDY.predictions_path(r)) for r in STUDY.runs],
        benchmark=f"{R}/benchmark.json",
        latency=f"{R}/latency.json",
    output:
        index=f"{REPORT}/README.md",
        summary=f"{REPORT}/summary.json",
        tables=[f"{REPORT}/tables/{t}.md" for t in STUDY.tables] + [f"{REPORT}/tables/F1.md"],
        csv=[
            report(f"{REPORT}/tables/{t}.csv", category="Tables", labels={"table": t})
            for t in STUDY.tables
        ],
        figures=[
            report(f"{REPORT}/figures/{f}.png", category="Figures", labels={"figure": f})
            for f in FIGURES
        ],
        pdfs=[f"{REPORT}/figures/{f}.pdf" for f in FIGURES],
        latex=[f"{REPORT}/tables/{t}.tex" for t in STUDY.tables],
    conda:
        "../envs/pipeline.yaml"
    log:
        f"{LOGS}/report.log",
    params:
        profile=PROFILE,
        tables=json.dumps([STUDY.tables, STUDY.guidelines, STUDY.settings["report"]], sort_keys=True),
    shell:
        "python -m pipeline report --profile {params.profile} > {log} 2>&1"
