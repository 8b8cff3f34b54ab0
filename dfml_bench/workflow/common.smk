# Validated config and helpers shared by the rules.
import os
import sys

from dfml_bench.config import all_runs, parse_workflow_config, run_spec
from dfml_bench.errors import DfmlError
from dfml_bench.reporting.figures import FIGURE_KINDS, FORMATS as FIGURE_FORMATS

try:
    CFG = parse_workflow_config(config, "workflow config")
except DfmlError as error:
    raise WorkflowError(str(error)) from None

LAYOUT = CFG.layout  # every path below comes from dfml_bench/layout.py
# zoo and run jobs of a CUDA config hold one `gpu` resource: SLURM asks for one GPU per job,
# and `--resources gpu=N` (profiles/local) caps how many run at once on one machine
GPU = int(CFG.device == "cuda")
RUNS = all_runs(CFG)
LABELS = sorted({CFG.scenarios[scenario].label.lower() for scenario, *_ in RUNS})
DFML = f'"{sys.executable}" -m dfml_bench --quiet'
# --state-interval-s of zoo and run jobs (how often they save a state to resume from)
STATE_INTERVAL = "never" if CFG.state_interval_s is None else CFG.state_interval_s
# quoted in REPORT.md as the command that reproduces every number
REPRODUCE = "snakemake --cores all" + "".join(
    f" --configfile {os.path.relpath(path, workflow.basedir)}" for path in workflow.configfiles
)
DATA_OPTIONS = " ".join(
    f"--{flag} {value}"
    for flag, value in (("data-root", CFG.data_root), ("cache-dir", CFG.cache_dir))
    if value
)


def recipe_file(recipe):
    return f"{workflow.basedir}/{CFG.recipes_dir}/{recipe}.yaml"
