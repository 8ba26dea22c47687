#!/usr/bin/env python
"""What quantized export saves and costs, against the issue's targets: the text-lm GPT and the digits MLP,
each exported to int8, int8-dynamic and int4, measured against the full-precision model.

    python bench/quantize.py --train                      # train both with openclaw first (local Ray, ~4 min)
    python bench/quantize.py --text-lm CKPT --digits CKPT # or export runs you have (checkpoints or run ids)

Sizes and quality come from `openclaw.export` (its `quantization.json`): the quantized Linear layers'
bytes against their fp32 bytes, the whole file's, and the validation loss (and accuracy) of both models
on the same rows. Latency is timed here: for each batch size the two models alternate (ABBA) over
`--repeats` repeats, each the median of a few forward passes on the same batch; the median, the spread
(min-max) and the ratio of medians are printed. The targets are checked and printed, met or missed,
and the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(REPO / "bench"))

MODES = ("int8", "int8-dynamic", "int4")
TARGETS = {  # mode -> (most layer bytes vs fp32, val loss within, on text-lm), digits: accuracy points
    "int8": (0.27, 0.01), "int8-dynamic": (0.27, 0.01), "int4": (0.16, 0.05)}
DIGITS_POINTS = {"int8": 1.0, "int8-dynamic": 1.0, "int4": 3.0}


def prepare(work: Path):
    """Start preparing the text and digits data at once, while this process imports torch; the returned
    function waits for both and returns their folders."""
    from common import start_recipe
    started = {name: start_recipe(name, work / name) for name in ("text", "digits")}
    return lambda: {name: done() for name, done in started.items()}


def train_sources(work: Path, data: dict[str, Path], steps: int | None = None,
                  val_rows: int | None = None) -> dict[str, str]:
    """Train the shipped text-lm and digits examples on `data` (as shipped, on local Ray; `steps`: fewer
    steps; `val_rows`: with `data.val` cut to its first rows); their final checkpoints."""
    import openclaw
    out = {}
    for name, config, folder in (("text-lm", "text-lm.yaml", data["text"]), ("digits", "digits.yaml", data["digits"])):
        val = folder / "val" if val_rows is None else head(folder / "val", val_rows)
        result = openclaw.train(REPO / "jobs" / "configs" / config, overrides=[
            f"data.train={folder / 'train'}", f"data.val={val}", f"checkpoint.storage={work / 'runs'}",
            "tracking.enabled=false", *([f"train.max_steps={steps}"] if steps else [])])
        out[name] = result.checkpoint
    return out


def head(folder: Path, rows: int) -> Path:
    """The first `rows` rows of a folder of Parquet files (in file order, as the export scores them), as
    one file in a folder beside it."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    out = folder.with_name(f"{folder.name}-{rows}")
    if not out.exists():
        out.mkdir()
        pq.write_table(ds.dataset(folder, format="parquet").head(rows), out / "part-00000.parquet")
    return out


def timed(model, batch, passes: int) -> float:
    import torch
    with torch.no_grad():
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def latency(full, quantized, batch, repeats: int, passes: int) -> dict[str, list[float]]:
    """Each model's per-repeat median forward time (ms), the two alternating ABBA."""
    from common import alternate
    timed(full, batch, 2), timed(quantized, batch, 2)  # warm-up, untimed
    return alternate({"full": lambda: timed(full, batch, passes), "quantized": lambda: timed(quantized, batch, passes)},
                     repeats)


