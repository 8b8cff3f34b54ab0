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


rule tables:
    """Markdown and LaTeX table per scenario (SS, SH, MH) and the data-recovery speed table."""
    input:
        rules.collect.output,
    output:
        [f"{RESULTS}/tables/{label}.{ext}" for label in LABELS for ext in ("md", "tex")]
        + [f"{RESULTS}/tables/speed.md"],
    log:
        f"{RESULTS}/logs/tables.log",
    params:
        dfml=DFML,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "{params.dfml} table --summary {input:q} --out {params.out:q} > {log:q} 2>&1"
