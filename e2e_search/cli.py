"""Command line: ``e2e-search run | resume | confirm | validate | best | report | ui | export | data``.

Bad input (YAML, data files, flags) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from e2e_search.search.disk import DiskFull
from trainables.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="e2e-search", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True,
                           metavar="{run,resume,confirm,validate,best,report,ui,export,data}", parser_class=_Parser)
    _add_run(sub)
    _add_resume(sub)
    _add_confirm(sub)
    _add_validate(sub)
    _add_data(sub)
    _add_best(sub)
    _add_report(sub)
    _add_ui(sub)
    _add_export(sub)
    return p


def _add_run(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run a search from a search-space YAML")
    r.add_argument("file", help="search-space YAML (see search_spaces/)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.SUB=VALUE",
                   help="override a key before validation (repeatable), e.g. --set data.path=jets.h5")
    r.add_argument("--address", help="address of a running Ray cluster (default: start a local one)")
    r.add_argument("--dry-run", action="store_true", help="validate config and data, show the plan, run nothing")
    r.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    r.add_argument("--resume", action="store_true",
                   help="continue the latest interrupted search of this YAML's experiment; start one if there is none")


def _add_resume(sub: argparse._SubParsersAction) -> None:
    rs = sub.add_parser("resume", help="continue an interrupted search (driver killed, machine rebooted, Ctrl-C)")
    rs.add_argument("experiment", help="experiment (search name) whose latest search to continue")
    rs.add_argument("--search", metavar="RUN_ID", help="a search run of the experiment (default: the latest)")
    rs.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///e2e_runs/mlflow.db)")
    rs.add_argument("--address", help="address of a running Ray cluster (default: start a local one)")
    rs.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")


def _add_confirm(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("confirm", help="retrain the best trials of a finished search with several seeds, score them "
                       "once on the test split, move the champions to the best test mean")
    c.add_argument("experiment", help="experiment (search name) whose latest finished search to confirm")
    c.add_argument("--top", type=int, help="finalists: the K best trials by the search metric (default: the search's "
                   "search.confirm.top, else 3)")
    c.add_argument("--seeds", type=int, help="seeds per finalist, 1..N (default: search.confirm.seeds, else 3)")
    c.add_argument("--per-family", action="store_true", default=None,
                   help="the K best trials of each family (a search over families)")
    c.add_argument("--search", metavar="RUN_ID", help="a finished search run of the experiment (default: the latest)")
    c.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///e2e_runs/mlflow.db)")
    c.add_argument("--address", help="address of a running Ray cluster (default: start a local one)")
    c.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")


def _add_validate(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("validate", help="check a search-space YAML (and its data file) without running")
    v.add_argument("file")
    v.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.SUB=VALUE")


def _add_data(sub: argparse._SubParsersAction) -> None:
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


def _add_best(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("best", help="rank the finished trials of an experiment (reads MLflow only)")
    b.add_argument("experiment")
    b.add_argument("--metric", help="rank by this metric (default: the search metric)")
    b.add_argument("--mode", choices=["min", "max"])
    b.add_argument("--top", type=int, default=5)
    b.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///e2e_runs/mlflow.db)")


def _add_report(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("report", help="HTML leaderboard of a search (also logged to its MLflow search run)")
    rp.add_argument("experiment")
    rp.add_argument("--out", help="HTML file to write (default: e2e_runs/reports/EXPERIMENT.html)")
    rp.add_argument("--search", metavar="RUN_ID", help="a search run of the experiment (default: the latest)")
    rp.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///e2e_runs/mlflow.db)")


def _add_ui(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("ui", help="the MLflow UI on the search store (binds to 127.0.0.1 unless --host says otherwise)")
    u.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///e2e_runs/mlflow.db)")
    u.add_argument("--experiment", help="experiment whose runs table to link (default: that of the latest search)")
    u.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=5000, help="port (default 5000)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="a trained trial as an ONNX model, checked against PyTorch in onnxruntime")
    x.add_argument("source", metavar="SOURCE", help="RUN_ID | models:/NAME@ALIAS | PATH/checkpoint.pt")
    x.add_argument("--format", default="onnx", help="output format: onnx (default)")
    x.add_argument("--out", required=True, help="output file (written atomically; nothing is left on failure)")
    x.add_argument("--tracking-uri", help="MLflow tracking URI for RUN_ID and models:/ (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///e2e_runs/mlflow.db; the registry: $MLFLOW_REGISTRY_URI, else the tracking URI)")
    x.add_argument("--opset", type=int, help="ONNX opset to write, exactly (7 up to the newest onnx knows); refused, "
                   "naming the operator and the lowest opset that works, when the model needs a newer one "
                   "(default: the exporter's: 17 for torchscript, 20 for dynamo in torch 2.14)")
    x.add_argument("--exporter", default="auto", help="auto (default: torchscript, then dynamo) | torchscript | dynamo")
    x.add_argument("--runs", type=int, default=50, help="timed runs at batch 1 for the CPU latency table (0: no timing)")
    x.add_argument("--inputs", default="auto", help="raw: the graph takes rows as the data file holds them (layout, "
                   "every channel, units) and returns probabilities or the physical target; preprocessed: the "
                   "model's own input and output (logits, standardized target); sparse: the form whose cost follows "
                   "the hits (vit with token_keep nonempty: its non-empty patches; hit_transformer: its hit list); "
                   "auto (default): raw where the family can take it, else preprocessed (hit-list families)")


def _plan(args, cfg, **kwargs):
    """``plan()`` (data file, GPUs), its errors naming the YAML and the ``--set`` that led there."""
    from e2e_search.search.plan import plan
    from e2e_search.spec.loader import set_keys
    from trainables.errors import source_of

    try:
        p = plan(cfg, **kwargs)
    except UserError as e:
        raise e.with_source(source_of(args.file, set_keys(args.sets), e.key)) from None
    _print_notes(cfg)
    return p


def _print_notes(cfg) -> None:
    """What validation accepted but the user should know (once, after everything is checked)."""
    for note in cfg.notes:
        print(note, file=sys.stderr, flush=True)


def _cmd_validate(args) -> int:
    from e2e_search.search.plan import describe
    from e2e_search.spec.loader import load

    cfg = load(args.file, args.sets)
    print(describe(_plan(args, cfg, generate=False)))
    print(f"{args.file}: valid")
    return 0


def _cmd_run(args) -> int:
    from e2e_search.search.plan import describe
    from e2e_search.search.run import execute
    from e2e_search.spec.loader import dump, load

    cfg = load(args.file, args.sets)
    if args.dry_run:
        p = _plan(args, cfg, address=args.address, generate=False)
        print(describe(p))
        print("--- resolved search space ---")
        print(dump(cfg), end="")
        print("dry run: nothing started")
        return 0
    nothing = None
    if args.resume:  # continue the latest unfinished search, or start one when there is none
        from e2e_search.record.store import resolve_uri, sqlite_path
        from trainables.errors import NothingToResume
        from trainables.workdir import DEFAULT_WORKDIR

        uri = resolve_uri(cfg.tracking.uri, DEFAULT_WORKDIR)[0]
        try:
            db = sqlite_path(uri)
            if db is not None and not db.is_file():  # reading never creates a store
                raise NothingToResume(f"no experiment '{cfg.tracking.experiment}' (no MLflow store at {uri} yet)")
            assert cfg.tracking.experiment is not None  # SearchSpace's validator defaults it to the search's name
            return _resume(uri, cfg.tracking.experiment, None, args)
        except NothingToResume as e:
            nothing = e.message
    p = _plan(args, cfg, address=args.address)  # a refused search says only why
    if nothing:
        print(f"nothing to resume ({nothing}): starting a new search", file=sys.stderr, flush=True)
    print(describe(p), flush=True)
    return _then_confirm(cfg, execute(p, address=args.address, verbose=args.verbose), args)


def _cmd_resume(args) -> int:
    return _resume(_store(args.tracking_uri), args.experiment, args.search, args)


def _resume(uri: str, experiment: str, search: str | None, args) -> int:
    from e2e_search.search.plan import describe
    from e2e_search.search.run import execute, resumable

    p, r = resumable(uri, experiment, search, address=args.address)
    _print_notes(p.cfg)
    print(describe(p), flush=True)
    return _then_confirm(p.cfg, execute(p, address=args.address, verbose=args.verbose, resume=r), args)


def _then_confirm(cfg, out, args) -> int:
    """The search's outcome; then, with ``search.confirm`` in the YAML and a search that found a best trial,
    ``confirm`` of that search (e2e_search/confirm/run.py)."""
    rc = _report_outcome(cfg, out)
    if rc != 0 or cfg.search.confirm is None:
        return rc
    from e2e_search.confirm.run import run_cli

    print(f"\nconfirm (search.confirm: top {cfg.search.confirm.top}, seeds {cfg.search.confirm.seeds}):", flush=True)
    return run_cli(out.tracking_uri, out.experiment, search=out.parent_run_id, address=args.address,
                   verbose=args.verbose)


def _cmd_confirm(args) -> int:
    from e2e_search.confirm.run import run_cli

    for flag, v in (("--top", args.top), ("--seeds", args.seeds)):  # before the store is even opened
        if v is not None and v < 1:
            raise UserError(f"must be 1 or more (got {v}); e.g. {flag} 3", key=flag)
    return run_cli(_store(args.tracking_uri), args.experiment, search=args.search, top=args.top, seeds=args.seeds,
                   per_family=args.per_family, address=args.address, verbose=args.verbose)


def _report_outcome(cfg, out) -> int:
    failed = sum(1 for s in out.trials.values() if s == "FAILED")
    print(f"\nsearch done: {len(out.trials)} trials, {out.stopped_early} stopped early by the scheduler, {failed} failed")
    if out.error:
        print(f"error: recording the end of the search in MLflow failed ({out.error}); its run {out.parent_run_id} is "
              f"closed FAILED with tag e2e.error: fix the store ({out.tracking_uri}) and run "
              f"e2e-search resume {out.experiment} to record it again", file=sys.stderr)
        return 1
    metric = cfg.metrics[0]
    if out.best is None:  # say what happened: point at errors only when there are some
        unscored = len(out.trials) - failed
        if not out.trials:
            why = "no trial ran"
        elif not failed:
            why = (f"no trial reported a finite {metric}: all {unscored} ended with {metric} NaN or missing in every "
                   "epoch (e.g. a split without every class, or a loss that diverged); see the trials' metrics in "
                   "MLflow (e2e-search ui)")
        elif unscored:
            why = (f"no trial reported a finite {metric}: {failed} failed (see the errors above and in MLflow, tag "
                   f"e2e.error) and {unscored} ended with {metric} NaN or missing")
        else:
            why = "no trial finished: see the errors above and in MLflow (tag e2e.error)"
        print(why, file=sys.stderr)
        return 1
    b = out.best
    print(f"best trial: run {out.best_run_id}  {metric}={b['value']:.4f} at epoch {b['epoch']}")
    _print_best(out.tracking_uri, out.experiment, metric, cfg.modes[0], 3)
    uri_arg = "" if cfg.tracking.uri is None else f" --tracking-uri {out.tracking_uri}"
    print(f"\nreport:  e2e-search report {out.experiment}{uri_arg}\nMLflow UI:  e2e-search ui{uri_arg}")
    return 0


def _print_best(uri: str, experiment: str, metric: str | None, mode: str | None, top: int) -> None:
    from e2e_search.record.store import top_trials

    metric, mode, runs = top_trials(uri, experiment, metric=metric, mode=mode, top=top)
    print(f"top {len(runs)} trials of '{experiment}' by {metric} ({mode}):")
    print(f"  {'rank':>4}  {'run id':32}  {'trial':>16}  {metric:>12}  {'epoch':>5}  params")
    for i, r in enumerate(runs, 1):
        m = r.data.metrics
        params = " ".join(f"{k}={v}" for k, v in sorted(r.data.params.items()))
        print(f"  {i:>4}  {r.info.run_id:32}  {r.data.tags.get('e2e.trial_id', '?'):>16}  "
              f"{m[f'best_{metric}']:>12.5g}  {int(m.get('best_epoch', 0)):>5}  {params}")


def _store(arg: str | None) -> str:
    """The MLflow tracking URI: --tracking-uri, else MLFLOW_TRACKING_URI, else the work directory's SQLite store;
    a SQLite store must exist (reading never creates one)."""
    from e2e_search.record.store import store_uri
    from trainables.workdir import DEFAULT_WORKDIR

    return store_uri(arg, DEFAULT_WORKDIR)


def _cmd_best(args) -> int:
    if args.top <= 0:
        raise UserError(f"--top must be > 0 (got {args.top}); use --top 1 or more (default 5)", key="--top")
    _print_best(_store(args.tracking_uri), args.experiment, args.metric, args.mode, args.top)
    return 0


def _cmd_report(args) -> int:
    from e2e_search.analysis.report import write_report
    from trainables.names import file_name
    from trainables.workdir import DEFAULT_WORKDIR

    out = Path(args.out) if args.out else DEFAULT_WORKDIR / "reports" / f"{file_name(args.experiment)}.html"
    write_report(_store(args.tracking_uri), args.experiment, out, args.search)
    print(f"wrote {out} (also logged to the search run as report.html)")
    return 0


def _latest_search(uri: str, experiment: str | None) -> tuple[str | None, str | None, bool]:
    """(experiment id, search metric, whether its runs view is shared) of the latest e2e-search search in
    ``experiment`` (default: in the store)."""
    from mlflow.tracking import MlflowClient

    from e2e_search.record.runs_view import SHARED_VIEW_TAG, view_key
    from e2e_search.record.store import experiment_of

    client = MlflowClient(tracking_uri=uri)
    if experiment:
        ids = [experiment_of(client, experiment, key="--experiment").experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, filter_string="tags.`e2e.kind` = 'search'",
                               order_by=["attributes.start_time DESC"], max_results=1) if ids else []
    if not found:
        return (ids[0] if experiment else None), None, False
    exp_id, metric = found[0].info.experiment_id, found[0].data.tags.get("e2e.metric")
    shared = metric is not None and SHARED_VIEW_TAG + view_key(metric) in client.get_experiment(exp_id).tags
    return exp_id, metric, shared


def _port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on (MLflow's server would fail after our link was printed, and the
    link would open the other program). Raises UserError naming --port."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host or "127.0.0.1", port))
        except OSError as e:
            raise UserError(f"port {port} on {host} is in use by another program ({e.strerror}); choose a free one, "
                            f"e.g. --port {port + 1}", key="--port") from None


def _cmd_ui(args) -> int:
    from e2e_search.record.store import registry_uri

    uri = _store(args.tracking_uri)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535 (got {args.port}); use a free port, e.g. --port 5000", key="--port")
    _port_free(args.host, args.port)
    from e2e_search.record.runs_view import runs_link

    exp_id, metric, shared = _latest_search(uri, args.experiment)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    base = f"http://{'[' + host + ']' if ':' in host else host}:{args.port}"
    print(f"MLflow UI on {base} over {uri} (Ctrl-C stops it)", flush=True)
    if exp_id is not None:  # MLflow 3's UI opens an experiment on its GenAI overview: link the runs table
        print(f"runs of the latest search: {runs_link(base, exp_id, metric, shared)}", flush=True)
    # Only what the UI needs: MLflow's launcher and one uvicorn worker, no job runner (its huey consumers
    # serve GenAI jobs: 8 more processes and ~2 GB).
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    if registry_uri(uri) != uri:
        cmd += ["--registry-store-uri", registry_uri(uri)]
    os.execv(sys.executable, cmd)


def _cmd_export(args) -> int:
    from e2e_search.export.onnx import export, summary

    r = export(args.source, args.out, args.format, tracking_uri=args.tracking_uri, opset=args.opset,
               exporter=args.exporter, runs=args.runs, inputs=args.inputs)
    print(summary(r))
    return 0


def _cmd_data(args) -> int:
    from e2e_search.data.physics.generate import GenSpec, generate

    try:
        lo, hi = (float(v) for v in args.mass_range.split(","))
    except ValueError:
        raise UserError(f"expected LOW,HIGH in GeV (got '{args.mass_range}'); use --mass-range 50,200",
                        key="--mass-range") from None
    spec = GenSpec(process=args.process, n=args.n, out=args.out, seed=args.seed, workers=args.workers,
                   channels=[c.strip() for c in args.channels.split(",") if c.strip()], image_size=args.image_size,
                   mass_range=(lo, hi), decay=args.decay, per_mass=args.per_mass)
    r = generate(spec, address=args.address)
    print(f"wrote {r['n']} examples of {args.process} to {r['out']} in {r['seconds']:.1f}s "
          f"({r['per_second']:.1f}/s, {r['events']} events generated)")
    return 0


def _ray_address(args) -> None:
    """Ray's convention: ``RAY_ADDRESS`` (set inside a Ray job, or by ``ray start --head``) names the cluster to join
    when ``--address`` is not given; either must answer before anything starts (issue 30, kind 5: both used to end
    in Ray's traceback about num_cpus). Raises UserError naming the flag or the variable."""
    if not hasattr(args, "address"):
        return
    key = "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if not args.address and env:
        args.address, key = env, "RAY_ADDRESS"
    if not args.address:
        if not getattr(args, "dry_run", False):  # a dry run starts no Ray
            _local_ray_limits()
        return
    if args.address in ("auto", "local"):
        return
    import socket

    hostport = args.address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    fix = "unset RAY_ADDRESS to start a local Ray" if key == "RAY_ADDRESS" else "give the head node's host:port"
    if not host or not port.isdigit():
        raise UserError(f"'{args.address}' is not a Ray address (HOST:PORT, ray://HOST:PORT or auto); {fix}", key=key)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"no Ray cluster answers at {args.address} ({e.strerror or e}); start it (ray start --head) "
                        f"or {fix}", key=key) from None


