rule collect:
    """One row per run record (and protocol) in summary.csv."""
    input:
        [LAYOUT.record(*run, protocol) for run in RUNS for protocol in ("paper", "clean")],
    output:
        LAYOUT.summary,
    log:
        LAYOUT.log("collect"),
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
        tables=[f"{LAYOUT.tables}/{label}.{ext}" for label in LABELS for ext in ("md", "tex")]
        + [f"{LAYOUT.tables}/speed.md", f"{LAYOUT.tables}/reference.md"],
        figures=[
            f"{LAYOUT.figures}/{kind}-{label}.{ext}"
            for kind in FIGURE_KINDS
            for label in LABELS
            for ext in FIGURE_FORMATS
        ],
        report=LAYOUT.report,
    log:
        LAYOUT.log("report"),
    params:
        dfml=DFML,
        results=lambda wildcards, output: os.path.dirname(output.report),
        command=REPRODUCE,
    shell:
        "{params.dfml} report --results-dir {params.results:q} --summary {input:q}"
        " --command {params.command:q} > {log:q} 2>&1"
