"""Command line: ``e2e-search run | validate | best``.

Bad input (YAML, data files, flags) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="e2e-search", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{run,validate,best,data}", parser_class=_Parser)

    r = sub.add_parser("run", help="run a search from a search-space YAML")
    r.add_argument("file", help="search-space YAML (see search_spaces/)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override a key before validation (repeatable), e.g. --set data.path=jets.h5")
    r.add_argument("--address", help="address of a running Ray cluster (default: start a local one)")
    r.add_argument("--dry-run", action="store_true", help="validate config and data, show the plan, run nothing")
    r.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")

    v = sub.add_parser("validate", help="check a search-space YAML (and its data file) without running")
    v.add_argument("file")
    v.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.SUB=VALUE")

    d = sub.add_parser("data", help="simulated physics datasets")
    dsub = d.add_subparsers(dest="data_cmd", required=True, metavar="{generate}", parser_class=_Parser)
    g = dsub.add_parser("generate", help="Pythia 8 + FastJet events -> E2E HDF5 (parallel Ray tasks)")
    g.add_argument("process", help="top_vs_qcd | quark_vs_gluon | boosted_scalar | event_objects")
    g.add_argument("--n", type=int, required=True, help="number of jets (events for event_objects), class-balanced")
    g.add_argument("--out", required=True, help="output HDF5 file (written atomically)")
    g.add_argument("--seed", type=int, default=1, help="Pythia seed base, 1..900000000 (default 1)")
    g.add_argument("--workers", type=int, default=1, help="parallel Ray tasks, one seed each (default 1)")
    g.add_argument("--address", help="address of a running Ray cluster (the output must be on shared storage)")
    g.add_argument("--channels", default="ECAL,HCAL,Tracks", help="image channels in order (default ECAL,HCAL,Tracks)")
    g.add_argument("--image-size", type=int, default=125, help="pixels per side (default 125)")
    g.add_argument("--mass-range", default="50,200", help="boosted_scalar: LOW,HIGH in GeV (default 50,200)")
    g.add_argument("--decay", choices=["bb", "gammagamma"], default="bb", help="boosted_scalar decay (default bb)")
    g.add_argument("--per-mass", type=int, default=200, help="boosted_scalar: jets per mass point (default 200)")

    b = sub.add_parser("best", help="rank the finished trials of an experiment (reads MLflow only)")
    b.add_argument("experiment")
    b.add_argument("--metric", help="rank by this metric (default: the search metric)")
    b.add_argument("--mode", choices=["min", "max"])
    b.add_argument("--top", type=int, default=5)
    b.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///e2e_runs/mlflow.db)")
    return p


def _plan(args, cfg, **kwargs):
    """``plan()`` (data file, GPUs), its errors naming the YAML and the ``--set`` that led there."""
    from .config import set_keys, source_of
    from .search import plan

    try:
        return plan(cfg, **kwargs)
    except UserError as e:
        raise e.with_source(source_of(args.file, set_keys(args.sets), e.key)) from None


def _cmd_validate(args) -> int:
    from .config import load
    from .search import describe

    cfg = load(args.file, args.sets)
    print(describe(_plan(args, cfg, generate=False)))
    print(f"{args.file}: valid")
    return 0


def _cmd_run(args) -> int:
    from .config import dump, load
    from .search import describe, execute

    cfg = load(args.file, args.sets)
    if args.dry_run:
        p = _plan(args, cfg, address=args.address, generate=False)
        print(describe(p))
        print("--- resolved search space ---")
        print(dump(cfg), end="")
        print("dry run: nothing started")
        return 0
    p = _plan(args, cfg, address=args.address)
    print(describe(p), flush=True)
    out = execute(p, address=args.address, verbose=args.verbose)
    failed = sum(1 for s in out.trials.values() if s == "FAILED")
    print(f"\nsearch done: {len(out.trials)} trials, {out.stopped_early} stopped early by the scheduler, {failed} failed")
    if out.best is None:
        print("no trial finished: see the errors above and in MLflow (tag e2e.error)", file=sys.stderr)
        return 1
    b = out.best
    metric = cfg.metrics[0]
    print(f"best trial: run {out.best_run_id}  {metric}={b['value']:.4f} at epoch {b['epoch']}")
    _print_best(out.tracking_uri, out.experiment, metric, cfg.modes[0], 3)
    print(f"\nopen the MLflow UI:  mlflow ui --backend-store-uri {out.tracking_uri} --host 127.0.0.1")
    return 0


def _print_best(uri: str, experiment: str, metric: str | None, mode: str | None, top: int) -> None:
    from .tracking import top_trials

    metric, mode, runs = top_trials(uri, experiment, metric=metric, mode=mode, top=top)
    print(f"top {len(runs)} trials of '{experiment}' by {metric} ({mode}):")
    print(f"  {'rank':>4}  {'run id':32}  {'trial':>16}  {metric:>12}  {'epoch':>5}  params")
    for i, r in enumerate(runs, 1):
        m = r.data.metrics
        params = " ".join(f"{k}={v}" for k, v in sorted(r.data.params.items()))
        print(f"  {i:>4}  {r.info.run_id:32}  {r.data.tags.get('e2e.trial_id', '?'):>16}  "
              f"{m[f'best_{metric}']:>12.5g}  {int(m.get('best_epoch', 0)):>5}  {params}")


def _cmd_best(args) -> int:
    from .search import DEFAULT_WORKDIR
    from .tracking import tracking_uri

    if args.top <= 0:
        raise UserError(f"--top must be > 0 (got {args.top})", key="--top")
    uri = tracking_uri(args.tracking_uri, DEFAULT_WORKDIR)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {uri}; run a search first or give --tracking-uri", key="--tracking-uri")
    _print_best(uri, args.experiment, args.metric, args.mode, args.top)
    return 0


def _cmd_data(args) -> int:
    from .physics.generate import GenSpec, generate

    try:
        lo, hi = (float(v) for v in args.mass_range.split(","))
    except ValueError:
        raise UserError(f"expected LOW,HIGH in GeV (got '{args.mass_range}')", key="--mass-range") from None
    spec = GenSpec(process=args.process, n=args.n, out=args.out, seed=args.seed, workers=args.workers,
                   channels=[c.strip() for c in args.channels.split(",") if c.strip()], image_size=args.image_size,
                   mass_range=(lo, hi), decay=args.decay, per_mass=args.per_mass)
    r = generate(spec, address=args.address)
    print(f"wrote {r['n']} examples of {args.process} to {r['out']} in {r['seconds']:.1f}s "
          f"({r['per_second']:.1f}/s, {r['events']} events generated)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    try:
        return {"run": _cmd_run, "validate": _cmd_validate, "best": _cmd_best, "data": _cmd_data}[args.cmd](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished trials are in MLflow", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
