"""float8 training (torchao): which Linears are converted, the precision table's fp8 rows, and the
first-step probe that keeps bf16 where fp8 is no faster. torchao's float8 Linear runs (emulated) on
CPUs, so the probe and the fallback run here for real; fp8 on CPU workers is a config error for users."""
import pytest
import torch
from torch import nn

from openclaw.engine import fp8
from openclaw.engine.config import TrainConfig
from openclaw.engine.engine import Engine
from openclaw.engine.precision import DeviceFacts, choose_precision
from openclaw.engine.tasks import Classification

H100, L4, A100, T4 = (DeviceFacts("cuda", c, b) for c, b in (((9, 0), True), ((8, 9), True), ((8, 0), True),
                                                              ((7, 5), False)))


@pytest.mark.parametrize("in_features", [16, 1000, 1024, 4096, 4112, 8192])
@pytest.mark.parametrize("out_features", [16, 1000, 1024, 1040, 2048, 8192])
def test_the_filter_is_torchaos_tensorwise_auto_filter(in_features, out_features):
    from torchao.float8 import _auto_filter_for_recipe
    linear = nn.Linear(in_features, out_features, device="meta")
    assert fp8.gains_from_fp8(in_features, out_features) == _auto_filter_for_recipe("tensorwise", [])(linear, "x")


@pytest.mark.parametrize("asked,fp8_key,facts,name,reason", [
    ("fp8", "off", H100, "fp8", "torchao float8"),
    ("fp8", "off", L4, "fp8", "compute capability 8.9"),
    ("fp8", "off", A100, "bf16", "no float8 tensor cores"),
    ("fp8", "off", T4, "fp16", "no float8 tensor cores"),
    ("auto", "auto", H100, "fp8", "auto with `train.fp8: auto`"),
    ("auto", "auto", A100, "bf16", "bf16 tensor cores"),
    ("auto", "off", H100, "bf16", "bf16 tensor cores"),
    ("auto", "auto", DeviceFacts("cpu"), "fp32", "CPU"),
])
def test_the_fp8_rows_of_the_precision_table(asked, fp8_key, facts, name, reason):
    p = choose_precision(asked, facts, True, fp8_key)
    assert p.name == name and reason in p.reason, p
    assert p.dtype == (torch.bfloat16 if name == "fp8" else p.dtype)


class Wide(nn.Module):
    """One Linear wide enough to convert (out_features 2048 > 1024), one too small to."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 2048), nn.Linear(2048, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_unconvert_and_convert_keep_the_same_parameters():
    model = Wide()
    params = [id(p) for p in model.parameters()]
    assert fp8.convert(model) == ["up"] and type(model.up).__name__ == "Float8Linear"
    assert type(model.down) is nn.Linear
    assert [id(p) for p in model.parameters()] == params
    up = model.up
    assert fp8.unconvert(model) == ["up"] and type(model.up) is nn.Linear and model.up is up  # the same module
    assert [id(p) for p in model.parameters()] == params  # an optimizer built on them stays valid
    fp8.reconvert(model, ["up"])
    assert type(model.up).__name__ == "Float8Linear" and model.up is up


def test_the_gpts_output_head_stays_bf16_where_the_filter_alone_would_convert_it():
    """A head of 64 features into 2048 classes passes torchao's filter; it is kept out (as torchtitan's
    float8 configs keep `output`), while a block's MLP of the same shape is converted."""
    from openclaw.engine.models import GPT
    model = GPT(vocab_size=2048, block_size=16, dim=512, depth=1, heads=8)
    assert fp8.gains_from_fp8(512, 2048) and fp8.gains_from_fp8(model.head.in_features, model.head.out_features)
    names = fp8.convert(model)
    assert "head" not in names and type(model.head) is nn.Linear
    assert "blocks.0.mlp.0" in names and model.head.weight is model.tok.weight  # still tied


def _engine(seed=0):
    torch.manual_seed(seed)
    cfg = TrainConfig(global_batch_size=32, micro_batch_size=32, precision="fp8", optimizer={"lr": 1e-3})
    return Engine(Wide(), Classification(), cfg, device=torch.device("cpu"))


