rule run_method:
    """Meta-train one method on one scenario's zoo and evaluate it under both protocols."""
    input:
        manifest=lambda wildcards: LAYOUT.manifest(CFG.scenarios[wildcards.scenario].recipe),
    output:
        paper=LAYOUT.record("{scenario}", "{method}", "{shots}", "{seed}", "paper"),
        clean=LAYOUT.record("{scenario}", "{method}", "{shots}", "{seed}", "clean"),
    log:
        LAYOUT.run_log("{scenario}", "{method}", "{shots}", "{seed}"),
    benchmark:
        LAYOUT.run_benchmark("{scenario}", "{method}", "{shots}", "{seed}")
    wildcard_constraints:
        shots=r"\d+",
        seed=r"\d+",
    params:
        dfml=DFML,
        spec=lambda wildcards: run_spec(
            CFG, wildcards.scenario, wildcards.method, int(wildcards.shots), int(wildcards.seed)
        ).model_dump_json(),
        interval=STATE_INTERVAL,
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "OMP_NUM_THREADS={threads} {params.dfml} run --spec {params.spec:q}"
        " --state-interval-s {params.interval} > {log:q} 2>&1"
