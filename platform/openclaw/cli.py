"""The `openclaw` command (driver): `train CONFIG [--set k=v ...] [--address ADDR]`, `sweep CONFIG
[--resume]`, `sync-spool FILE`, `checkpoint consolidate DIR --out FILE | list RUN_FOLDER`, `config --schema |
--defaults` and `advise RUN_ID`: parse, build, run, report.

User mistakes (bad config, missing data) print one paragraph and exit 2; `--debug` adds the traceback.
The commands' modules are imported when a command runs, so that `openclaw --help` answers at once.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

from openclaw.config import load_config
from openclaw.constants import stop_grace_s
from openclaw.cli_args import parser
from openclaw.errors import ConfigError, OpenClawError, RunStopped, Terminated, UserError
from openclaw.launch.stops import exit_when_stuck
from openclaw.tracking.redact import public_uri, scrub

EXIT_USER_ERROR = 2


def cmd_checkpoint(args: argparse.Namespace) -> int:
    import os

    from openclaw.data.filesystems import local_copy
    from openclaw.engine.model_io import consolidate
    if args.action == "list":
        from openclaw.launch.checkpoint_list import list_checkpoints, table
        print(table(args.run_folder, list_checkpoints(args.run_folder, args.quick), args.quick))
        return 0
    if "://" not in args.checkpoint and not os.path.isdir(args.checkpoint):
        raise ConfigError(f"there is no checkpoint folder at {args.checkpoint}. Pass a run's checkpoint_* folder "
                          f"(the run prints its final one) or its URI.")
    from openclaw.launch.checkpoint_list import is_one_checkpoint
    if not is_one_checkpoint(args.checkpoint):  # before copying it (a run's folder held every checkpoint)
        raise ConfigError(f"{args.checkpoint} is not one checkpoint (it has no manifest.json): pass one of a run's "
                          f"checkpoint_* folders (`openclaw checkpoint list RUN_FOLDER` lists them).")
    with local_copy(args.checkpoint) as d:
        out = consolidate(d, args.out, trust_code=args.trust_code)
    print(f"openclaw: wrote the whole model of {args.checkpoint} to {out} ({out.stat().st_size:,} bytes)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from openclaw.exports.run import export
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one table is the output
    export(args.source, quantize=args.quantize, group_size=args.group_size, evaluate=args.eval, out=args.out,
           register=args.register, tracking_uri=args.tracking_uri, device=args.device, trust_code=args.trust_code)
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    from openclaw.advice.render import as_json, console
    from openclaw.advice.report import advise_logged_run
    from openclaw.constants import default_tracking_uri
    if not args.debug:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    recs, facts, source = advise_logged_run(args.run_id, args.tracking_uri or default_tracking_uri())
    print(as_json(recs, facts, run_id=args.run_id, source=source) if args.json else console(recs, source))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from openclaw.config_schema import defaults_yaml, json_schema
    print(json_schema() if args.schema else defaults_yaml(), end="" if args.defaults else "\n")
    return 0


def cmd_sync_spool(args: argparse.Namespace) -> int:
    from openclaw.tracking.writer import SYNCED, sync_spool
    if not os.path.exists(args.spool) and os.path.exists(args.spool + SYNCED):
        raise ConfigError(f"{args.spool} was uploaded already (it is {args.spool + SYNCED} now): a second upload would "
                          f"register its model and record its events again.")
    try:
        n = sync_spool(args.spool, args.tracking_uri, trust_code=args.trust_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read spool file {args.spool}: {e}") from None
    if not n:
        raise ConfigError(f"{args.spool} holds no tracking update: nothing was uploaded, and it is left as it is.")
    print(f"openclaw: uploaded {n} tracking update(s) from {args.spool}; it is kept as {args.spool + SYNCED}, which "
          f"you may delete.")
    return 0


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The command that opens the MLflow UI on this run, in its model-training view."""
    fragment = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    tracking_uri = public_uri(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/{fragment}"
    return (f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000   "
            f"# then open http://127.0.0.1:5000/{fragment}")


def cmd_train(args: argparse.Namespace) -> int:
    if not args.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    config = load_config(args.config, args.overrides)  # a mistake in the config: in moments, before torch loads
    from openclaw.launch.places import place
    from openclaw.launch.preflight import preflight
    config = place(config)
    sources = preflight(config)  # one in the data, storage or tracking: here, before Ray starts
    from openclaw.launch.session import train
    result = train(config, address=args.address, verbose=args.verbose, sources=sources)
    shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith(("train/loss", "val/"))}
    print(f"openclaw: done. final metrics: {shown}")
    print(f"openclaw: MLflow run id: {result.run_id}")
    print(f"openclaw: checkpoint: {result.checkpoint}")
    print(f"openclaw: MLflow UI: {ui_hint(result.tracking_uri, result.experiment_id, result.run_id)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if not args.verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    config = load_config(args.config, args.overrides)  # a mistake in the config: in moments, before Tune loads
    from openclaw.sweeps.launch import sweep
    result = sweep(config, resume=args.resume, address=args.address, verbose=args.verbose)
    counts = {o: sum(t["outcome"] == o for t in result.trials) for o in ("finished", "stopped_early", "failed")}
    print(f"openclaw: sweep done: {counts['finished']} finished, {counts['stopped_early']} stopped early, "
          f"{counts['failed']} failed")
    if result.best_trial:
        print(f"openclaw: best trial {result.best_trial}: {result.best_metric:.4g} with {result.best_params} "
              f"(MLflow run {result.best_run_id})")
    print(f"openclaw: MLflow UI: {ui_hint(result.tracking_uri, result.experiment_id, result.parent_run_id)}")
    return 0 if counts["failed"] < len(result.trials) else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    again = ("with --resume to go on: finished trials are kept, unfinished ones resume from their checkpoints"
             if args.command == "sweep" else "again to go on: it resumes from the run's newest checkpoint, or "
             "starts over if it wrote none")
    try:
        exit_when_stuck(stop_grace_s(), f"Run the same command {again}.")  # whatever its clean-up does
        commands = {"train": cmd_train, "sweep": cmd_sweep, "sync-spool": cmd_sync_spool, "config": cmd_config,
                    "checkpoint": cmd_checkpoint, "export": cmd_export, "advise": cmd_advise}
        return commands[args.command](args)
    except UserError as e:
        if args.debug:
            print(scrub(traceback.format_exc()), file=sys.stderr)
        print(f"openclaw: error: {scrub(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as e:
        print(f"openclaw: {scrub(e)}", file=sys.stderr)
        return 128 + signal.Signals[e.signal_name]  # stopped on request, resumable: 143 (SIGTERM), 130 (Ctrl-C)
    except OpenClawError as e:
        if args.debug:
            print(scrub(traceback.format_exc()), file=sys.stderr)
        print(f"openclaw: {type(e).__name__}: {scrub(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # before training started, or a second stop request
        sig, name = (signal.SIGTERM, "SIGTERM") if isinstance(e, Terminated) else (signal.SIGINT, "Ctrl-C")
        print(f"openclaw: stopped at once by {name}. Run the same command {again}.", file=sys.stderr)
        return 128 + sig
    except Exception as e:  # a library's own error (MLflow's, Ray's): its message may hold a URL's password
        print(scrub(traceback.format_exc()) if args.debug else
              f"openclaw: {type(e).__name__}: {scrub(' '.join(str(e).split()))[:2000]} (--debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