def _batch():
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(32, 64, generator=g), "y": torch.randint(0, 16, (32,), generator=g)}


def test_the_engine_converts_before_the_wrap_and_trains_in_fp8():
    engine = _engine()
    assert engine.precision.name == "fp8" and engine.fp8_layers == ["up"] and engine.dtype == torch.bfloat16
    stats = [engine.train_step(s, [_batch()]) for s in range(3)]
    assert all(s.finite for s in stats) and stats[-1].loss_sum < stats[0].loss_sum


def test_the_probe_keeps_fp8_only_where_it_measured_it_faster_and_trains_nothing():
    # on a CPU, float8 is emulated (casts and scales around a bf16 GEMM), usually slower; the decision is
    # checked against the times measured, whichever side they favour, so noise cannot fail it
    engine = _engine()
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    fp8_s, bf16_s = engine.probe_fp8(_batch())
    assert fp8_s > 0 and bf16_s > 0
    kept = fp8.pays(fp8_s, bf16_s)
    assert engine.precision.name == ("fp8" if kept else "bf16")
    assert (type(engine.module.up).__name__ == "Float8Linear") is kept
    after = engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the probe trains nothing
    assert all(p.grad is None for p in engine.module.parameters())


def test_a_fallback_trains_on_in_bf16_around_the_same_parameters_and_says_why():
    engine = _engine()
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    params = [id(p) for p in engine.module.parameters()]
    assert engine.time_fp8(_batch()) is not None and engine.precision.name == "fp8"  # timing decides nothing
    engine.fall_back_from_fp8(0.0123, 0.0045)
    assert engine.precision.name == "bf16" and engine.fp8_layers == [] and type(engine.module.up) is nn.Linear
    assert "fp8 measured no faster than bf16 here (12.3 ms vs 4.5 ms per micro-batch)" in engine.precision.reason
    assert [id(p) for p in engine.module.parameters()] == params  # the optimizer's parameters still
    # and it trains on, in bf16, as a fresh bf16 engine of the same seed does
    reference = Engine(Wide(), Classification(), engine.cfg.model_copy(update={"precision": "bf16"}),
                       device=torch.device("cpu"))
    reference.module.load_state_dict(before)
    assert engine.train_step(0, [_batch()]).loss_sum == reference.train_step(0, [_batch()]).loss_sum


def test_the_probe_times_both_sides_and_leaves_the_model_converted_around_the_same_parameters():
    model = Wide()
    fp8.convert(model)
    params, sides = [id(p) for p in model.parameters()], []

    def run():
        sides.append(type(model.up).__name__)
        model(_batch()["x"]).sum().backward()

    fp8_s, bf16_s = fp8.probe(model, run, repeats=2)
    assert sides == ["Float8Linear"] * 3 + ["Linear"] * 3  # a warm-up, then the timed repeats, each side
    assert fp8_s > 0 and bf16_s > 0
    assert type(model.up).__name__ == "Float8Linear" and [id(p) for p in model.parameters()] == params


def _probe_fp8_under_fsdp(rank: int, world: int) -> dict:
    """On each rank of a 2-rank FSDP group: an fp8 engine's probe, then two steps, beside a bf16 engine's."""
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.parallel.config import ParallelismConfig

    def engine(precision: str) -> Engine:
        torch.manual_seed(0)
        cfg = TrainConfig(global_batch_size=32, micro_batch_size=16, precision=precision, optimizer={"lr": 1e-3})
        return Engine(Wide(), Classification(), cfg, device=torch.device("cpu"), world_size=world,
                      strategy=build_strategy(ParallelismConfig(strategy="fsdp"), world=world, rank=rank))
    mine = {k: v[rank * 16:(rank + 1) * 16] for k, v in _batch().items()}
    probed = engine("fp8")
    timed = probed.time_fp8(mine)
    probed.fall_back_from_fp8(*timed)  # whichever side the noise of two ranks on two cores favoured
    got = {"timed": timed, "precision": probed.precision.name, "up": type(probed.module.up).__name__,
           "losses": [probed.train_step(s, [mine]).loss_sum for s in range(2)]}
    bf16 = engine("bf16")
    return {**got, "bf16_losses": [bf16.train_step(s, [mine]).loss_sum for s in range(2)]}


