# dfml-bench workflow: recipes -> zoos -> method runs -> summary.csv -> tables, figures, report.
# Thin on purpose: the rules live in dfml_bench/workflow/*.smk and call the package CLI.
#   snakemake --cores all                               # default config (embedded data)
#   snakemake --cores all --configfile config/real-data.yaml

# the embedded default, unless configs are given with --configfile: those then replace it
# (Snakemake would otherwise merge them into the default, keeping its other scenarios)
if not workflow.overwrite_configfiles:

    configfile: "config/default.yaml"


include: "dfml_bench/workflow/common.smk"
include: "dfml_bench/workflow/zoo.smk"
include: "dfml_bench/workflow/runs.smk"
include: "dfml_bench/workflow/report.smk"


rule all:
    input:
        rules.report.output,
    default_target: True
