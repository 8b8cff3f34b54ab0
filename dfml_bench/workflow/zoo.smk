rule train_zoo:
    """Pre-train every teacher of one recipe (skips teachers already trained)."""
    input:
        recipe=lambda wildcards: recipe_file(wildcards.recipe),
    output:
        manifest=LAYOUT.manifest("{recipe}"),
    log:
        LAYOUT.zoo_log("{recipe}"),
    benchmark:
        LAYOUT.zoo_benchmark("{recipe}")
    params:
        dfml=DFML,
        out=lambda wildcards, output: os.path.dirname(output.manifest),
        device=CFG.device,
        data=DATA_OPTIONS,
        interval=STATE_INTERVAL,
    threads: 1
    resources:
        gpu=GPU,
    shell:
        "OMP_NUM_THREADS={threads} {params.dfml} zoo train {input.recipe:q} --out {params.out:q}"
        " --device {params.device} --state-interval-s {params.interval} {params.data}"
        " > {log:q} 2>&1"
