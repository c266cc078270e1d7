"""Tensor parallelism: the split plan (plain Python), and TP=2 against TP=1 in two gloo processes on the CPU.

The distributed cases share one torchrun launch, made by the launcher `labkit tp` uses (process start-up costs
seconds each on two cores): tests/parallel/tp_checks.py compares the split and whole models case by case, then runs the
worker's `bench` (world sizes 1 and 2, the all-reduce sweep), whose rows come back to the parent.
"""

import json
from pathlib import Path

import pytest
import torch

from labkit import cli
from labkit.parallel.distributed import AllReduceTiming, LaunchConfig, backend_for, fit_alpha_beta, torchrun_command
from labkit.cli.tp import action_options, format_rows
from labkit.parallel.launch import launch
from labkit.lab.results import stamp_rows
from labkit.model.llama import ModelArgs
from labkit.parallel.tp import TensorParallelError, plan_tensor_parallel

CHECKS = Path(__file__).with_name("tp_checks.py")
FP32_RTOL = 1e-5  # of the largest logit: summing two shards reorders fp32 additions, nothing more


def _args(heads, kv_heads, hidden=1536, head_dim=64):
    return ModelArgs(vocab_size=32, dim=heads * head_dim, num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=head_dim, hidden_dim=hidden, norm_eps=1e-5, max_seq_len=64)


# -- the plan ----------------------------------------------------------------------------------------------------
def test_even_split_deals_whole_kv_groups():
    plan = plan_tensor_parallel(_args(32, 8, 14336), 4)  # llama-8b's heads
    assert plan.is_even and plan.kv_replicas == 1
    assert plan.kv_heads[1] == (2, 3) and plan.q_heads[1] == tuple(range(8, 16))
    assert plan.hidden[3] == (3 * 3584, 14336)


def test_more_ranks_than_kv_heads_replicates_them():
    plan = plan_tensor_parallel(_args(32, 8, 14336), 16)
    assert plan.kv_replicas == 2 and plan.kv_heads[:3] == ((0,), (0,), (1,))
    assert plan.q_heads[1] == (2, 3) and plan.is_even


def test_embedded_heads_split_unevenly_or_refuse_naming_the_sizes_that_work():
    smollm2 = _args(9, 3)
    plan = plan_tensor_parallel(smollm2, 2)
    assert [len(q) for q in plan.q_heads] == [6, 3] and [len(k) for k in plan.kv_heads] == [2, 1]
    assert not plan.is_even and "6q/2kv + 3q/1kv" in plan.describe()
    with pytest.raises(TensorParallelError, match=r"over 2 ranks.*9 query heads, 3 KV heads.*work: 1, 3\b"):
        plan_tensor_parallel(smollm2, 2, allow_uneven=False, name="smollm2")
    with pytest.raises(TensorParallelError, match=r"over 4 ranks.*world sizes that work: 1, 2, 3\b"):
        plan_tensor_parallel(smollm2, 4)


@pytest.mark.parametrize("world", [0, 65, 2.0, True])
def test_bad_world_sizes_are_refused(world):
    with pytest.raises(TensorParallelError):
        plan_tensor_parallel(_args(4, 2, 64), world)


def test_backend_follows_the_device():
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 1)) == "nccl"
    with pytest.raises(ValueError, match="mps"):
        backend_for(torch.device("mps"))


def test_torchrun_command_single_node_and_rendezvous():
    single = torchrun_command(LaunchConfig(nproc=2), "labkit.parallel.launch", ["x"])
    assert "--standalone" in single and single[-3:] == ["-m", "labkit.parallel.launch", "x"]
    multi = torchrun_command(LaunchConfig(nproc=8, nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="j"), "m", [])
    assert multi[multi.index("--rdzv-endpoint") + 1] == "node0:29400" and "--standalone" not in multi
    with pytest.raises(ValueError, match="rendezvous"):
        LaunchConfig(nproc=2, nnodes=2)


def test_alpha_beta_fit_recovers_latency_and_bandwidth():
    timings = [AllReduceTiming(n, 2, 50 + n / 2e3, 0, 0, 10) for n in (1024, 65536, 1 << 20)]  # 2 GB/s, 50 µs
    alpha, bandwidth = fit_alpha_beta(timings)
    assert alpha == pytest.approx(50, rel=1e-6) and bandwidth == pytest.approx(2.0, rel=1e-6)


