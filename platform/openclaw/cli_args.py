"""The `openclaw` command's arguments (driver): each subcommand's options, help and examples. `cli.py`
runs what they name.
"""
from __future__ import annotations

import argparse
import textwrap


def parser() -> argparse.ArgumentParser:
    """The `openclaw` command's parser: one subcommand per job a user runs."""
    p = argparse.ArgumentParser(prog="openclaw", description="Elastic PyTorch training on Ray, tracked in MLflow.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_sweep, _add_sync_spool, _add_checkpoint, _add_export, _add_advise, _add_config):
        add(sub)
    return p


def _add_train(sub) -> None:
    """`openclaw train`."""
    t = sub.add_parser("train", help="train a model from a YAML config", description=textwrap.fill(
        "Train from a YAML config. Every knob is a config key; override any with --set. The same command (the "
        "same `name` and `checkpoint.storage`) resumes the run from its newest checkpoint, with other settings if "
        "you like, but not another model, task, optimizer, seed or data.shuffle_window_shards. Ctrl-C or SIGTERM checkpoints at the next step and "
        "stops; a second one stops at once.", 79), epilog=textwrap.fill(
        "exit codes: 0 trained to train.max_steps; 1 failed; 2 a config, data or usage error (nothing started); "
        "130 (Ctrl-C) or 143 (SIGTERM) stopped, resumable.", 79) +
        "\n\nexample: openclaw train jobs/configs/digits.yaml --set train.max_steps=200",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="path of the YAML config (see jobs/configs/)")
    _run_options(t, "train.optimizer.lr=3e-4")


def _add_sweep(sub) -> None:
    """`openclaw sweep`."""
    w = sub.add_parser("sweep", help="tune hyperparameters: a Ray Tune search over whole training runs",
                       description=textwrap.fill(
                           "Run the hyperparameter sweep in the config's `sweep:` section. Each trial is a full "
                           "training run (elastic, fault tolerant), logged as a child MLflow run under one parent "
                           "run that keeps the best trial and a table of all trials. Ctrl-C or SIGTERM saves the "
                           "sweep's state, marks its MLflow runs KILLED and stops it (--resume goes on); a second "
                           "one stops at once.", 79),
                       epilog=textwrap.fill(
                           "exit codes: 0 done (some trials may have failed: it says which); 1 every trial failed; "
                           "2 a config, data or usage error (nothing started); 130 (Ctrl-C) or 143 (SIGTERM) "
                           "stopped, resumable with --resume.", 79) +
                       "\n\nexample: openclaw sweep jobs/configs/digits-sweep.yaml --set sweep.num_samples=12",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("config", help="path of a YAML config with a `sweep:` section (see jobs/configs/digits-sweep.yaml)")
    w.add_argument("--resume", action="store_true",
                   help="continue the sweep of this name after Ctrl-C, SIGTERM or its driver died: finished trials are kept, "
                        "unfinished ones resume from their checkpoints")
    _run_options(w, "sweep.max_concurrent=4")


def _add_sync_spool(sub) -> None:
    """`openclaw sync-spool`."""
    s = sub.add_parser("sync-spool", help="upload tracking updates a run kept while MLflow was away",
                       description="Upload, in order, the metrics and events a run spooled to a local file "
                                   "because its MLflow server did not answer before the run ended.")
    s.add_argument("spool", help="the spool file the run printed (tracking-spool-RUN_ID.jsonl)")
    s.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the one the run used); it must be "
                        "the server the spool was written for")
    s.add_argument("--trust-code", action="store_true",
                   help="let the spooled run's config build its `module:function` model, to log it (its code runs)")
    s.add_argument("--debug", action="store_true", help="print full tracebacks for errors")


