rule collect:
    """One row per run record (and protocol) in summary.csv."""
    input:
        [
            f"{run_folder(*run)}/record-{protocol}.json"
            for run in RUNS
            for protocol in ("paper", "clean")
        ],
    output:
        f"{RESULTS}/summary.csv",
    log:
        f"{RESULTS}/logs/collect.log",
    params:
        dfml=DFML,
        results=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "{params.dfml} collect --results-dir {params.results:q} > {log:q} 2>&1"


rule report:
    """Tables (Markdown + LaTeX per scenario, speed, published vs measured), figures (PNG + PDF)
    and REPORT.md, all from summary.csv and the records."""
    input:
        rules.collect.output,
    output:
        tables=[f"{RESULTS}/tables/{label}.{ext}" for label in LABELS for ext in ("md", "tex")]
        + [f"{RESULTS}/tables/speed.md", f"{RESULTS}/tables/reference.md"],
        figures=[
            f"{RESULTS}/figures/{kind}-{label}.{ext}"
            for kind in FIGURE_KINDS
            for label in LABELS
            for ext in FIGURE_FORMATS
        ],
        report=f"{RESULTS}/REPORT.md",
    log:
        f"{RESULTS}/logs/report.log",
    params:
        dfml=DFML,
        results=lambda wildcards, output: os.path.dirname(output.report),
        command=REPRODUCE,
    shell:
        "{params.dfml} report --results-dir {params.results:q} --summary {input:q}"
        " --command {params.command:q} > {log:q} 2>&1"
