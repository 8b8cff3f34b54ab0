rule train_zoo:
    """Pre-train every teacher of one recipe (skips teachers already trained)."""
    input:
        recipe=lambda wildcards: recipe_file(wildcards.recipe),
    output:
        manifest=f"{RESULTS}/zoo/{{recipe}}/manifest.json",
    log:
        f"{RESULTS}/logs/zoo/{{recipe}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/zoo/{{recipe}}.tsv"
    params:
        dfml=DFML,
        out=lambda wildcards, output: os.path.dirname(output.manifest),
        device=CFG.device,
        data=DATA_OPTIONS,
        interval=CHECKPOINT_INTERVAL,
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "OMP_NUM_THREADS={threads} {params.dfml} zoo train {input.recipe:q} --out {params.out:q}"
        " --device {params.device} --checkpoint-interval-s {params.interval} {params.data}"
        " > {log:q} 2>&1"
