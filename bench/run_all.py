"""`make bench`: every CPU bench in a quick mode, one after another, into one table (driver process).

Each bench runs as its own process with the command shown in the table; its last stdout line is its
JSON result. The figures (both sides, median, spread min-max, repeats, ratio of medians) go to
`bench/results.md` and `bench/results.json`, and the README's performance table (between its
`bench-results` markers) is rewritten from them, so that no figure there is typed by hand.

    python bench/run_all.py                     # every bench (about 27 minutes on a 2-core machine)
    python bench/run_all.py --only recovery,cache
    python bench/run_all.py --readme-only       # rewrite the README table from bench/results.json

Quick mode keeps each bench under 2 minutes where one round of its sides fits: fewer steps, and up to 5
rounds, as many as end within a budget of 110 s from the bench's start (`--budget-s`). The table's `n`
says how many each side had, and the notes below say why where under 5. Each bench's own defaults (run
it alone, without `--budget-s`) are the longer, 5-round measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable

from common import BUDGET_LINE, REPO, figure  # noqa: E402  (bench/ is this script's folder)

RESULTS_MD, RESULTS_JSON, README = REPO / "bench" / "results.md", REPO / "bench" / "results.json", REPO / "README.md"
BEGIN, END = "<!-- bench-results:begin (bench/run_all.py writes this table) -->", "<!-- bench-results:end -->"


def _found(result: Any) -> list[dict]:
    """The figures (`common.figure` dicts) anywhere in a bench's JSON result."""
    if isinstance(result, dict):
        own = [result] if "figure" in result and "sides" in result else []
        return own + [f for k, v in result.items() if k != "sides" for f in _found(v)]
    if isinstance(result, list):
        return [f for v in result for f in _found(v)]
    return []


def _engine(result: dict) -> list[dict]:
    return [figure(f"engine vs a bare PyTorch loop, {result['model']}, {result['device']}, {result['precision']}",
                   {"openclaw": result["openclaw_runs"], "bare loop": result["bare_runs"]}, base="bare loop",
                   unit="samples/s", digits=1)]


def _parallel(result: dict) -> list[dict]:
    return [figure(f"parallelism, the engine alone: {result['params'] / 1e6:.1f}M-parameter GPT, {result['world']} gloo "
                   "ranks", {k: v["samples_per_s"] for k, v in result["sides"].items()}, base="ddp",
                   unit="samples/s", digits=1)]


def _loss_parallel(result: dict) -> list[dict]:
    sides = {k: result["sides"][k]["samples_per_s"] for k in ("tp", "tp-gathered")}
    return [figure(f"tensor parallelism, loss parallel vs logits gathered whole: {result['params'] / 1e6:.1f}M-parameter "
                   f"GPT with a {result['vocab']}-token vocabulary, {result['world']} gloo ranks", sides, base="tp-gathered",
                   unit="samples/s", digits=1)]


def _pp_microbatches(result: dict) -> list[dict]:
    sides = {k: v["samples_per_s"] for k, v in result["sides"].items() if k.startswith("pp-")}
    return [figure(f"pipeline micro-batches per step (the pipeline_bubble rule's fix), the engine alone: "
                   f"{result['params'] / 1e6:.1f}M-parameter GPT, {result['world']} gloo stages", sides, base="pp-2mb",
                   unit="samples/s", digits=1)]


def _precision(result: dict) -> list[dict]:
    return [figure(f"precision on CPU, the engine alone, {model}",
                   {"fp32": r["fp32_runs"], "bf16": r["bf16_runs"]}, base="fp32", unit="samples/s", digits=1)
            for model, r in result.items() if isinstance(r, dict) and "fp32_runs" in r]


def _compile(result: dict) -> list[dict]:
    return [figure(f"compile after a restart, {result['model']} on {result['device']}: perf/compile_s plus loading "
                   f"the cache",
                   {"cold Inductor cache": result["cold_s"], "warm (the run's compile cache)": result["warm_s"]},
                   base="cold Inductor cache")]


