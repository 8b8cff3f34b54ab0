rule run_method:
    """Meta-train one method on one scenario's zoo and evaluate it under both protocols."""
    input:
        manifest=lambda wildcards: f"{zoo_dir(CFG, CFG.scenarios[wildcards.scenario].recipe)}/manifest.json",
    output:
        paper=f"{RESULTS}/runs/{{scenario}}/{{method}}/{{shots}}shot/seed{{seed}}/record-paper.json",
        clean=f"{RESULTS}/runs/{{scenario}}/{{method}}/{{shots}}shot/seed{{seed}}/record-clean.json",
    log:
        f"{RESULTS}/logs/runs/{{scenario}}/{{method}}/{{shots}}shot-seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/runs/{{scenario}}/{{method}}/{{shots}}shot-seed{{seed}}.tsv"
    wildcard_constraints:
        shots=r"\d+",
        seed=r"\d+",
    params:
        dfml=DFML,
        spec=lambda wildcards: run_spec(
            CFG, wildcards.scenario, wildcards.method, int(wildcards.shots), int(wildcards.seed)
        ).model_dump_json(),
        interval=CHECKPOINT_INTERVAL,
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "OMP_NUM_THREADS={threads} {params.dfml} run --spec {params.spec:q}"
        " --checkpoint-interval-s {params.interval} > {log:q} 2>&1"