def _add_checkpoint(sub) -> None:
    """`openclaw checkpoint consolidate` and `list`."""
    k = sub.add_parser("checkpoint", help="work with a run's checkpoints",
                       description="Work with a checkpoint folder (or URI) a run wrote.")
    ksub = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    kc = ksub.add_parser("consolidate", help="write a checkpoint's whole model as one file",
                         description="Gather a checkpoint's model (whole or sharded over any number of workers) "
                                     "into one file of its weights and config, loadable with weights_only "
                                     "(`openclaw.load_model(FILE)`, or torch.load).",
                         epilog="example: openclaw checkpoint consolidate runs/text-lm-fsdp/checkpoint_... "
                                "--out model.pt")
    kc.add_argument("checkpoint", help="a checkpoint folder or URI (a run prints its final one)")
    kc.add_argument("--out", required=True, help="the file to write")
    kc.add_argument("--trust-code", action="store_true",
                    help="let the checkpoint's config build its `module:function` model (its code runs)")
    kc.add_argument("--debug", action="store_true", help="print full tracebacks for errors")
    kl = ksub.add_parser("list", help="a run's checkpoints, checked, and the one a resume takes",
                         description="List a run's checkpoint_* folders newest first, with each one's step, format "
                                     "(whole or sharded), files and size, and whether a resume would take it: every file "
                                     "checked against its manifest (size and sha256) as a resume checks it, read "
                                     "from the folder or URI without being written anywhere. Marks the one a "
                                     "resume starts from.",
                         epilog="example: openclaw checkpoint list runs/digits-mlp   (`<checkpoint.storage>/<name>`)")
    kl.add_argument("run_folder", help="the run's folder or URI: `<checkpoint.storage>/<name>`")
    kl.add_argument("--quick", action="store_true",
                    help="check each file's size only, from the listing (no file is read; a resume reads them)")
    kl.add_argument("--debug", action="store_true", help="print full tracebacks for errors")


def _add_export(sub) -> None:
    """`openclaw export`."""
    e = sub.add_parser("export", help="quantize a trained model (int8, int8-dynamic, int4) and measure what it costs",
                       description="Quantize a trained model's Linear layers with torchao, save it (load it with "
                                   "openclaw.load_model(OUT)), and measure it against the full model: size on disk "
                                   "and in memory, peak memory of a forward pass, latency, and with --eval the "
                                   "validation metrics. Recorded as a child MLflow run of the source run. Needs "
                                   "pip install 'openclaw[quantize]'.",
                       epilog="example: openclaw export runs/text-lm/checkpoint_... --quantize int4 --eval")
    e.add_argument("source", help="a checkpoint folder or URI, an MLflow run id, or models:/NAME/VERSION")
    e.add_argument("--quantize", required=True, choices=("int8", "int8-dynamic", "int4"),
                   help="int8 weight-only, int8 weights and dynamically quantized activations, or int4 weight-only "
                        "(its layers compute in bf16)")
    e.add_argument("--group-size", type=int, default=None,
                   help="int4: weights per scale, 32, 64 or 128 (default: for each layer, the largest that divides "
                        "its input features)")
    e.add_argument("--eval", action="store_true",
                   help="score the first 1,024 rows of the source run's validation set, full and quantized")
    e.add_argument("--out", default=None, help="the folder to write (default: exports/<name>-<mode>)")
    e.add_argument("--register", default=None, metavar="NAME", help="register the export as a new version of NAME")
    e.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    e.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to quantize and measure (cpu)")
    e.add_argument("--trust-code", action="store_true",
                   help="let the source's config build its `module:function` model (its code runs)")
    e.add_argument("--debug", action="store_true", help="print full tracebacks for errors")


def _add_advise(sub) -> None:
    """`openclaw advise`."""
    a = sub.add_parser("advise", help="recommend config changes from a run's measured step-time breakdown",
                       description="Read a run's logged metrics (its log windows: data wait, compute, communication, "
                                   "checkpoint stalls, memory, MFU, ...) and config from MLflow, and print what the "
                                   "advice rules recommend: each finding with its number, the config key to change "
                                   "with a suggested value (as --set takes it), and the expected effect. Every "
                                   "finished run prints the same at its end and logs it as advice.md / advice.json.",
                       epilog="example: openclaw advise 0ab8bc5fbaf84a5f91e41a661c509acf   (the run id `openclaw "
                              "train` printed)")
    a.add_argument("run_id", help="the MLflow run id of a training run")
    a.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    a.add_argument("--json", action="store_true", help="print the recommendations and facts as JSON (advice.json)")
    a.add_argument("--debug", action="store_true", help="print full tracebacks for errors")


def _add_config(sub) -> None:
    """`openclaw config`."""
    c = sub.add_parser("config", help="print the config's JSON schema, or every key at its default",
                       description="Describe the config tree: every key, its type, default and meaning.",
                       epilog="example: openclaw config --defaults > my-job.yaml   (then set data.train)")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--schema", action="store_true",
                      help="the JSON schema, with every key's description (for editors that check YAML files)")
    what.add_argument("--defaults", action="store_true",
                      help="a YAML file of every key at its default, each described in a comment")
    c.add_argument("--debug", action="store_true", help="print full tracebacks for errors")


def _run_options(parser: argparse.ArgumentParser, example: str) -> None:
    """The options of the commands that run on a Ray cluster (train, sweep)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {example} (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else a fresh local instance)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's (and Tune's) own logs and progress bars")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks for errors")