def _quantize(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        for key in (k for k in r if k.startswith("latency_b")):
            lat = r[key]
            f = {"figure": f"quantized export, {r['model']} {r['mode']} (layers {r['layer_ratio']:.3f}x of fp32 bytes, "
                           f"val loss {r['val_loss_full']:.4f} -> {r['val_loss_quantized']:.4f}): forward ms, batch "
                           f"{key.removeprefix('latency_b')}", "unit": "ms", "base": "full precision", "sides": {}}
            for side, name in (("full", "full precision"), ("quantized", r["mode"])):
                s = lat[side]
                f["sides"][name] = {"median": round(s["median_ms"], 3), "min": round(s["min_ms"], 3),
                                    "max": round(s["max_ms"], 3), "n": s.get("n"),
                                    "ratio": 1.0 if side == "full" else round(lat["ratio"], 3)}
            out.append(f)
    return out


QUICK = ["--repeats", "5", "--budget-s", "110"]
"""Up to 5 rounds, as many as end within 110 s of the bench's start (`common.alternate`): with the start-up
and the teardown, each bench takes under 2 minutes here, except where one round alone takes longer."""

BENCHES: dict[str, tuple[list[str], Callable[[Any], list[dict]], str]] = {
    # name -> (arguments, figures from its JSON, what one round is where it is long)
    "engine-gpt": (["engine_overhead.py", "--model", "gpt", "--steps", "20", *QUICK], _engine, ""),
    "engine-mlp": (["engine_overhead.py", "--model", "mlp", "--steps", "200", *QUICK], _engine, ""),
    "parallel": (["parallel_overhead.py", "--steps", "3", "--warmup", "1", *QUICK], _parallel,
                 "a round trains each of the four strategies"),
    "loss-parallel": (["parallel_overhead.py", "--sides", "ddp,tp,tp-gathered", "--vocab", "16384", "--steps", "3",
                       "--warmup", "1", *QUICK], _loss_parallel, ""),
    "pp-microbatches": (["parallel_overhead.py", "--sides", "ddp,pp-2mb,pp-8mb,pp-16mb", "--steps", "3", "--warmup", "1",
                         *QUICK], _pp_microbatches, "a round trains ddp and three pipeline schedules"),
    "tp-small-vocab": (["parallel_overhead.py", "--sides", "ddp,tp,tp-gathered", "--steps", "3", "--warmup", "1",
                        *QUICK], _loss_parallel, ""),
    "activation-ckpt": (["activation_checkpointing.py", "--timer", "cpu", *QUICK], _found, ""),
    "compile-onoff": (["engine_overhead.py", "--compile-sides", "--steps", "20", "--timer", "cpu", *QUICK], _found,
                      "a round compiles nothing (the compile is in the untimed warm-up), but the warm-up compiles"),
    "fsdp-bare": (["fsdp_vs_bare.py", "--strategies", "fsdp", "--steps", "10", "--warmup", "2", *QUICK], _found,
                  "a round is two torchrun launches of 2 ranks"),
    "precision": (["cpu_precision.py", "--steps", "15", "--repeats", "5"], _precision, ""),
    "compile": (["compile_restart.py", *QUICK], _compile, "a round compiles twice, each in a fresh process"),
    "quantize": (["quantize.py", "--train", "--train-steps", "40", "--val-rows", "1024", "--modes", "int4",
                  "--batches", "8", "--passes", "5", "--repeats", "5"], _quantize, ""),
    "recovery": (["recovery.py", "--repeats", "2"], _found,
                 "a round is three Ray Train runs, each started, killed and restarted, two of them by the bare anchor"),
    "node-loss": (["node_loss.py", "--repeats", "1"], _found, "a round is three 2-node clusters, each losing a node"),
    "checkpoint": (["checkpoint_stall.py", "--steps", "40", "--every", "5", "--hidden", "3000", *QUICK], _found,
                   "a round is three Ray Train runs, two of them writing 111 MB checkpoints"),
    "cache": (["cache.py", "--rows", "30000", "--rounds", "1000", *QUICK], _found,
              "a round is a cache miss (Ray Data preparing the rows) and a hit, each a Ray Train run"),
    "tracking": (["tracking_overhead.py", "--steps", "100", "--checkpoint-every", "25", *QUICK], _found,
                 "a round is two Ray Train runs, after a warm-up run of each"),
    "ingest": (["ingest.py", "--rows", "800000", "--token-rows", "160000", *QUICK], _found, ""),
    "goodput": (["goodput.py", "--steps", "200", "--kill-every", "15", *QUICK], _found,
                "a round is a faulty run and a clean one"),
}


OVER_2_MINUTES = {
    "recovery": "one round alone: the bare anchor (`../shared/anchors/bare_ray_recovery.py`: a fresh Ray instance, "
                "60 steps with a kill and a restart, all 60 run to the end) runs twice in it, beside openclaw's run",
    "node-loss": "one round alone: three 2-node clusters; the anchor (`../shared/anchors/bare_ray_node_loss.py`) "
                 "waits a fixed 30 s before it kills a node in each of its two columns, and bare Ray Train with its "
                 "defaults takes over a minute to notice the lost node",
}
"""Why a bench's quick mode cannot fit into 2 minutes on a 2-core machine, where it cannot."""


def command(name: str) -> str:
    """The command line of a bench, as the table shows it."""
    return f"python bench/{' '.join(BENCHES[name][0])}"


def run(name: str) -> dict[str, Any]:
    args, figures, why = BENCHES[name]
    print(f"== {name}: {command(name)}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *args], cwd=REPO / "bench", capture_output=True, text=True, timeout=3600)
    took = time.perf_counter() - t0
    lines = [x for x in r.stdout.strip().splitlines() if x.startswith(("{", "["))]
    if r.returncode != 0 or not lines:
        print(r.stdout[-2000:], r.stderr[-4000:], sep="\n", file=sys.stderr)
        return {"name": name, "command": command(name), "error": f"exit {r.returncode}",
                "seconds": round(took)}
    print(f"   {took:.0f} s", flush=True)
    budget = next((x.removeprefix(BUDGET_LINE).strip() for x in r.stderr.splitlines() if x.startswith(BUDGET_LINE)), "")
    try:
        found = figures(json.loads(lines[-1]))
    except Exception as e:  # a bench whose output changed: say so in the table, keep the others
        return {"name": name, "command": command(name), "seconds": round(took),
                "error": f"its JSON result could not be read ({type(e).__name__}: {e})"}
    return {"name": name, "command": command(name), "seconds": round(took),
            "figures": found, "fewer_repeats": why, "budget": budget}


def _fmt(s: dict, unit: str) -> str:
    n = f", n={s['n']}" if s.get("n") else ""
    m = abs(s["median"])
    digits = 0 if m >= 1000 else 1 if m >= 100 else 3 if unit in ("", "ms") or m < 1 else 2
    f = lambda v: f"{v:,.{digits}f}"  # noqa: E731
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])}{n})"