def test_a_sharded_model_is_probed_and_falls_back_to_bf16_in_place():
    """Under FSDP each Linear's parameters are the shards FSDP gathers into those very modules: the probe
    runs both sides on them, and the fallback keeps them, training on as a bf16 engine does."""
    from parallel_harness import spawn
    got_by_rank = spawn(2, _probe_fp8_under_fsdp)
    assert got_by_rank[0]["timed"] == got_by_rank[1]["timed"]  # the slowest rank's: every rank decides alike
    for got in got_by_rank:
        assert got["timed"][0] > 0 and got["timed"][1] > 0
        assert got["precision"] == "bf16" and got["up"] == "Linear"
        assert got["losses"] == got["bf16_losses"]


def _probe_fp8_in_a_pipeline(rank: int, world: int) -> dict:
    """On each rank of a 2-stage 1F1B pipeline: an fp8 gpt engine's probe on this rank's first step (4
    micro-batches), then a step."""
    from openclaw.engine.models import GPT
    from openclaw.engine.parallel.build import build_strategy
    from openclaw.engine.parallel.config import ParallelismConfig
    from openclaw.engine.tasks import LanguageModeling
    torch.manual_seed(0)
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=2, precision="fp8", optimizer={"lr": 1e-3})
    strategy = build_strategy(ParallelismConfig(pipeline=2, pipeline_schedule="1f1b"), world=world, rank=rank)
    engine = Engine(GPT(vocab_size=64, block_size=16, dim=272, depth=2, heads=8), LanguageModeling(), cfg,
                    device=torch.device("cpu"), strategy=strategy)
    tokens = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    step = [{"x": tokens[i:i + 2]} for i in range(0, 8, 2)]
    layers = list(engine.fp8_layers)
    timed = engine.probe_fp8(step)
    return {"layers": layers, "timed": timed, "precision": engine.precision.name,
            "converted": bool(engine.fp8_layers), "finite": engine.train_step(0, step).finite}


def test_a_pipeline_is_probed_on_a_whole_step():
    """1F1B refuses fewer micro-batches than its stages, so a probe of one micro-batch raised in a pipeline;
    the attempt probes the first step's, and the times are per micro-batch."""
    from parallel_harness import spawn
    got_by_rank = spawn(2, _probe_fp8_in_a_pipeline)
    assert got_by_rank[0]["timed"] == got_by_rank[1]["timed"]  # the slowest stage's: both stages decide alike
    for got in got_by_rank:
        assert got["layers"] and "head" not in got["layers"], got["layers"]  # this stage's float8 MLPs
        kept = fp8.pays(*got["timed"])
        assert got["timed"][0] > 0 and got["timed"][1] > 0 and got["finite"]
        assert got["precision"] == ("fp8" if kept else "bf16") and got["converted"] is kept


def test_nothing_to_probe_without_fp8_layers():
    cfg = TrainConfig(global_batch_size=8, micro_batch_size=8, precision="bf16")
    engine = Engine(Wide(), Classification(), cfg, device=torch.device("cpu"))
    assert engine.probe_fp8(_batch()) is None and engine.precision.name == "bf16"


def test_pays_only_when_faster():
    assert fp8.pays(0.9, 1.0) and not fp8.pays(1.0, 1.0) and not fp8.pays(1.1, 1.0)


@pytest.mark.integration
def test_fp8_on_a_cluster_without_gpus_stops_before_any_worker_starts(ray_local, digits_dir, tmp_path, mlflow_uri):
    import openclaw
    from conftest import digits_config
    from openclaw.errors import ConfigError
    cfg = digits_config(digits_dir, tmp_path, mlflow_uri, **{"train.precision": "fp8", "train.max_steps": 5})
    assert cfg.scaling.use_gpu == "auto"
    with pytest.raises(ConfigError, match=r"`train.precision: fp8` needs GPU workers"):
        openclaw.train(cfg)
    assert not list((tmp_path / "runs").glob("**/checkpoint_*"))
