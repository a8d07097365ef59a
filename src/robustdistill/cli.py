"""Command line: thin wrappers that parse arguments, build a config and call the library.

    robustdistill demo                                   the tour on the embedded digits
    robustdistill train CONFIG [key=value ...]           one run into runs/<name>/
    robustdistill train CONFIG --print-config            show the resolved config, train nothing
    robustdistill train CONFIG --estimate                time a few steps: how long the run will take
    robustdistill eval RUN_OR_CHECKPOINT [eval.k=v model.k=v ...] [--attacks clean,pgd20,autoattack_fast] [--strict]
    robustdistill report RUN1 RUN2 ...                   comparison table + robustness-fairness scatter
    robustdistill compare GRID.yaml [--jobs N] [--dry-run]  methods x seeds (x axes), intervals, paired differences
    robustdistill plot RUN                               temperature / weight trajectories to PNG
    robustdistill export RUN --format onnx|torchscript|safetensors|robustbench   the student, parity-checked
    robustdistill list [models|methods|datasets|attacks|checks]

A mistake in the input (bad key, unknown name, missing file, existing run folder) is reported
as one line `error: ...` with exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from pathlib import Path
from typing import Optional

from .api import evaluate
from .attacks import ATTACKS
from .core import __version__
from .core.distributed import cleanup, from_main, init_distributed, is_main_process
from .core.errors import UserError
from .core.schema import field_comments
from .core.timing import duration
from .data import DATASETS
from .evaluation.checks import CHECKS, failed, registered
from .evaluation.config import EvalConfig
from .evaluation.plots import plot_classwise, plot_run, plot_scatter
from .evaluation.report import (
    attack_table,
    check_lines,
    comparison_table,
    quoted_attack,
    read_report,
    report_threat,
    to_markdown,
    write_report,
)
from .export import FORMATS, export_run
from .methods import METHODS
from .models import MODELS
from .recipes import grid_names, recipe_names, summary
from .storage.evals import EvalFolder, check_out_folder
from .studies.demo import run_demo
from .studies.execute import compare_locally
from .studies.grid import Grid
from .studies.slurm import compare_on_slurm
from .training.config import load_config
from .training.estimate import Estimate, estimate
from .training.loop import train

log = logging.getLogger("robustdistill")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def _print_estimate(cfg, e: Estimate) -> int:
    if not is_main_process():
        return 0
    print(f"estimate for {cfg.run_dir} ({cfg.method.name}, {cfg.model.name} on {cfg.data.name}, {e.device}):")
    print(f"  one step        {1e3 * e.step:.1f} ms (median of the timed steps, after 2 warm-up steps)")
    print(f"  one epoch       {duration(e.epoch)} ({e.steps_per_epoch} steps)")
    print(f"  one validation  {duration(e.validation)}")
    print(f"  training        about {duration(e.total)}: {e.epochs} epochs, {e.validations} validations")
    print(
        "  not included: compilation (train.compile), checkpoint writes, "
        f"the final evaluation ({', '.join(e.final_attacks)})"
    )
    if e.folder_note:
        print(f"note: {e.folder_note}")
    print("nothing was written")
    return 0


def _cmd_train(args) -> int:
    if args.resume:
        run_dir = Path(args.config)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--resume takes a run folder with a config.yaml; {run_dir} has none")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        cfg.out_dir, cfg.name = str(run_dir.parent), run_dir.name
    else:
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.estimate:
        return _print_estimate(cfg, estimate(cfg, force=args.force, resume=args.resume))
    run_dir = train(cfg, force=args.force, resume=args.resume)
    if not is_main_process():  # under torchrun, rank 0 speaks for the run
        return 0
    print(f"run folder: {run_dir}")
    report = read_report(run_dir / "report.json")
    print(f"threat model: {report_threat(report).describe()}")
    print(attack_table(report))
    for line in check_lines(report):
        print(line)
    return 0


def _warn_failed_checks(report: dict) -> list:
    bad = failed(report.get("checks", []))
    for c in bad:
        print(
            f"WARNING: sanity check {c['id']} ({c['name']}) FAILED: {c['message']}; numbers: {c['numbers']}",
            file=sys.stderr,
        )
    return bad


def _cmd_eval(args) -> int:
    """One evaluation, in one process or under torchrun: every rank joins the group and attacks its
    blocks of samples; rank 0 alone chooses, creates and locks the folder, writes and prints."""
    dist = init_distributed(args.device)
    overrides = _flag_overrides(args) + args.overrides
    folder = EvalFolder(args.target, args.out)
    out_dir = from_main(folder.claim)
    try:
        if dist.is_main and folder.resumes():
            log.info("resuming the AutoAttack state in %s", out_dir)
        report = evaluate(
            args.target,
            overrides,
            which=args.checkpoint,
            split=args.split,
            data=args.data,
            data_root=args.data_root,
            model=args.model,
            device=args.device,
            model_dir=args.model_dir,
            state_dir=out_dir,
            dist=dist,
        )
        return _write_evaluation(args, out_dir, report) if dist.is_main else 0
    except KeyboardInterrupt:
        if dist.is_main and folder.resumes():
            log.info(
                "interrupted; AutoAttack's progress is kept: to continue, robustdistill eval %s --out %s",
                args.target,
                out_dir,
            )
        raise
    finally:
        if dist.is_main:
            folder.close()


def _write_evaluation(args, out_dir: Path, report: dict) -> int:
    """The report into `out_dir`, its table (and W-Robust Acc, the checks, failed checks) printed."""
    title = f"Evaluation of {args.target}"
    write_report(out_dir, report, title=title)
    _try_plot(lambda: plot_classwise(report, out_dir / "classwise.png"))
    if not args.verbose:  # the markdown says it
        print(f"threat model: {report_threat(report).describe()}")
    print(to_markdown(report, title=title) if args.verbose else attack_table(report))
    if "w_robust" in report:
        w = report["w_robust"]
        print(f"W-Robust Acc {100 * w['value']:.2f} %  ({w['definition']})")
    for line in check_lines(report):
        print(line)
    print(f"report: {out_dir / 'report.json'}")
    bad = _warn_failed_checks(report)
    return 1 if bad and args.strict else 0


# eval's short flags: each is an alias of one eval.<key> override
EVAL_FLAGS = {
    "attacks": "eval.attacks",
    "norm": "eval.norm",
    "eps": "eval.eps",
    "step_size": "eval.step_size",
    "restarts": "eval.restarts",
    "square_queries": "eval.square_queries",
    "surrogate": "eval.surrogate",
    "surrogate_model": "eval.surrogate_model.name",
    "subset": "eval.subset",
    "batch_size": "eval.batch_size",
    "seed": "eval.seed",
    "corruptions": "eval.corruptions",
}


def _flag_overrides(args) -> list[str]:
    """The short flags of `eval` as dotted overrides (values written as JSON, which YAML reads back
    verbatim, so a path stays a string)."""
    if args.steps is not None:
        raise UserError(f"--steps is gone: the steps are in the attack's name (--attacks clean,pgd{args.steps})")
    out = []
    for flag, key in EVAL_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "attacks":
            value = [a.strip() for a in value.split(",") if a.strip()]
        out.append(f"{key}={json.dumps(value)}")
    if args.no_checks:
        out.append("eval.checks=false")
    return out


def _try_plot(draw) -> None:
    """Plots are a bonus where matplotlib is installed (the `plot` extra)."""
    try:
        draw()
    except UserError as exc:
        log.info("%s", exc)


def _cmd_report(args) -> int:
    out = Path(args.out) if args.out else Path("reports") / f"compare-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    check_out_folder(out)
    named = []
    for item in args.runs:
        path = Path(item)
        report_path = path / "report.json" if path.is_dir() else path
        if not report_path.is_file():
            raise UserError(f"{item} has no report.json (is it a finished run or an eval folder?)")
        named.append((path.name if path.is_dir() else path.parent.name, read_report(report_path)))
    lacking = [name for name, report in named if args.attack is not None and args.attack not in report["attacks"]]
    if lacking:
        common = sorted(set.intersection(*(set(report["attacks"]) for _, report in named)))
        raise UserError(
            f"--attack {args.attack} is not in the report of {', '.join(lacking)} "
            f"(attacks every report has: {', '.join(common) or 'none'})"
        )
    if (out / "comparison.md").exists():
        raise UserError(f"{out} already holds a comparison; choose another --out")
    robust = args.attack or quoted_attack(named)
    table = comparison_table(named, robust)  # refuses reports that share no attack, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(f"# Comparison ({robust})\n\n{table}\n")
    _try_plot(lambda: plot_scatter(named, out / "scatter.png", robust))
    print(table)
    print(f"\ncomparison: {out}/")
    return 0


def _cmd_compare(args) -> int:
    command = f"robustdistill compare {args.grid}" + (f" --out {args.out}" if args.out else "")
    command += f" --into {args.into}" if args.into else ""
    if args.slurm and args.executor != "slurm" and not args.status:
        raise UserError("--slurm KEY=VALUE sets the jobs' resources: it needs --executor slurm")
    if (args.executor == "slurm" or args.status) and not args.dry_run:
        command += " --executor slurm"
        out, reported = compare_on_slurm(
            args.grid, args.out, command, args.into, args.slurm or [], show_status=args.status, wait_for=args.wait
        )
        if reported:
            print(f"\ncomparison: {out}/ (report.md, report.json, cells.csv)")
        return 0
    if args.wait:
        raise UserError("--wait waits for SLURM jobs: it needs --executor slurm")
    out = compare_locally(args.grid, args.out, dry_run=args.dry_run, command=command, jobs=args.jobs, into=args.into)
    if not args.dry_run:
        print((out / "report.md").read_text())
        print(f"comparison: {out}/ (report.md, report.json, cells.csv)")
    return 0


def _cmd_demo(args) -> int:
    table = run_demo(args.out, force=args.force, epochs=args.epochs, into=args.into, jobs=args.jobs)
    print(table)
    print(f"\nteachers: {args.out}/natural, {args.out}/trades; students and the table: {args.out}/demo/")
    return 0


def _cmd_plot(args) -> int:
    if not (Path(args.run) / "metrics.jsonl").is_file():
        raise UserError(f"{args.run} is not a run folder (no metrics.jsonl)")
    if args.out is not None:
        check_out_folder(Path(args.out))
    written = plot_run(args.run, args.out)
    if not written:
        print(f"nothing to plot in {args.run}")
    for path in written:
        print(path)
    return 0


def _cmd_export(args) -> int:
    out, manifest = export_run(
        args.run,
        args.format,
        out=args.out,
        images=args.images,
        atol=args.atol,
        rtol=args.rtol,
        allow_failed_checks=args.allow_failed_checks,
        name=args.name,
    )
    files = ", ".join(str(out / f["path"]) for f in manifest["files"].values())
    print(f"exported {args.run} (epoch {manifest['model']['epoch']}) as {args.format}: {files}")
    parity = manifest["parity"]
    print(
        f"parity passed on {parity['images']} test images ({parity['runtime']}): all predictions equal, "
        f"max |logit difference| {parity['max_abs_logit_diff']:.2e}"
    )
    acc = manifest["accuracy"]
    for attack in ("clean", "autoattack", "pgd20"):
        if attack in acc:
            low, high = acc[attack]["interval_95"]
            print(f"  {attack:<10} {100 * acc[attack]['value']:.2f} %  [{100 * low:.2f}, {100 * high:.2f}]")
    if not manifest["autoattack"]:
        print("note: the run's report has no standard AutoAttack: the manifest quotes no robust accuracy under it")
    print(f"manifest: {out / 'manifest.json'}")
    return 0


LISTED = ["models", "methods", "datasets", "attacks", "checks", "recipes", "grids"]


def _cmd_list(args) -> int:
    registries = {"models": MODELS, "methods": METHODS, "datasets": DATASETS, "attacks": ATTACKS, "checks": CHECKS}
    for kind in [args.kind] if args.kind else LISTED:
        if kind in ("recipes", "grids"):
            names = recipe_names() if kind == "recipes" else grid_names()
            how = "robustdistill train NAME" if kind == "recipes" else "robustdistill compare NAME"
            print(f"{kind} (shipped with the package; {how}):")
            for name in names:
                print(f"  {name:16s} {summary(name, 'digits' if kind == 'recipes' else 'grids')}")
            continue
        if kind == "checks":
            print("checks (run with every evaluation; a failure says the numbers may overestimate robustness):")
            for c in registered():
                print(f"  {c.id} {c.name:16s} {c.asserts}")
            continue
        print(f"{kind}: {', '.join(registries[kind].names())}")
        if kind == "attacks" and args.verbose:
            for name in ATTACKS.names():
                attack = ATTACKS.get(name)
                print(f"  {name:16s} {attack.kind:10s} {attack.help}")
        if kind == "methods":
            for name in METHODS.names():
                method = METHODS.get(name)
                teachers = ", ".join(method.teachers) or "-"
                print(f"  {name:8s} teachers: {teachers:14s} {method.summary}")
                if args.verbose:
                    print(f"           {method.paper}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the tool's error style: one line, exit code 2 (raised, so `main` reports it)."""

    def error(self, message: str):
        raise UserError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustdistill", description="Adversarial robustness distillation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more detail in logs and tables")
    parser.add_argument("--version", action="version", version=f"robustdistill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_eval, _add_report, _add_compare, _add_demo, _add_plot, _add_export, _add_list):
        add(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one run from a YAML config")
    p.add_argument("config", help="YAML config file (or, with --resume, a run folder)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5 attack.eps=8/255")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="time 10 training steps and one validation, print how long the run will take; write nothing",
    )
    p.add_argument("--force", action="store_true", help="replace an existing run folder of the same name")
    p.add_argument("--resume", action="store_true", help="continue the run folder given instead of a config")
    p.set_defaults(func=_cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a run folder, a checkpoint file or robustbench:<Name>")
    p.add_argument(
        "target", help="run folder, checkpoint (.safetensors, or .pt/.pth state dict), or robustbench:<Name>[@<threat>]"
    )
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides in train's grammar: eval.* (e.g. eval.subset=100 eval.restarts=5), "
        "model.* (a foreign state dict's architecture: model.name, model.kwargs.width=16), data.*, teachers.*; "
        "the flags below are short aliases",
    )
    p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint of a run folder")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")
    p.add_argument("--attacks", help=f"comma-separated: {','.join(ATTACKS.names())} (robustdistill -v list attacks)")
    p.add_argument(
        "--norm", help="eval.norm: the threat model's norm, linf or l2 (default: the run's; another one needs --eps)"
    )
    p.add_argument("--eps", help="eval.eps: the budget, e.g. 8/255 under linf, 0.5 under l2 (default: the run's)")
    p.add_argument("--step-size", help="eval.step_size: the PGD step (default eps/4)")
    p.add_argument("--steps", help=argparse.SUPPRESS)  # gone: the steps are in the attack's name
    p.add_argument(
        "--restarts", type=int, help=f"eval.restarts of PGD, CW and transfer (default {EvalConfig.restarts})"
    )
    p.add_argument("--square-queries", type=int, help=f"eval.square_queries (default {EvalConfig.square_queries})")
    p.add_argument(
        "--surrogate",
        help="the transfer attack's source model (run folder or checkpoint; default: the run's robust teacher)",
    )
    p.add_argument(
        "--surrogate-model", help="the surrogate's architecture name, for a foreign state dict (e.g. wrn34_10)"
    )
    p.add_argument("--subset", type=int, help="evaluate on the first N images only")
    p.add_argument(
        "--corruptions", help="a CIFAR-10-C style folder (labels.npy, <corruption>.npy): accuracy per corruption"
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-checks", action="store_true", help="skip the sanity checks")
    p.add_argument(
        "--strict", action="store_true", help="exit with code 1 if a sanity check fails (robustdistill list checks)"
    )
    p.add_argument("--data", help="dataset name (for checkpoints that do not record it)")
    p.add_argument("--data-root", help="dataset folder (overrides the recorded one)")
    p.add_argument("--model", help="model.name: a foreign state dict's architecture (options: model.kwargs.KEY=VALUE)")
    p.add_argument("--model-dir", help="RobustBench's local model directory (default: models)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--out", help="report folder (default: a new eval-<time> folder); an unfinished one resumes AutoAttack"
    )
    p.set_defaults(func=_cmd_eval)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="compare finished runs: one table and a robustness-fairness scatter")
    p.add_argument("runs", nargs="+", help="run folders, eval folders or report.json files")
    p.add_argument(
        "--attack", help="the attack to quote robustness under (default: the strongest the reports share, AutoAttack)"
    )
    p.add_argument("--out", help="folder for comparison.md and scatter.png (default: reports/compare-<time>)")
    p.set_defaults(func=_cmd_report)