def table(results: list[dict]) -> str:
    """The results as one Markdown table: each figure, each side's median (spread, repeats), the ratios."""
    lines = ["| figure | sides: median (min-max, repeats) | ratio of medians | command |", "| --- | --- | --- | --- |"]
    for res in results:
        if "error" in res:
            lines.append(f"| {res['name']}: **failed** ({res['error']}) | | | `{res['command']}` |")
            continue
        for f in res["figures"]:
            unit = f["unit"]
            sides = "; ".join(f"{name} {_fmt(s, unit)}" for name, s in f["sides"].items())
            ratios = "; ".join(f"{name} / {f['base']} **{s['ratio']:.3f}**" if s["ratio"] is not None else
                               f"{name} / {f['base']}: n/a ({f['base']} at or below 0)" for name, s in f["sides"].items() if name != f["base"])
            lines.append(f"| {f['figure']}{f' ({unit})' if unit else ''} | {sides} | {ratios} | `{res['command']}` |")
    return "\n".join(lines)


def write(results: list[dict], meta: dict[str, str]) -> str:
    fewer = [f"- {r['name']}: {why}." for r in results if (why := _why_fewer(r))]
    over = over_two_minutes(results)
    md = "\n".join([f"Measured by `make bench` (`python bench/run_all.py`) {_when(results, meta)}, on {meta['machine']}. "
                    "Every side of a figure ran in the same invocation, the sides alternating (ABBA) where a figure has more "
                    "than one round (n > 1); with one, in the order the figure lists them.", "",
                    table(results), "",
                    *(["Fewer than 5 repeats, and why:", *fewer, ""] if fewer else []),
                    *(["Over 2 minutes, and why:", *over, ""] if over else []),
                    "Time each bench took: " + ", ".join(f"{r['name']} {r['seconds']} s" for r in results) + "."])
    RESULTS_MD.write_text(md + "\n")
    RESULTS_JSON.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return md