SOCKET_PATH_MAX = 107
"""Bytes of a Unix socket path on Linux (sun_path less its terminating NUL)."""
RAY_SOCKET_TAIL = "ray/session_2026-12-06_18-54-44_123456_1234567/sockets/plasma_store"
"""The longest socket path Ray creates under its temporary folder, with a session name of the usual length."""
OPEN_FILES_MIN = 1024


def _local_ray_limits() -> None:
    """What a local Ray needs of this process's environment (issue 30, kind 5): socket paths under its temporary
    folder that fit a Unix socket, and enough open files (raised to the hard limit when below). Raises UserError
    naming the variable or the limit."""
    import resource

    for var in ("RAY_TMPDIR", "TMPDIR", "TEMP", "TMP"):
        if os.environ.get(var):
            tmp, key = os.environ[var], var
            break
    else:
        tmp, key = "/tmp", "TMPDIR"
    longest = len(os.path.join(tmp, RAY_SOCKET_TAIL).encode())
    if longest > SOCKET_PATH_MAX:
        raise UserError(f"{key}={tmp} is {len(tmp)} characters: Ray's socket paths under it would be {longest} bytes, "
                        f"more than the {SOCKET_PATH_MAX} a Unix socket allows; set RAY_TMPDIR=/tmp (Ray's temporary "
                        "folder only)", key=key)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < OPEN_FILES_MIN:
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if want >= OPEN_FILES_MIN:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return
        raise UserError(f"this shell allows {soft} open files (hard limit {hard}); Ray needs at least "
                        f"{OPEN_FILES_MIN}: raise it (ulimit -n 65536, or ask for a higher hard limit)",
                        key="ulimit -n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # downloads stay off the terminal
    if args.cmd in ("run", "resume", "confirm"):  # long searches: SIGTERM stops them as Ctrl-C does
        from e2e_search.search.ray_env import stop_on_sigterm

        stop_on_sigterm()
    try:
        _ray_address(args)
        return {"run": _cmd_run, "resume": _cmd_resume, "confirm": _cmd_confirm, "validate": _cmd_validate,
                "best": _cmd_best, "report": _cmd_report,
                "ui": _cmd_ui, "export": _cmd_export, "data": _cmd_data}[args.cmd](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DiskFull as e:  # the search's runs are closed; the cause in one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        from e2e_search.search.ray_env import was_terminated

        print("interrupted: finished trials are in MLflow; e2e-search resume EXPERIMENT continues the search",
              file=sys.stderr)
        return 143 if was_terminated() else 130


if __name__ == "__main__":
    sys.exit(main())