def _add_compare(sub) -> None:
    keys = "\n".join(f"  {key:10s} {meaning}" for key, meaning in field_comments(Grid).items())
    p = sub.add_parser(
        "compare",
        help="train a grid of methods x seeds (x axes) and compare them with intervals",
        epilog=f"the keys of a grid file:\n{keys}\n(robustdistill list grids: the shipped grids)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("grid", help="a grid file (YAML; its keys below), or the name of a shipped grid")
    p.add_argument("--out", help="the grid's folder: its runs and the report (default: comparisons/<grid name>)")
    p.add_argument("--dry-run", action="store_true", help="list the runs, which are finished, and the time to train")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, each in its own process (give them train.threads)"
    )
    p.add_argument("--into", help="also write the report into this markdown file, between <!-- compare:NAME:... -->")
    p.add_argument(
        "--executor",
        choices=["local", "slurm"],
        default="local",
        help="local: train here (default); slurm: submit the runs as SLURM jobs (submitit) and return",
    )
    p.add_argument("--status", action="store_true", help="show each run's state (finished, running, queued, failed)")
    p.add_argument("--wait", action="store_true", help="with --executor slurm: wait for the jobs, then report")
    p.add_argument(
        "--slurm",
        action="append",
        metavar="KEY=VALUE",
        help="override a key of the grid's slurm section (partition, time_min, gpus_per_node, ...); repeatable",
    )
    p.set_defaults(func=_cmd_compare)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="teachers, students and a comparison on the embedded digits")
    p.add_argument(
        "--out",
        default="runs",
        help="folder of the demo's runs: OUT/natural, OUT/trades (where the digits "
        "recipes look for their teachers) and OUT/demo/<student>",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the recipes', 30)")
    p.add_argument("--into", help="also write the table into this markdown file, between <!-- demo:begin/end -->")
    p.add_argument("--jobs", type=int, help="runs trained at once, one thread each (default: one per core, at most 2)")
    p.set_defaults(func=_cmd_demo)


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's temperature / loss-weight trajectories and class-wise accuracy")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", help="folder for the PNGs (default: RUN/plots)")
    p.set_defaults(func=_cmd_plot)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a finished run's student: ONNX, TorchScript, safetensors, RobustBench")
    p.add_argument("run", help="a finished run folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", help="a new folder for the files and manifest.json (default: RUN/export-FORMAT)")
    p.add_argument("--images", type=int, default=256, help="test images the parity check compares on")
    p.add_argument("--atol", type=float, default=1e-4, help="parity: a logit may differ by atol + rtol * |logit|")
    p.add_argument("--rtol", type=float, default=1e-4, help="parity: see --atol")
    p.add_argument("--allow-failed-checks", action="store_true", help="export a run that failed a sanity check")
    p.add_argument("--name", help="the model's name in RobustBench's files (default: the run folder's name)")
    p.set_defaults(func=_cmd_export)


def _add_list(sub) -> None:
    p = sub.add_parser(
        "list", help="list registered models, methods, datasets, attacks, sanity checks; shipped recipes and grids"
    )
    p.add_argument("kind", nargs="?", choices=LISTED)
    p.set_defaults(func=_cmd_list)


def _parse(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> argparse.Namespace:
    """Parse; `key=value` overrides of `train` may also come after its flags (`train RUN --resume k=v`)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command in ("train", "eval") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            raise UserError(f"unrecognized arguments: {' '.join(extra)} (see 'robustdistill {args.command} --help')")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = _parse(build_parser(), argv)
        _setup_logging(args.verbose)
        return args.func(args)
    except UserError as exc:
        if is_main_process():  # under torchrun every rank fails alike; one says why
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what was kept, and how to continue, was said where it was known
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()  # leave the DDP process group before exit (gloo aborts the process otherwise)


if __name__ == "__main__":
    sys.exit(main())
