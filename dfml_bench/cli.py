"""`dfml-bench` command line: thin wrappers over the package, one line per user error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dfml_bench.errors import DfmlError
from dfml_bench.layout import ResultsLayout
from dfml_bench.records import read_record


def _cmd_datasets(args: argparse.Namespace) -> None:
    from dfml_bench.data import dataset_entry, dataset_names, load_dataset

    if args.action == "verify":
        from dfml_bench.data.verify import verify_dataset
        from dfml_bench.paths import data_root

        verdict = verify_dataset(args.name, data_root(args.data_root))
        print("\n".join(verdict.lines), flush=True)
        if not verdict.ready:
            raise DfmlError(verdict.summary)  # the final line, on stderr; exit status 2
        print(verdict.summary)
        return
    if args.action == "list":
        for name in dataset_names():
            entry = dataset_entry(name)
            kind = "embedded" if entry.embedded else "needs data root"
            print(f"{name:28s} {entry.default_image_size:>3d}px  {kind:16s} {entry.description}")
        return
    dataset = load_dataset(
        args.name, args.image_size, data_root=args.data_root, cache_dir=args.cache_dir
    )
    for split_name, split in dataset.splits.items():
        print(
            f"{dataset.name} {dataset.image_size}px {split_name}: {split.num_classes} classes, "
            f"{len(split.labels)} images"
        )


def _cmd_zoo(args: argparse.Namespace) -> None:
    from dfml_bench.device import resolve_device
    from dfml_bench.zoo.recipe import load_recipe
    from dfml_bench.zoo.train import train_zoo

    recipe = load_recipe(args.recipe)
    out = Path(args.out or ResultsLayout(args.results_dir).zoo(recipe.name))
    zoo = train_zoo(
        recipe,
        out,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        device=resolve_device(args.device),
        progress=not args.quiet,
        state_interval_s=args.state_interval_s,
    )
    accuracies = [t.heldout_accuracy for t in zoo.teachers]
    print(
        f"zoo {recipe.name}: {len(zoo.teachers)} teachers in {out}, held-out accuracy "
        f"{min(accuracies):.1f}-{max(accuracies):.1f}%"
    )


def _interval(text: str) -> float | None:
    """Seconds between saved states, or `never`."""
    if text == "never":
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds or 'never'"
        ) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("the interval must be >= 0 seconds (or 'never')")
    return seconds


def state_interval(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--state-interval-s",
        type=_interval,
        default=300.0,
        metavar="SECONDS|never",
        help=f"save the {what} state this often, to resume after a kill (default 300)",
    )


def _cmd_run(args: argparse.Namespace) -> None:
    from dfml_bench.config import RunSpec, load_workflow_config, run_spec
    from dfml_bench.runner import execute_run
    from dfml_bench.validation import validate_model

    if args.from_record:
        spec = validate_model(RunSpec, _record_spec(Path(args.from_record)), "record's run spec")
    elif args.spec:
        try:
            raw = json.loads(args.spec)
        except json.JSONDecodeError as error:
            raise DfmlError(f"--spec is not valid JSON: {error}") from None
        spec = validate_model(RunSpec, raw, "run spec")
    else:
        missing = [
            flag for flag in ("config", "scenario", "method", "shots") if not getattr(args, flag)
        ]
        if missing:
            raise DfmlError(f"run needs --spec JSON or --{', --'.join(missing)}")
        config = load_workflow_config(args.config)
        spec = run_spec(config, args.scenario, args.method, args.shots, args.seed)
    runs = execute_run(spec, not args.quiet, args.state_interval_s)
    for path in runs:
        record = read_record(path)
        outcome = (
            f"{record.acc_mean:.2f} ± {record.acc_ci95:.2f}"
            if record.applicable
            else f"not applicable ({record.reason})"
        )
        print(
            f"{record.scenario} {record.method} {record.shots}-shot seed {record.seed}"
            f" [{record.protocol}]: {outcome} -> {path}"
        )


def _record_spec(path: Path) -> object:
    """The full run spec a record was produced with (records store it verbatim)."""
    if not path.is_file():
        raise DfmlError(f"record {path} not found; give a record-*.json under results/runs")
    return read_record(path).spec


def _cmd_collect(args: argparse.Namespace) -> None:
    from dfml_bench.reporting.collect import collect

    print(collect(args.results_dir, args.output))


def _cmd_table(args: argparse.Namespace) -> None:
    from dfml_bench.reporting.tables import write_tables

    layout = ResultsLayout(args.results_dir)
    summary = Path(args.summary or layout.summary)
    out = Path(args.out or layout.tables)
    for path in write_tables(summary, out):
        print(path)


def _cmd_report(args: argparse.Namespace) -> None:
    from dfml_bench.reporting.figures import write_figures
    from dfml_bench.reporting.report import write_report
    from dfml_bench.reporting.tables import read_summary, write_tables

    layout = ResultsLayout(args.results_dir)
    summary = Path(args.summary or layout.summary)
    tables, figures = Path(layout.tables), Path(layout.figures)
    frame = read_summary(summary)
    written = write_tables(summary, tables)
    written += write_figures(Path(layout.root), frame, figures)
    bench = Path(layout.bench) / "bench.md"
    written.append(write_report(frame, tables, figures, Path(layout.report), args.command, bench))
    for path in written:
        print(path)


def _cmd_bench(args: argparse.Namespace) -> None:
    import importlib.util
    import os
    import subprocess

    import dfml_bench.benchmarks
    from dfml_bench import atomic
    from dfml_bench.device import resolve_device
    from dfml_bench.reporting.bench import write_bench_markdown

    needed = ("pytest", "pytest_benchmark")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        names = " and ".join(name.replace("_", "-") for name in missing)
        raise DfmlError(
            f"the benchmarks run under pytest and pytest-benchmark ({names} not installed); "
            "pip install 'dfml-bench[bench]'"
        )
    suite = Path(dfml_bench.benchmarks.__file__).parent  # shipped with the package
    device = resolve_device(args.device)
    out = Path(args.out)
    target = out / f"bench-{args.label or device.type}.json"
    env = os.environ | {"DFML_BENCH_DEVICE": device.type, "DFML_BENCH_SMOKE": str(int(args.smoke))}
    with atomic.atomic_path(target) as tmp:  # a failed or interrupted suite leaves no JSON
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                str(suite),
                "-q",
                "-p",
                "no:cacheprovider",
                "-c",  # no ini file: not the settings of a project the package happens to sit in
                os.devnull,
                "--rootdir",
                str(suite),
                "--benchmark-only",
                f"--benchmark-json={tmp}",
                *(["-k", args.select] if args.select else []),
            ],
            env=env,
            check=False,
        )
        if result.returncode != 0:
            raise DfmlError(f"the benchmark suite failed (pytest exit {result.returncode})")
    print(target)
    print(write_bench_markdown(out))


def _cmd_methods(args: argparse.Namespace) -> None:
    from dfml_bench.methods import method_class, method_names

    for name in method_names():
        cls = method_class(name)
        note = "same-architecture zoos only" if cls.same_architecture_only else "any zoo"
        print(f"{name:12s} {note}")


def _cmd_estimate(args: argparse.Namespace) -> None:
    from dfml_bench.estimate import estimate, format_estimate

    print(format_estimate(estimate(args.config, args.bench), args.config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfml-bench", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-root", help="folder with real datasets (default: $DFML_DATA_ROOT)")
        p.add_argument("--cache-dir", help="decoded-dataset cache (default: $DFML_CACHE_DIR)")

    datasets = sub.add_parser(
        "datasets", help="list datasets, build one's cache, or verify one's folder (no cache)"
    )
    datasets.add_argument("action", choices=["list", "prepare", "verify"])
    datasets.add_argument("name", nargs="?", default="glyphs", help="see `datasets list`")
    datasets.add_argument("--image-size", type=int)
    data_options(datasets)
    datasets.set_defaults(handler=_cmd_datasets)

    zoo = sub.add_parser("zoo", help="pre-train a model zoo from a recipe")
    zoo.add_argument("action", choices=["train"])
    zoo.add_argument("recipe", help="model_zoo_recipes/NAME.yaml")
    zoo.add_argument("--out", help="zoo folder (default: RESULTS/zoo/<recipe name>)")
    zoo.add_argument("--results-dir", default="results")
    zoo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    state_interval(zoo, "teacher's training")
    data_options(zoo)
    zoo.set_defaults(handler=_cmd_zoo)

    run = sub.add_parser("run", help="meta-train one method and evaluate it (writes records)")
    run.add_argument("--spec", help="full run spec as JSON (what the Snakefile passes)")
    run.add_argument("--from-record", help="rerun exactly the spec stored in a run record")
    state_interval(run, "run")
    run.add_argument("--config", help="workflow config YAML, with the four options below")
    run.add_argument("--scenario")
    run.add_argument("--method")
    run.add_argument("--shots", type=int)
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(handler=_cmd_run)

    collect = sub.add_parser("collect", help="gather run records into summary.csv")
    collect.add_argument("--results-dir", default="results")
    collect.add_argument("--output")
    collect.set_defaults(handler=_cmd_collect)

    table = sub.add_parser("table", help="write Markdown and LaTeX tables per scenario")
    table.add_argument("--results-dir", default="results")
    table.add_argument("--summary")
    table.add_argument("--out")
    table.set_defaults(handler=_cmd_table)

    report = sub.add_parser(
        "report", help="tables, figures and REPORT.md of a results folder (from summary.csv)"
    )
    report.add_argument("--results-dir", default="results")
    report.add_argument("--summary", help="default: RESULTS/summary.csv")
    report.add_argument(
        "--command",
        default="snakemake --cores all",
        help="the workflow command that produced the records, quoted in the report",
    )
    report.set_defaults(handler=_cmd_report)

    bench = sub.add_parser(
        "bench", help="run the pytest-benchmark suite; JSON and a Markdown table to results/bench"
    )
    bench.add_argument("--out", default=ResultsLayout().bench)
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--label", help="JSON name: bench-LABEL.json (default: the device type)")
    bench.add_argument("--select", help="pytest -k expression: run only matching benchmarks")
    bench.add_argument("--smoke", action="store_true", help="small sizes, for a quick check")
    bench.set_defaults(handler=_cmd_bench)

    methods = sub.add_parser("methods", help="list registered methods")
    methods.set_defaults(handler=_cmd_methods)

    estimate = sub.add_parser(
        "estimate", help="estimated wall time of every job of a config, from benchmark medians"
    )
    estimate.add_argument("config", help="workflow config YAML, e.g. config/paper-ss.yaml")
    estimate.add_argument(
        "--bench",
        default="results/reference/bench/bench-cpu.json",
        help="pytest-benchmark JSON of the device to estimate for (`dfml-bench bench`)",
    )
    estimate.set_defaults(handler=_cmd_estimate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except DfmlError as error:
        print(f"dfml-bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfml-bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