def bench_one(name: str, source: str, mode: str, work: Path, args) -> dict:
    import openclaw
    from openclaw.config import Config
    from openclaw.exports.evaluate import sample_batch
    result = openclaw.export(source, quantize=mode, evaluate=True, out=work / f"{name}-{mode}",
                             tracking_uri=f"sqlite:///{work / 'bench-mlflow.db'}")
    m = result.measured
    full, quantized = openclaw.load_model(source), openclaw.load_model(result.out)
    config = Config.model_validate(json.loads((Path(result.out) / "config.json").read_text()))
    row = {"model": name, "mode": mode, "group_size": result.group_size, "layer_ratio": m["layer_ratio"],
           "file_ratio": m["file_ratio"], "kept": result.kept_layers, "val_loss_full": m["val_loss_full"],
           "val_loss_quantized": m["val_loss_quantized"], "val_rows": m["val_rows"]}
    if "val_accuracy_full" in m:
        row["accuracy_points"] = 100 * m["val_accuracy_delta"]
    for n in args.batches:
        times = latency(full, quantized, sample_batch(config, n), args.repeats, args.passes)
        med = {k: statistics.median(v) for k, v in times.items()}
        row[f"latency_b{n}"] = {k: {"median_ms": med[k], "min_ms": min(v), "max_ms": max(v), "n": len(v)}
                                for k, v in times.items()}
        row[f"latency_b{n}"]["ratio"] = med["quantized"] / med["full"]
    row["checks"] = checks(name, mode, row)
    return row


def checks(name: str, mode: str, row: dict) -> list[str]:
    max_layers, loss_within = TARGETS[mode]
    rel = row["val_loss_quantized"] / row["val_loss_full"] - 1
    out = [f"{'met' if row['layer_ratio'] <= max_layers else 'MISSED'}: quantized layers {row['layer_ratio']:.3f}x "
           f"their fp32 bytes (target <= {max_layers})"]
    if name == "text-lm" or mode != "int4":
        out.append(f"{'met' if abs(rel) <= loss_within else 'MISSED'}: val loss {rel:+.2%} (target within "
                   f"{loss_within:.0%})")
    if name == "digits":
        pts = row["accuracy_points"]
        out.append(f"{'met' if pts >= -DIGITS_POINTS[mode] else 'MISSED'}: accuracy {pts:+.2f} points (target within "
                   f"{DIGITS_POINTS[mode]:g})")
    return out


def show(row: dict) -> None:
    gs = row["group_size"]
    g = "" if gs is None else f", group size {gs}" if isinstance(gs, int) else ", group sizes per layer"
    print(f"\n{row['model']} {row['mode']}{g}: layers {row['layer_ratio']:.3f}x, whole file {row['file_ratio']:.3f}x "
          f"of fp32; val loss {row['val_loss_full']:.4f} -> {row['val_loss_quantized']:.4f} "
          f"(first {row['val_rows']:.0f} val rows)")
    for layer, why in row["kept"].items():
        print(f"  kept in full precision: {layer} ({why})")
    for key in (k for k in row if k.startswith("latency_b")):
        lat = row[key]
        print(f"  {key.removeprefix('latency_b'):>3} rows: " + "  ".join(
            f"{side} {lat[side]['median_ms']:.3g} ms ({lat[side]['min_ms']:.3g}-{lat[side]['max_ms']:.3g})"
            for side in ("full", "quantized")) + f"  ratio {lat['ratio']:.3f}")
    for line in row["checks"]:
        print(f"  {line}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train the text-lm and digits examples first")
    p.add_argument("--train-steps", type=int, default=None, help="with --train: this many steps (default: as shipped)")
    p.add_argument("--val-rows", type=int, default=None,
                   help="with --train: train with data.val cut to its first N rows, which makes the final evaluation "
                        "shorter (the export scores the first 1,024; default: all)")
    p.add_argument("--text-lm", default=None, help="a text-lm checkpoint folder or run id")
    p.add_argument("--digits", default=None, help="a digits checkpoint folder or run id")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32],
                   help="batch sizes to time (comma-separated)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--passes", type=int, default=3, help="forward passes per repeat (their median)")
    p.add_argument("--work", default=None, help="folder for data, runs and exports (default: a temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = prepare(work) if args.train else None
        import torch
        torch.set_num_threads(1)  # the same on both sides, and on every machine
        sources = train_sources(work, data(), args.train_steps, args.val_rows) if data else {}
        sources.update({k: v for k, v in (("text-lm", args.text_lm), ("digits", args.digits)) if v})
        if not sources:
            p.error("pass --train, or --text-lm and/or --digits")
        rows = []
        for name, source in sources.items():
            for mode in args.modes.split(","):
                rows.append(bench_one(name, source, mode, work, args))
                show(rows[-1])
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
