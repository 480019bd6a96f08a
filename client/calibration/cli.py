"""`flexcache-calibrate`: measure, fit and (optionally) install a namespace's step tables.

    flexcache-calibrate --sampler my_pkg.cal:sampler --scorer my_pkg.cal:clip_score \
        --prompts prompts.txt --max-loss 1.0 --out calibration/ [--apply 127.0.0.1:50051 --token ...]

`--sampler` names a factory (module:attribute, called with no arguments) returning a `Sampler`;
`--scorer` a `score(prompt, video) -> float` (a class is instantiated with no arguments first).
The reference model has its own front end with both filled in: `flexcache-model calibrate --prompts ...` (same options).
`--prompts`: one prompt per line; repeats and rewordings are welcome (they are the similarities a
serving trace brings). Writes to `--out`: tables.json (what `--apply` installs), calibration.md (the
report), calibration.png (the plot, with matplotlib) and trials.jsonl (every paired trial; `--trials`
refits from it without sampling again). `--apply` sets the tables on a daemon (an admin call:
SetStepTables) for `--namespace` or the sampler's own `namespace`.

Exit codes: 0 done; 2 bad arguments or input (one sentence on stderr); 3 the daemon did not take the
tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..base import Namespace
from ..tables import StepTables
from .fit import PART_EDGES, WHOLE_EDGES, Fit, fit
from .measure import TABLES, Measurement, Trial, measure
from .report import markdown, plot

__all__ = ["CalibrationError", "add_arguments", "main", "parse_namespace", "run"]

log = logging.getLogger("flexcache.client.calibration")


class CalibrationError(Exception):
    """Bad arguments or input: the CLI prints the message as its one sentence and exits 2."""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(sorted(float(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every front end shares (the sampler and scorer are the front end's)."""
    ap.add_argument("--prompts", type=Path, help="prompt file, one per line (not needed with --trials)")
    ap.add_argument("--trials", type=Path, help="refit the trials.jsonl of an earlier run instead of sampling")
    ap.add_argument("--max-loss", type=float, default=1.0, help="budget: mean paired loss, in the scorer's points")
    ap.add_argument("--confidence", type=float, default=0.9, help="of the upper bound held to the budget")
    ap.add_argument("--min-trials", type=int, default=30, help="trials a bin needs at a K before it is granted")
    ap.add_argument("--tables", default=",".join(TABLES), help=f"which tables to measure, of {', '.join(TABLES)}")
    ap.add_argument("--whole-ks", type=_floats, default=None,
                    help="fractions of N to try whole-prompt starts at (default 0.1, 0.2, ... 0.9)")
    ap.add_argument("--part-ks", type=_floats, default=None,
                    help="fractions of N for composed and partial starts (default 0.1 ... 0.5)")
    ap.add_argument("--donors", type=int, default=3, help="whole-prompt donors tried per request")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0: all)")
    ap.add_argument("--whole-bins", type=_floats, default=WHOLE_EDGES, help="similarity bin edges, whole prompts")
    ap.add_argument("--part-bins", type=_floats, default=PART_EDGES, help="bin edges, composed and partial")
    ap.add_argument("--out", type=Path, default=Path("calibration"), help="folder for the outputs")
    ap.add_argument("--apply", metavar="HOST:PORT", default="", help="install the tables on this daemon")
    ap.add_argument("--namespace", default="", help="tenant/model/WxHxF/scheduler/steps to install them for "
                    "(default: the sampler's)")
    ap.add_argument("--token", default=None, help="an admin's bearer token (or FLEXCACHE_CLIENT_TOKEN)")


def parse_namespace(text: str) -> Namespace:
    """'tenant/model/WxHxF/scheduler/steps' (the daemon's namespace name) -> Namespace."""
    parts = text.split("/")
    try:
        tenant, model, size, scheduler, steps = parts
        w, h, f = (int(x) for x in size.split("x"))
        return Namespace(tenant, model, w, h, f, scheduler, int(steps))
    except ValueError:
        raise CalibrationError(f"--namespace {text!r} is not tenant/model/WxHxF/scheduler/steps") from None


def load(spec: str, what: str) -> Any:
    """module:attribute, imported; CalibrationError naming the problem otherwise."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise CalibrationError(f"--{what} {spec!r} must be module:attribute")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise CalibrationError(f"--{what} {spec!r} cannot be loaded: {exc}") from None


def _read_prompts(path: Path, limit: int) -> list[str]:
    try:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise CalibrationError(f"cannot read --prompts {path}: {exc.strerror}") from None
    prompts = prompts[:limit] if limit else prompts
    if len(prompts) < 2:
        raise CalibrationError(f"--prompts {path} has {len(prompts)} prompt(s); calibration needs at least two")
    return prompts


def _read_trials(path: Path) -> tuple[dict[str, Any], list[Trial], list[str] | None]:
    try:
        lines = path.read_text().splitlines()
        head = json.loads(lines[0])
        trials = [Trial(**{**json.loads(line), "donors": tuple(json.loads(line)["donors"])}) for line in lines[1:]]
        prompts = head.get("prompts")
        int(head["total_steps"])
        return head, trials, prompts if isinstance(prompts, list) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CalibrationError(f"--trials {path} is not a trials.jsonl this tool wrote ({exc})") from None


def _grid(args: argparse.Namespace, total_steps: int) -> dict[str, tuple[int, ...]]:
    """The K grids the options ask for (fractions of N -> steps); the tables left out keep measure's defaults."""
    def steps(fractions: Sequence[float]) -> tuple[int, ...]:
        if any(not 0 < f < 1 for f in fractions):
            raise CalibrationError("K fractions must be between 0 and 1")
        return tuple(sorted({max(1, min(total_steps - 1, round(f * total_steps))) for f in fractions}))
    grid: dict[str, tuple[int, ...]] = {}
    if args.whole_ks:
        grid["whole"] = steps(args.whole_ks)
    if args.part_ks:
        grid.update({t: steps(args.part_ks) for t in TABLES if t != "whole"})
    return grid


