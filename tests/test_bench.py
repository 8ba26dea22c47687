"""The benches' shared logic: the ABBA order, the figures, and the README's performance table, which
must be exactly what `bench/run_all.py` wrote from `bench/results.json` (no figure typed by hand)
(pure); and how a side's process is run and ended (real processes)."""
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import run_all  # noqa: E402
from common import alternate, figure  # noqa: E402


def test_sides_alternate_abba_and_every_side_runs_every_round():
    order = []
    got = alternate({s: (lambda s=s: order.append(s) or len(order)) for s in "ABC"}, repeats=4)
    assert "".join(order) == "ABCCBAABCCBA"
    assert got == {"A": [1, 6, 7, 12], "B": [2, 5, 8, 11], "C": [3, 4, 9, 10]}


def test_a_budget_starts_only_whole_rounds_that_end_within_it(capsys):
    """Each side takes 10 s of a fake clock, so a round of two takes 20 s: with 55 s, rounds end at 20 and
    40 s, and a third (to 60 s) would pass the budget. The first round runs even past the budget."""
    now = [0.0]

    def side(name):
        now[0] += 10.0
        return name
    clock = lambda: now[0]  # noqa: E731
    got = alternate({"A": lambda: side("A"), "B": lambda: side("B")}, repeats=5, budget_s=55, clock=clock, started=0.0)
    assert got == {"A": ["A", "A"], "B": ["B", "B"]} and now[0] == 40.0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("budget:"))
    assert line.startswith("budget: 2 of 5 rounds") and "20 s" in line and "55 s budget" in line
    now[0] = 100.0  # already past the budget: one round all the same, so every side has a result
    got = alternate({"A": lambda: side("A"), "B": lambda: side("B")}, repeats=5, budget_s=55, clock=clock, started=0.0)
    assert got == {"A": ["A"], "B": ["B"]}
    now[0] = 0.0  # a warm-up run of each side first, not counted (nor against the budget's rounds)
    got = alternate({"A": lambda: side("A"), "B": lambda: side("B")}, repeats=2, clock=clock, started=0.0, warmup=True)
    assert got == {"A": ["A"] * 2, "B": ["B"] * 2} and now[0] == 60.0
    now[0] = 0.0  # no budget: every round
    got = alternate({"A": lambda: side("A"), "B": lambda: side("B")}, repeats=3, clock=clock, started=0.0)
    assert got == {"A": ["A"] * 3, "B": ["B"] * 3}


def test_the_notes_say_why_a_bench_ran_fewer_than_five_rounds():
    name = "checkpoint"
    five = figure("f", {"a": [1.0] * 5, "b": [2.0] * 5}, base="a")
    two = figure("f", {"a": [1.0] * 2, "b": [2.0] * 2}, base="a")
    row = {"name": name, "command": run_all.command(name), "seconds": 100, "fewer_repeats": "", "budget": ""}
    assert run_all._why_fewer({**row, "figures": [five]}) == ""
    why = run_all._why_fewer({**row, "figures": [two], "budget": "2 of 5 rounds; one more would end past it"})
    assert why == f"{run_all.BENCHES[name][2]}; 2 of 5 rounds; one more would end past it"
    # a row measured with another command keeps the reason saved with it
    old = {**row, "command": "python bench/checkpoint_stall.py --repeats 3", "fewer_repeats": "then", "figures": [two]}
    assert run_all._why_fewer(old) == "then"


def test_a_bench_over_two_minutes_is_named_with_why_or_with_no_reason():
    notes = run_all.over_two_minutes([{"name": "recovery", "seconds": 300}, {"name": "cache", "seconds": 121},
                                      {"name": "ingest", "seconds": 120}])
    assert notes == [f"- recovery (300 s): {run_all.OVER_2_MINUTES['recovery']}.",
                     "- cache (121 s): no reason on record."]


def test_a_figure_has_each_sides_median_spread_and_ratio_of_medians():
    f = figure("t", {"base": [3.0, 1.0, 2.0], "other": [10.0, 2.0, 4.0, 6.0]}, base="base")
    assert f["sides"]["base"] == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "ratio": 1.0}
    assert f["sides"]["other"] == {"median": 5.0, "min": 2.0, "max": 10.0, "n": 4, "ratio": 2.5}


def test_an_overhead_lost_in_the_noise_gets_no_ratio_and_the_table_says_why():
    over = figure("overhead", {"sync": [-11.9], "async": [-5.9]}, base="sync", unit="ms")
    assert over["sides"]["async"]["ratio"] is None  # two negative overheads have no meaningful ratio
    row = run_all.table([{"name": "c", "command": "python bench/c.py", "seconds": 1, "figures": [over]}]).splitlines()[-1]
    assert "async / sync: n/a (sync at or below 0)" in row and "**" not in row