def over_two_minutes(results: list[dict]) -> list[str]:
    """A note for each bench that took over 2 minutes: why its quick mode cannot be shorter, or that no
    reason is on record (then its quick command wants trimming)."""
    return [f"- {r['name']} ({r['seconds']} s): {OVER_2_MINUTES.get(r['name'], 'no reason on record')}."
            for r in results if r["seconds"] > 120]


def _why_fewer(result: dict) -> str:
    """Why a bench ran fewer than 5 repeats, where it did: what one round is (as its entry in BENCHES says
    now, where it still runs the command the row was measured with; else as saved with the row), and how
    many rounds its budget fit (the bench's own line)."""
    sides = [s for f in result.get("figures", []) for s in f["sides"].values() if s.get("n")]
    if not sides or min(s["n"] for s in sides) >= 5:
        return ""
    name = result["name"]
    what = BENCHES[name][2] if name in BENCHES and result["command"] == command(name) else result.get("fewer_repeats", "")
    return "; ".join(x for x in (what, result.get("budget", "")) if x)


def _when(results: list[dict], meta: dict[str, str]) -> str:
    """When and at which commit the rows were measured: one date and commit for a whole `make bench`; the
    benches of each `--only` rerun named beside theirs."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in results:
        groups.setdefault((r.get("when", meta["when"]), r.get("commit", meta["commit"])), []).append(r["name"])
    if len(groups) == 1:
        (when, commit), = groups
        return f"on {when} at commit {commit}"
    return "; ".join(f"{', '.join(names)} on {when} at commit {commit}" for (when, commit), names in groups.items())


def update_readme(md: str) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers to write the table between")
    head, rest = text.split(BEGIN, 1)
    README.write_text(head + BEGIN + "\n" + md + "\n" + END + rest.split(END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=None, help=f"comma-separated, of {', '.join(BENCHES)}")
    p.add_argument("--readme-only", action="store_true", help="only rewrite the README table from bench/results.json")
    a = p.parse_args(argv)
    if a.readme_only:
        saved = json.loads(RESULTS_JSON.read_text())
        update_readme(write(saved["results"], saved["meta"]))
        return 0
    names = a.only.split(",") if a.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"--only: unknown {unknown}; choose from {list(BENCHES)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"when": time.strftime("%Y-%m-%d"), "commit": commit or "unknown",
            "machine": f"{platform.machine()} Linux, {os.cpu_count()} CPU cores, no GPU"}
    saved = json.loads(RESULTS_JSON.read_text()) if a.only and RESULTS_JSON.exists() else {"results": []}
    # With --only, the other benches' last results stay, each with when and where it was measured.
    old = {r["name"]: {"when": saved["meta"]["when"], "commit": saved["meta"]["commit"], **r} for r in saved["results"]}
    done: dict[str, dict] = {}
    for n in names:  # saved after each bench, so that a failure later keeps what ran
        done[n] = {**run(n), "when": meta["when"], "commit": meta["commit"]}
        results = [done.get(k) or old[k] for k in BENCHES if k in done or k in old]
        md = write(results, meta)
    update_readme(md)
    print(md)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
