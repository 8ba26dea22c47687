"""A user's model in a pipeline: shaped as torchtitan's models are (`tests/user_models.py:StagedStack`:
blocks in an nn.ModuleDict, `pipeline_ends`, a forward that skips what a stage does not hold), it is
split into stages as the built-in gpt is, its tied embedding and head summed across the first and last
stages. The engine alone in real gloo groups on CPU (tests/parallel_harness.py), against one rank."""
import pytest
import torch

from parallel_harness import build, hop, rel, spawn, train

N_STEPS = 6
TIED, UNTIED = "user_models:staged_stack", "user_models:untied_stack"
PLANNED = "user_models:planned_stack"


def _same_run(reference, history, tol=1e-5):
    losses, norms = zip(*reference)
    got_losses, got_norms = zip(*history)
    assert len(got_losses) == len(losses) and rel(losses, got_losses) < tol, (losses, got_losses)
    assert rel(norms, got_norms) < tol, (norms, got_norms)
    assert got_losses[-1] < got_losses[0]


@pytest.mark.parametrize("model,schedule", [(TIED, "1f1b"), (UNTIED, "gpipe"), (TIED, "interleaved_1f1b")],
                         ids=["tied-1f1b", "untied-gpipe", "tied-interleaved"])
def test_a_users_model_in_two_stages_trains_as_on_one_rank(model, schedule):
    """Interleaved 1F1B: 4 stages of one block each on 2 ranks, each rank running two of them (rank 0 the
    embedding's stage and the third, rank 1 the second and the head's) in one pruned copy of the model."""
    one = spawn(1, train, {"strategy": "ddp"}, N_STEPS, False, model)[0]
    two = spawn(2, train, {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": schedule}, N_STEPS, False, model)
    _same_run(one["history"], two[0]["history"])
    assert two[0]["history"] == two[1]["history"]


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_built_as_a_worker_and_checkpointed_under_fsdp_it_loads_into_one_rank(tmp_path, schedule):
    """Two pipeline ranks x two FSDP shards (under interleaved 1F1B each rank runs two stages): built on
    the meta device with rank 0's weights, the same run bit for bit as built whole; its checkpoint, under
    the whole model's names, loads into one rank, still tied."""
    spec = {"strategy": "fsdp", "pipeline": 2, "pipeline_schedule": schedule}
    whole = spawn(4, train, spec, 3, False, TIED)
    meta = spawn(4, hop, spec, None, str(tmp_path / "pp"), 3, True, TIED)
    assert [m["history"] for m in meta] == [w["history"] for w in whole]
    one = spawn(1, hop, {"strategy": "fsdp"}, str(tmp_path / "pp"), str(tmp_path / "one"), 3, False, TIED)
    model = one[0]["state"]["model"]
    assert model["head.weight"].equal(model["embed.weight"]) and len(model) > 10
    _same_run(meta[0]["next"], one[0]["next"])


@pytest.mark.parametrize("parallelism,blocks", [
    ({"tensor": 2}, ["0123"] * 2),
    ({"tensor": 2, "pipeline": 2}, ["01"] * 2 + ["23"] * 2),
    ({"tensor": 2, "pipeline": 2, "pipeline_schedule": "interleaved_1f1b"}, ["02"] * 2 + ["13"] * 2),
], ids=["tp", "pp-x-tp", "interleaved-x-tp"])
def test_a_users_model_with_a_tensor_parallel_plan_trains_as_on_one_rank(parallelism, blocks):
    """The model's own `parallelize_plan`: over 2 tensor-parallel ranks, and in a pipeline of 2 x 2, where
    each stage's part is split by the plan's entries for the blocks it holds; its tied embedding and head
    (whole, in the first and last stages) summed across them. Each tensor-parallel pair runs the same."""
    one = spawn(1, train, {"strategy": "ddp"}, N_STEPS, False, PLANNED)[0]
    got = spawn(2 * parallelism.get("pipeline", 1), train, {"strategy": "ddp", **parallelism}, N_STEPS, False,
                PLANNED)
    _same_run(one["history"], got[0]["history"])
    assert all(r["history"] == got[0]["history"] for r in got)
    # split by the plan: for each block a rank holds (`blocks`, by rank), its two linears' weights and the
    # first's bias (the second's bias is added whole)
    assert [r["split_params"] for r in got] == [
        sorted(f"blocks.{b}.{p}" for b in held for p in ("1.weight", "1.bias", "3.weight")) for held in blocks]


def _wrap_error(rank: int, world: int, parallelism: dict, model_name: str) -> str:
    from openclaw.errors import ConfigError
    try:
        build(rank, world, parallelism, model_name=model_name)
    except ConfigError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("parallelism", [{"tensor": 2}, {"tensor": 2, "pipeline": 2}], ids=["tp", "pp-x-tp"])
def test_a_plan_key_that_names_no_module_stops_every_rank_naming_it(parallelism):
    """torch skips a plan key that resolves to no module with a warning, which left a typo'd module whole
    on every rank, unsplit and unsaid. Each rank's wrap now refuses it, naming the key and its likely fix."""
    got = spawn(2 * parallelism.get("pipeline", 1), _wrap_error, {"strategy": "ddp", **parallelism},
                "user_models:misplanned_stack")
    assert len(set(got)) == 1
    assert "'blocks.*.l', which matches no module of the model (no module under 'blocks.*' is named 'l'; " \
           "there: 0, 1, 2, 3)" in got[0]


@pytest.mark.parametrize("parallelism", [{"tensor": 2}, {"tensor": 2, "pipeline": 2}], ids=["tp", "pp-x-tp"])
def test_a_plan_that_splits_a_tied_matrix_unalike_stops_every_rank_naming_both(parallelism):
    """The tied embedding left whole and its head split by rows: on one rank the tie was made again over
    two layouts; in a pipeline the first and last stages summed unlike slices of its gradient (a
    collective of mismatched sizes, or on a square matrix a silent mix). Each wrap now refuses it (in
    the pipeline, the two ends compare how their part of the plan split it)."""
    got = spawn(2 * parallelism.get("pipeline", 1), _wrap_error, {"strategy": "ddp", **parallelism},
                "user_models:mistied_stack")
    assert len(set(got)) == 1
    assert "splits the tied parameter 'embed.weight' (whole) and 'head.weight' (split Shard(dim=0)) unalike" \
        in got[0]


def test_pipeline_x_tensor_built_as_a_worker_checkpoints_and_loads_into_one_rank(tmp_path):
    """The planned model at 2 pipeline x 2 tensor-parallel ranks, built as workers build it (the meta
    device, the plan applied, rank 0's weights sent): the same run bit for bit as built whole; its sharded
    checkpoint, under the whole model's names, loads into one rank, tied, and trains on as there."""
    spec = {"strategy": "ddp", "pipeline": 2, "tensor": 2}
    whole = spawn(4, train, spec, 3, False, PLANNED)
    meta = spawn(4, hop, spec, None, str(tmp_path / "pp-tp"), 3, True, PLANNED)
    assert [m["history"] for m in meta] == [w["history"] for w in whole]
    one = spawn(1, hop, {"strategy": "fsdp"}, str(tmp_path / "pp-tp"), str(tmp_path / "one"), 3, False, PLANNED)
    model = one[0]["state"]["model"]
    assert model["head.weight"].equal(model["embed.weight"]) and model["blocks.3.1.weight"].shape == (64, 32)
    _same_run(meta[0]["next"], one[0]["next"])


def _evaluate(rank: int, world: int, parallelism: dict) -> dict[str, float]:
    """A user's classifier's validation sums over 37 rows in batches of 8 (the last one padded)."""
    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.tasks import build_task
    from user_models import staged_classifier
    torch.manual_seed(0)
    train = TrainConfig(global_batch_size=16, micro_batch_size=8, max_steps=1, optimizer={"name": "adamw", "lr": 1e-2})
    engine = Engine(staged_classifier(), build_task("classification"), train, world_size=1, global_batch_size=16,
                    strategy=build_strategy(ParallelismConfig(**parallelism), world=world, rank=rank))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(37, 64, generator=g), torch.randint(0, 10, (37,), generator=g)
    return engine.evaluate([{"x": x[i:i + 8], "y": y[i:i + 8]} for i in range(0, 37, 8)])


def test_a_users_classifier_in_a_pipeline_reports_the_accuracy_one_rank_reports():
    """The last stage sums every validation metric the task scores, the correct predictions too: before,
    a pipeline reported the loss alone, and a classifier's `val/accuracy` went missing."""
    one = spawn(1, _evaluate, {"strategy": "ddp"})[0]
    two = spawn(2, _evaluate, {"strategy": "ddp", "pipeline": 2, "pipeline_schedule": "gpipe"})
    assert set(one) == {"loss", "correct", "count"} and one["count"] == 37 and 0 < one["correct"] < 37
    assert two[0] == two[1] and set(two[0]) == set(one)
    assert two[0]["correct"] == one["correct"] and two[0]["count"] == 37
    assert two[0]["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_plan_keys_are_resolved_level_by_level_as_torch_resolves_them():
    """Pure: exact paths and per-level patterns that match a module pass; a pattern that matches at one
    level but not the next, a typo, a parameter's path, and a plan that is not a dict of styles are refused."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    from openclaw.engine.parallel.tp import checked_plan
    from openclaw.errors import ConfigError
    from user_models import planned_stack
    model = planned_stack()
    plan = model.parallelize_plan(None)
    assert checked_plan(model, plan) is plan
    assert checked_plan(model, {"blocks.*.[13]": ColwiseParallel(), "": ColwiseParallel()})
    for key in ["blocks.*.9", "block.0.1", "blocks.0.1.weight"]:  # no such block child, a typo, a parameter
        with pytest.raises(ConfigError, match="matches no module"):
            checked_plan(model, {key: ColwiseParallel()})
    with pytest.raises(ConfigError, match="must return a dict of module paths"):
        checked_plan(model, {"blocks.0.1": "colwise"})