def test_the_table_shows_both_sides_the_ratio_and_the_command():
    results = [{"name": "x", "command": "python bench/x.py --repeats 5", "seconds": 3, "fewer_repeats": "",
                "figures": [figure("recovery", {"bare": [8.0, 9.0, 10.0], "openclaw": [4.0, 4.5, 5.0]}, base="bare")]},
               {"name": "y", "command": "python bench/y.py", "error": "exit 1", "seconds": 1}]
    t = run_all.table(results)
    row = next(line for line in t.splitlines() if line.startswith("| recovery"))
    assert "bare 9.00 (8.00-10.00, n=3)" in row and "openclaw 4.50 (4.00-5.00, n=3)" in row
    assert "openclaw / bare **0.500**" in row and "`python bench/x.py --repeats 5`" in row
    assert "| y: **failed** (exit 1)" in t


def test_the_readme_table_is_the_one_run_all_wrote_from_results_json():
    saved = json.loads(run_all.RESULTS_JSON.read_text())
    readme = run_all.README.read_text()
    between = readme.split(run_all.BEGIN, 1)[1].split(run_all.END, 1)[0]
    assert between.strip() == run_all.RESULTS_MD.read_text().strip()
    assert run_all.table(saved["results"]) in between
    names = {r["name"] for r in saved["results"]}
    assert names == set(run_all.BENCHES), f"benches missing from the last `make bench`: {set(run_all.BENCHES) - names}"


def test_a_side_that_hangs_after_its_result_is_killed_and_its_result_counts():
    """As torch's gloo teardown once hung the FSDP anchor at exit: the side printed its figure, then never
    exited. It is killed with its whole process group `exit_grace_s` after the result; one that prints
    nothing is killed at `timeout_s`, and says so."""
    import subprocess
    import time

    import psutil
    from common import run_side
    hang = ("import json, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)']); print(json.dumps({'samples_per_s': 1.5, 'child': child.pid}), "
            "flush=True); time.sleep(600)")
    t0 = time.monotonic()
    got = run_side(["-c", hang], exit_grace_s=1.0, timeout_s=120)
    assert got["samples_per_s"] == 1.5 and time.monotonic() - t0 < 60
    try:  # SIGKILLed with its group: gone (or a zombie) within moments of its parent
        child = psutil.Process(got["child"])
        _, alive = psutil.wait_procs([child], timeout=10)
        assert not alive or child.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass
    with pytest.raises(subprocess.TimeoutExpired):
        run_side(["-c", "import time; time.sleep(600)"], timeout_s=2.0)
    assert run_side(["-c", "print('{\"done\": true}')"]) == {"done": True}  # a side that exits at once


def _gpu_check_steps() -> tuple[list[str], list[list[str]]]:
    """bench/gpu_check.sh's Python heredocs, and its commands that run a bench or pytest (their argv)."""
    import shlex
    lines = (REPO / "bench" / "gpu_check.sh").read_text().splitlines()
    scripts, commands, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("step ") and line.endswith("<<'PY'"):
            end = lines.index("PY", i + 1)
            scripts.append("\n".join(lines[i + 1:end]))
            i = end
        elif line.startswith("step "):
            argv = shlex.split(line.replace('"$PY"', "PY"))
            commands.append(argv[argv.index("PY") + 1:])
        i += 1
    return scripts, commands


def test_the_gpu_check_imports_names_that_exist_and_runs_benches_with_flags_they_take():
    """The device check runs where no Ray and no second try is at hand: a name it imports that the code no
    longer has (`block_activation_bytes`, renamed) or a flag a bench does not take lost its step there."""
    import ast
    import importlib
    import os
    import subprocess
    scripts, commands = _gpu_check_steps()
    assert len(scripts) >= 6 and len(commands) >= 5
    for script in scripts:
        for node in ast.walk(ast.parse(script)):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("openclaw"):
                module = importlib.import_module(node.module)
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"gpu_check.sh imports {missing} from {node.module}, which has no such name"
    parse_only = ("import argparse, runpy, sys\n"
                  "def parse(self, args=None, namespace=None):\n"
                  "    parsed(self, args, namespace)\n"
                  "    raise SystemExit(0)\n"
                  "parsed = argparse.ArgumentParser.parse_args\n"
                  "argparse.ArgumentParser.parse_args = parse\n"
                  "sys.argv = sys.argv[1:]\n"
                  "sys.path.insert(0, sys.argv[0].rsplit('/', 1)[0])\n"
                  "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    for argv in commands:
        if argv[:2] == ["-m", "pytest"]:
            assert all((REPO / a).is_file() for a in argv if a.startswith("tests/")), argv
            continue
        assert (REPO / argv[0]).is_file(), argv
        done = subprocess.run([sys.executable, "-c", parse_only, *argv], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "platform")}, timeout=120)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr[-800:]}"