# -- two ranks ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    """One launch through the parent's own path (`launch.launch`) of tests/parallel/tp_checks.py on 2 ranks, 1 thread each,
    handed a small `bench` of the tiny model."""
    options = action_options(["bench", "--model", "tiny-llama", "--dummy", "--max-tokens", "6", "--repeats", "1",
                              "--all-reduce-bytes", "1024,65536"])
    return launch(options, LaunchConfig(nproc=2, threads_per_rank=1), timeout_s=600, program=str(CHECKS))


CASES = ("tiny-nk", "tiny-kn", "tiny-qwen2-bias", "tiny-mqa", "embedded-uneven")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_tp2_logits_equal_tp1_and_greedy_tokens_are_identical(report, case):
    c = report["cases"][case]
    assert c["max_abs_diff"] <= FP32_RTOL * c["max_abs_logit"], c["max_abs_diff"]
    assert c["argmax_equal"]
    assert c["greedy_split"] == c["greedy_whole"]
    assert c["free_blocks_after"] == c["num_kv_blocks"]  # no KV block leaked


@pytest.mark.slow
def test_int8_split_after_quantization_keeps_greedy_tokens(report):
    c = report["cases"]["tiny-int8"]
    # the CPU int8 kernel takes bf16 activations: each shard rounds its partial sum once
    assert c["max_abs_diff"] <= 2e-2 * c["max_abs_logit"]
    assert c["greedy_split"] == c["greedy_whole"]


@pytest.mark.slow
def test_int8_kv_cache_split_over_ranks_keeps_greedy_tokens(report):
    c = report["cases"]["tiny-kv-int8"]
    # both sides quantize the same K/V per head; a shard's reordered fp32 sum can move a code by one step
    assert c["max_abs_diff"] <= 1e-3 * c["max_abs_logit"], c["max_abs_diff"]
    assert c["greedy_split"] == c["greedy_whole"]
    assert c["free_blocks_after"] == c["num_kv_blocks"]


@pytest.mark.slow
def test_every_rank_samples_the_same_tokens(report):
    for name in report["cases"]:
        r0, r1 = report["ranks"][0][name], report["ranks"][1][name]
        assert r0["greedy_split"] == r1["greedy_split"], name
        assert r0["sampled_split"] == r1["sampled_split"], name
        assert r0["num_kv_blocks"] == r1["num_kv_blocks"], name  # same cache, so the same schedule
    c = report["cases"]["tiny-nk"]
    assert c["sampled_split"] == c["sampled_whole"]


@pytest.mark.slow
def test_heads_and_kv_cache_shrink_to_each_rank(report):
    ranks = report["ranks"]
    assert [r["embedded-uneven"]["local_heads"] for r in ranks] == [6, 3]
    assert [r["embedded-uneven"]["cache_kv_heads"] for r in ranks] == [2, 1]
    assert [r["tiny-mqa"]["local_kv_heads"] for r in ranks] == [1, 1]
    assert [r["tiny-mqa"]["local_heads"] for r in ranks] == [2, 2]


@pytest.mark.slow
def test_one_all_reduce_per_block_half(report):
    for name in CASES:
        c = report["cases"][name]
        assert c["all_reduces"] == 2 * c["num_layers"] * c["forwards"], name


@pytest.mark.slow
def test_even_split_of_the_embedded_model_is_refused(report):
    message = report["embedded_even_refusal"]
    assert message and "\n" not in message and "world sizes that work: 1, 3 (" in message


# -- the launcher ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_rows_come_back_from_rank_0(report):
    rows = stamp_rows(report["bench_rows"])
    decode = {r["params"]["world_size"]: r for r in rows if r["technique"] == "tp_decode"}
    assert set(decode) == {1, 2}
    assert decode[2]["metrics"]["tokens_match_world_size_1"] is True
    assert decode[2]["metrics"]["all_reduces_per_step"] == 2 * 2  # two layers, two halves
    assert decode[2]["metrics"]["comm_ms_per_step"] > 0 and decode[1]["metrics"]["comm_ms_per_step"] == 0
    assert len(decode[2]["metrics"]["per_rank"]) == 2 and decode[2]["metrics"]["speedup_vs_1"] > 0
    sweep = [r for r in rows if r["technique"] == "tp_allreduce"]
    assert {r["params"]["num_bytes"] for r in sweep} >= {1024, 65536} and all(r["metrics"]["latency_us"] > 0
                                                                              for r in sweep)
    assert all(r["env"]["cpu"] and r["run_id"] for r in rows)  # stamped with the environment and the run
    assert "all-reduce over 2 ranks (gloo)" in format_rows(rows)


def test_labkit_tp_refuses_an_uneven_model_before_starting_ranks(capsys):
    code = cli.main(["tp", "--nproc", "2", "generate", "--even-heads"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("labkit tp: smollm2-135m-instruct cannot be split over 2 ranks") and "work: 1, 3 (" in err


def test_shard_shapes_show_each_ranks_matrices():
    from labkit.parallel.tp import shard_shapes

    smollm2 = _args(9, 3)
    rows = shard_shapes(smollm2, plan_tensor_parallel(smollm2, 2))
    assert rows[0]["wqkv"] == [576, (6 + 4) * 64] and rows[1]["wo"] == [3 * 64, 576]
    assert rows[0]["w_gate_up"] == [576, 1536] and rows[1]["w_down"] == [768, 576]
    assert sum(r["weight_fraction"] for r in rows) == pytest.approx(1.0)


@pytest.mark.gpu
def test_tp_over_nccl_on_every_gpu(capsys):
    """The same launch on a GPU node: NCCL, one rank per GPU, and (with two or more GPUs) the split's tokens
    identical to one GPU's."""
    gpus = torch.cuda.device_count()
    sizes = ",".join(map(str, sorted({1, gpus})))
    code = cli.main(["tp", "--nproc", str(gpus), "bench", "--model", "tiny-llama", "--dummy", "--device", "cuda",
                     "--max-tokens", "8", "--repeats", "1", "--world-sizes", sizes, "--no-save", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads(out.out)
    assert {r["params"]["backend"] for r in rows if r["technique"] == "tp_decode"} == {"nccl"}
    if gpus > 1:
        split = next(r for r in rows if r["technique"] == "tp_decode" and r["params"]["world_size"] == gpus)
        assert split["metrics"]["tokens_match_world_size_1"] is True