NOTHING = ((-1.0, 0.0),)  # a list that grants nothing (an empty one would be derived by the daemon from `whole`)
NOTHING_COMPOSED = ((-1.0, -1.0, 0.0),)


def fitted_tables(result: Fit) -> StepTables:
    """The fit as the daemon takes it: every list explicit, a table that grants nothing as one tier of 0."""
    return StepTables(whole=result.whole or NOTHING, composed=result.composed or NOTHING_COMPOSED,
                      partial_object=result.partial_object or NOTHING,
                      partial_background=result.partial_background or NOTHING, max_loss=result.max_loss)


def run(args: argparse.Namespace, make_sampler: Callable[[], Any] | None, make_scorer: Callable[[], Any] | None,
        namespace: Callable[[Any], Namespace] | None = None) -> int:
    """Measure (or reload) trials, fit, write the outputs, apply: the whole CLI after argument parsing."""
    tables = tuple(t.strip() for t in args.tables.split(",") if t.strip())
    if set(tables) - set(TABLES):
        raise CalibrationError(f"--tables: unknown table {sorted(set(tables) - set(TABLES))[0]!r}; "
                               f"the tables are {', '.join(TABLES)}")
    sampler = None
    measurement: Measurement | None = None
    summary = ""
    if args.trials:
        head, trials, prompts = _read_trials(args.trials)
        total_steps = int(head["total_steps"])
        if "summary" in head:
            summary = f"{head['summary']} (sampled by an earlier run; refitted from {args.trials.name})"
    else:
        if args.prompts is None:
            raise CalibrationError("give --prompts to sample, or --trials to refit an earlier run")
        if make_sampler is None or make_scorer is None:
            raise CalibrationError("sampling needs --sampler and --scorer")
        prompts = _read_prompts(args.prompts, args.limit)
        sampler, scorer = make_sampler(), make_scorer()
        ks = _grid(args, sampler.total_steps)
        args.out.mkdir(parents=True, exist_ok=True)  # before sampling, so an unwritable folder fails first
        measurement = measure(sampler, scorer, prompts, tables=tables, donors=args.donors, progress=log.info, ks=ks)
        total_steps, trials = measurement.total_steps, measurement.trials
        with (args.out / "trials.jsonl").open("w") as f:
            summary = measurement.summary()
            f.write(json.dumps({"total_steps": total_steps, "prompts": prompts, "summary": summary}) + "\n")
            for t in trials:
                f.write(json.dumps(dataclasses.asdict(t)) + "\n")
    try:
        # trials of one prompt text (its repeats, its donors) share its difficulty: clustered by text
        result = fit(trials, total_steps, max_loss=args.max_loss, confidence=args.confidence,
                     min_trials=args.min_trials, whole_edges=args.whole_bins, part_edges=args.part_bins,
                     clusters=prompts)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    report = markdown(result, summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.md").write_text("# Calibration\n\n" + report)
    (args.out / "tables.json").write_text(json.dumps(fitted_tables(result).to_json(), indent=1) + "\n")
    plotted = plot(result, args.out / "calibration.png")
    print(report)
    written = ["tables.json", "calibration.md"] + ([] if args.trials else ["trials.jsonl"])
    print(f"wrote {args.out}/{', '.join(written)}" + (", calibration.png" if plotted else
                                                      " (no plot: matplotlib is not installed)"))
    if args.apply:
        ns = parse_namespace(args.namespace) if args.namespace else None
        if ns is None and namespace is not None and (sampler is not None or make_sampler is not None):
            ns = namespace(sampler if sampler is not None else make_sampler())  # the sampler's own namespace
        if ns is None:
            raise CalibrationError("--apply needs --namespace (tenant/model/WxHxF/scheduler/steps)")
        return _apply(args.apply, ns, result, args.token)
    return 0


def _apply(target: str, ns: Namespace, result: Fit, token: str | None) -> int:
    from ..client import CacheClient

    tables = fitted_tables(result)
    with CacheClient(target, ns, token=token, timeout_s=10.0) as client:
        applied = client.set_step_tables(tables)
    if applied is None:
        print(f"flexcache-calibrate: the daemon at {target} did not take the tables (see the warning above)",
              file=sys.stderr)
        return 3
    print(f"installed on {target} for {ns.tenant}/{ns.model} (source: {applied.source})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flexcache-calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sampler", default="", help="module:factory returning a Sampler")
    ap.add_argument("--scorer", default="", help="module:callable: score(prompt, video) -> float")
    add_arguments(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        make_sampler = load(args.sampler, "sampler") if args.sampler else None
        scorer = load(args.scorer, "scorer") if args.scorer else None
        make_scorer = None if scorer is None else (scorer if isinstance(scorer, type) else (lambda: scorer))
        return run(args, make_sampler, make_scorer, lambda s: getattr(s, "namespace", None))
    except CalibrationError as exc:
        print(f"flexcache-calibrate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output folder that cannot be written
        print(f"flexcache-calibrate: cannot write {exc.filename or 'the outputs'}: {exc.strerror}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
