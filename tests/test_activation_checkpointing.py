"""`parallelism.activation_checkpointing` on a user's model: its blocks (`self.blocks`) recompute in the
backward as the built-in gpt's do, with the same gradients; a model with no blocks is refused before
any worker starts, where the setting would have done nothing."""
import subprocess
import sys

import pytest
import torch

from conftest import REPO, digits_config
from openclaw.engine.compile import compile_in_place
from openclaw.engine.config import CompileConfig
from openclaw.engine.memory import saved_activation_bytes
from openclaw.engine.parallel.base import apply_activation_checkpointing
from openclaw.errors import ConfigError
from openclaw.launch.preflight import check_model_layout
from user_models import block_stack, normed_stages


def _loss_and_grads(mode: str) -> tuple[float, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    model = block_stack(depth=4)
    apply_activation_checkpointing(model, mode)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def loss():
        return torch.nn.functional.cross_entropy(model(x), y)
    saved = saved_activation_bytes(loss, model.parameters())
    value = loss()
    value.backward()
    return value.item(), {k: p.grad for k, p in model.named_parameters()}, saved


def test_a_users_blocks_recompute_with_the_same_gradients_and_keep_less():
    """`full` on a user's model of 4 residual blocks: the forward keeps only each block's input (a 64-wide
    row, where a block keeps its norm, its 256-wide hidden layer and its GELU), and the loss and every
    gradient are bitwise those of the run that keeps everything. `selective` recomputes every other block."""
    (loss, grads, saved) = _loss_and_grads("none")
    for mode in ("full", "selective"):
        loss_ac, grads_ac, saved_ac = _loss_and_grads(mode)
        assert loss_ac == loss and all(torch.equal(grads_ac[k], grads[k]) for k in grads), mode
        assert saved_ac < (0.3 if mode == "full" else 0.7) * saved, (mode, saved_ac, saved)
    model = block_stack(depth=4)
    names = [k for k, _ in model.named_parameters()]
    apply_activation_checkpointing(model, "selective")
    assert [b.checkpointed for b in model.blocks] == [True, False, True, False]
    assert [k for k, _ in model.named_parameters()] == names  # checkpoints keep their keys


def _batch_norm_run(mode: str, compiled: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = normed_stages(in_features=4, hidden=8, depth=3)
    apply_activation_checkpointing(model, mode)
    if compiled:
        compile_in_place(model, CompileConfig())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def test_recomputed_blocks_take_each_batch_into_batch_norm_statistics_once():
    """torch's backward recomputes a checkpointed block's forward in training mode: BatchNorm took that
    recompute in as a second batch (6 batches counted for 3 steps, its running statistics moved twice). The
    recompute now leaves them as the forward did: after 3 steps under `full` and `selective`, every weight
    and statistic is bitwise that of the run that keeps everything. Compiled, torch's recompute replays no
    buffer update of its own: 3 batches counted, the statistics those of the uncompiled run to rounding."""
    kept = _batch_norm_run("none")
    assert int(kept["blocks.0.1.num_batches_tracked"]) == 3
    for mode in ("full", "selective"):
        state = _batch_norm_run(mode)
        assert [k for k in kept if not torch.equal(state[k], kept[k])] == [], mode
    compiled = _batch_norm_run("full", compiled=True)
    assert int(compiled["blocks.0.1.num_batches_tracked"]) == 3
    assert [k for k in kept if not torch.allclose(compiled[k].float(), kept[k].float(), atol=1e-5)] == []


def test_checkpointing_a_model_without_blocks_is_refused_before_anything_starts(digits_dir, tmp_path):
    """The built-in mlp has no blocks: the setting would do nothing, so the preflight names the key, and
    the CLI exits 2 before it starts Ray."""
    cfg = digits_config(digits_dir, tmp_path, "sqlite:///unused.db", **{"parallelism.activation_checkpointing": "full"})
    with pytest.raises(ConfigError, match=r"`parallelism.activation_checkpointing` \(full\).*MLP has none"):
        check_model_layout(cfg)
    user = digits_config(digits_dir, tmp_path, "sqlite:///unused.db", **{
        "parallelism.activation_checkpointing": "full", "model.name": "user_models:block_stack", "model.kwargs": {}})
    check_model_layout(user)  # blocks: accepted

    r = subprocess.run([sys.executable, "-m", "openclaw.cli", "train", str(REPO / "jobs" / "configs" / "digits.yaml"),
                        "--set", f"data.train={digits_dir / 'train'}", "--set", f"data.val={digits_dir / 'val'}",
                        "--set", "parallelism.activation_checkpointing=selective", "--set",
                        f"checkpoint.storage={tmp_path / 'runs'}"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "`parallelism.activation_checkpointing` (selective)" in r.stderr and "Started a local Ray" not in r.stderr


def test_auto_micro_batch_counts_a_users_recomputed_blocks(digits_dir, tmp_path):
    """The probe checkpoints its copy of a user's model as the engine does: `full` counts the blocks'
    inputs and one recomputed block, under half of what keeping every block's activations takes."""
    from openclaw.data.sources import resolve
    from openclaw.data.stream import ShardedData, shard_specs
    from openclaw.engine.precision import Precision
    from openclaw.engine.tasks import build_task
    from openclaw.runtime.micro_batch_probe import _ProbeStep
    src = resolve(str(digits_dir / "train"), "data.train")
    data = ShardedData(src.spec, shard_specs(src.shards), "x", "y")
    counted = {}
    for mode in ("none", "full"):
        cfg = digits_config(digits_dir, tmp_path, "sqlite:///unused.db", **{
            "model.name": "user_models:block_stack", "model.kwargs": {"depth": 4},
            "parallelism.activation_checkpointing": mode})
        step = _ProbeStep(cfg, build_task(cfg.task), data, torch.device("cpu"), Precision("fp32", False, False, ""),
                          fake=True)
        counted[mode] = step.activation_bytes(8)
    assert 0 < counted["full"] < 0.5 * counted["none"], counted


def _fsdp_losses(rank: int, world: int, mode: str) -> list[float]:
    """This rank's loss sums over five steps of a user's block model under FSDP (each block its own
    unit), checkpointed per `mode`."""
    from openclaw.engine.config import TrainConfig
    from openclaw.engine.engine import Engine
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.tasks import build_task
    torch.manual_seed(0)
    model = block_stack(depth=3)
    train = TrainConfig(global_batch_size=32, micro_batch_size=8, max_steps=5, optimizer={"name": "adamw", "lr": 1e-2})
    strategy = build_strategy(ParallelismConfig(strategy="fsdp", activation_checkpointing=mode), world=world, rank=rank)
    engine = Engine(model, build_task("classification"), train, world_size=world, global_batch_size=32,
                    strategy=strategy)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    mine, losses = slice(rank * 16, rank * 16 + 16), []
    for step in range(5):  # the same batch every step: the loss must fall
        batches = [{"x": x[mine][i:i + 8], "y": y[mine][i:i + 8]} for i in (0, 8)]
        losses.append(engine.train_step(step, batches).loss_sum)
    assert [getattr(b, "checkpointed", False) for b in model.blocks] == [mode == "full"] * 3
    return losses


def test_a_users_checkpointed_blocks_train_under_fsdp_as_without_checkpointing():
    """FSDP shards each of the user's blocks; recomputing them in the backward gathers their parameters
    again. Two gloo ranks train the same five steps with `full` as with `none`, to float32 rounding."""
    from parallel_harness import spawn
    base, full = spawn(2, _fsdp_losses, "none"), spawn(2, _fsdp_losses, "full")
    assert [v for r in full for v in r] == pytest.approx([v for r in base for v in r], rel=1e-6)
    assert base[0][-1] < base[0][0]
