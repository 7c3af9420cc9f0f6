"""engine="fsdp": one reward model sharded across torch.distributed ranks (FSDP2, gloo on CPU).

Each multi-process test launches tests/engines/sharded_job.py under torchrun, the way a training job
runs, and checks every rank's results against the UNSHARDED model scoring the same samples in
this process: scores within 1e-5 (fp32), the same per-sample errors, merged counters, and
each rank's resident share of the parameters. A deadlock would show as the launch timing out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from wpr_sharded import INVALID, calls_for, has_marker, marker_ids

from worldpm_reward import ConfigError, RewardModel
from worldpm_reward.checkpoints import TensorRows
from worldpm_reward.engines.sharded import shard_rows
from worldpm_reward.samples import parse_sample
from worldpm_reward.testing import write_tiny_worldpm

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent  # the wpr_* helpers
ROOT = TESTS.parent
TOLERANCE = 1e-5


@pytest.mark.parametrize(("rows", "world"), [(10, 3), (7, 2), (2, 3), (151936, 8), (1, 2)])
def test_shard_rows_are_fsdp2s_chunks(rows: int, world: int) -> None:
    chunks = torch.arange(rows).chunk(world)
    for rank in range(world):
        start, stop = shard_rows(rows, world, rank)
        want = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, stop)) == want


def test_tensor_rows_reads_only_the_rows_asked_for(tiny_worldpm: Path) -> None:
    from safetensors.torch import load_file

    full = load_file(str(tiny_worldpm / "model.safetensors"))
    reader = TensorRows(tiny_worldpm)
    name = "model.layers.1.mlp.down_proj.weight"
    got = reader.rows(name, 5, 9)
    assert torch.equal(got, full[name][5:9]) and reader.elements_read == got.numel()
    assert torch.equal(reader.rows("score.2.bias", 0, 1), full["score.2.bias"])


def test_fsdp_engine_outside_a_distributed_job_says_how_to_launch(tiny_worldpm: Path) -> None:
    with pytest.raises(ConfigError, match="torchrun"):
        RewardModel.from_pretrained(tiny_worldpm, engine="fsdp", device="cpu")
    with pytest.raises(ConfigError, match="fsdp_offload"):
        RewardModel.from_pretrained(tiny_worldpm, device="cpu", fsdp_offload=True)


def run_job(world: int, ckpt: Path, broken: Path, out: Path) -> list[dict]:
    out.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), str(HERE)]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    proc = subprocess.run(
        [*cmd, str(HERE / "sharded_job.py"), str(ckpt), str(broken), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_scores_equal_the_unsharded_model(tmp_path: Path, tiny_worldpm: Path, world: int) -> None:
    broken = write_tiny_worldpm(tmp_path / "single-linear", seed=0, head="single_linear")
    reports = run_job(world, tiny_worldpm, broken, tmp_path / "out")
    full = RewardModel.from_pretrained(tiny_worldpm, device="cpu")

    # every rank refused the stock single-Linear head with the usual message
    assert all("single-Linear head" in r["broken_head"] for r in reports)

    # the fixture can fail: the marker's token appears in no other sample
    markers = set(marker_ids(full.tokenizer).values())
    others = [
        parse_sample(s)
        for r in range(world)
        for call in calls_for(r, world)
        for s in call
        if s not in INVALID and not has_marker(s)
    ]
    assert len(markers) == 3
    assert not any(markers & set(enc.input_ids) for enc in full.encoder.encode_batch(others))  # type: ignore[union-attr]
    scored = failed = 0
    distinct: set[float] = set()
    for rank, report in enumerate(reports):
        for c, (samples, got) in enumerate(zip(calls_for(rank, world), report["calls"])):
            want = full.score_detailed(samples)
            assert len(got["scores"]) == len(samples)
            for k, (w, score, error) in enumerate(zip(want, got["scores"], got["errors"])):
                if has_marker(samples[k]):
                    assert score is None and "injected failure" in error and f"sample {k}" in error
                    failed += 1
                    continue
                assert error == w.error, (rank, c, k)
                if w.error is None:
                    assert score is not None and abs(score - w.score) <= TOLERANCE, (
                        rank,
                        c,
                        k,
                        score,
                        w.score,
                    )
                    scored += 1
                    distinct.add(round(score, 4))
                else:
                    assert score is None
    assert scored >= 20 and len(distinct) > scored // 2  # many different scores, all matching
    assert failed == 3  # each injected failure cost its own sample only

    # the situations the acceptance names happened: a rank with none, a rank with only invalid ones,
    # uneven micro-batch counts (so some rank ran dummy calls)
    assert reports[1]["calls"][1]["scores"] == []
    assert all(s is None for s in reports[1]["calls"][2]["scores"]) and reports[1]["calls"][2]["scores"]
    assert len({r["calls"][0]["local_batches"] for r in reports}) > 1
    assert sum(r["dummy_calls"] for r in reports) > 0

    # counters merged over the ranks
    for c in range(len(reports[0]["calls"])):
        total = sum(len(calls_for(r, world)[c]) for r in range(world))
        errors = sum(e is not None for r in reports for e in r["calls"][c]["errors"])
        batches = sum(r["calls"][c]["local_batches"] for r in reports)
        assert all(
            r["calls"][c]["global"] == {"num_samples": total, "num_errors": errors, "num_batches": batches}
            for r in reports
        )

    # each rank holds at most 1/N of the parameters plus one decoder layer, and read no more
    total = sum(p.numel() for p in full.model.parameters())
    layer = sum(p.numel() for p in full.model.model.layers[0].parameters())
    for r in reports:
        mem = r["memory"]
        assert mem["total"] == total
        assert mem["resident"] <= total / world + layer, mem
        assert r["memory_after_calls"] == mem["resident"]
        assert r["elements_read"] <= total / world + layer
        print(
            f"world {world} rank {r['rank']}: {mem['resident']} of {total} parameter elements "
            f"({100 * mem['resident'] / total:.1f}%, {mem['resident_bytes'] / 1e6:.1f} MB of "
            f"{mem['full_copy_bytes'] / 1e6:.1f} MB), read {r['elements_read']}"
        )


def _conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.mark.slow
@pytest.mark.distributed
def test_rope_scaled_by_length_scores_each_sample_alone_on_every_rank(tmp_path: Path) -> None:
    """Dynamic NTK RoPE past the trained context: transformers rescales by the longest position
    of a forward call (and keeps the scale), so each sample must run in a call of its own, as
    on the transformers engine; the ranks then run different numbers of calls in step."""
    rope = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    ckpt = write_tiny_worldpm(tmp_path / "dynamic", seed=3, max_position_embeddings=32, rope_parameters=rope)
    long_answer = " ".join(f"word{i}" for i in range(60))
    per_rank = [
        [
            _conversation("2+2?", "4"),
            _conversation("Tell me a story.", long_answer),
            _conversation("Name a colour.", "Blue, like the sky."),
            _conversation("Capital of France?", "Paris."),
        ],
        [_conversation("Say hi.", "Hi!"), _conversation("Count to forty.", " ".join(map(str, range(1, 41))))],
    ]
    (tmp_path / "samples.json").write_text(json.dumps(per_rank))
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), str(HERE)]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = [str(ckpt), str(tmp_path / "samples.json"), "512", str(out)]
    proc = subprocess.run(
        [*cmd, str(HERE / "rope_sharded_job.py"), *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the reference: the unsharded model, each sample alone in a freshly loaded model
    for rank, samples in enumerate(per_rank):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["one_at_a_time"] and "dynamic RoPE" in report["one_at_a_time"]
        assert min(report["lengths"]) < 32 < max(report["lengths"])  # both sides in one call
        assert report["batches"] == len(samples)
        for k, sample in enumerate(samples):
            alone = RewardModel.from_pretrained(ckpt, device="cpu", max_length=512).score([sample])[0]
            for key in ("scores", "reversed", "forward_ids"):
                assert abs(report[key][k] - alone) <= TOLERANCE, (rank, k, key, report[key][k], alone)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.framework
def test_trl_grpo_with_two_processes_shares_one_sharded_reward_model(
    tmp_path: Path, tiny_worldpm: Path
) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` (on a CPU machine: torchrun, gloo) of a real
    GRPOTrainer whose reward model is sharded over its two processes: rewards are logged as in
    the single-process case and equal the unsharded model's scores."""
    pytest.importorskip("trl", reason="needs the 'trl' extra: pip install 'worldpm-reward[trl]'")
    from wpr_testutils import DATA

    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS), str(HERE)]),
        "WORLDPM_SHARED_DATA": str(DATA),
    }
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run(
        [*launch, str(HERE / "trl_sharded_job.py"), str(tiny_worldpm), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    full = RewardModel.from_pretrained(tiny_worldpm, device="cpu")
    total = sum(p.numel() for p in full.model.parameters())
    layer = sum(p.numel() for p in full.model.model.layers[0].parameters())
    checked = 0
    for r in reports:
        assert r["engine"] == "ShardedEngine" and r["world"] == 2
        assert r["memory"]["total"] == total and r["memory"]["resident"] <= total / 2 + layer
        assert len(r["calls"]) >= 3
        for prompts, completions, returned in r["calls"]:
            convs = [
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                for p, c in zip(prompts, completions)
            ]
            for got, want in zip(returned, full.score_detailed(convs)):
                assert (got is None) == (want.error is not None)
                if got is not None:
                    assert abs(got - want.score) <= TOLERANCE
                    checked += 1
    assert checked >= 16
    steps = [h for h in reports[0]["log_history"] if "rewards/worldpm/mean" in h]
    assert len(steps) == 3 and all("worldpm/raw_mean" in h and "worldpm/failed" in h for h in steps)
    first = [x for r in reports for x in r["calls"][0][2] if x is not None]  # TRL gathers both ranks
    assert abs(steps[0]["rewards/worldpm/mean"] - sum(first) / len(first)) <= 1e-4


# config.json dimensions of the released checkpoints the sharded recipe names
RELEASED = {
    "Qwen/WorldPM-72B": dict(
        vocab_size=152064,
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "Qwen/Qwen2.5-7B-Instruct": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
}
SHARDED_RECIPE = ROOT / "recipes" / "configs" / "grpo_worldpm72b_sharded.yaml"


def test_sharded_recipe_memory_arithmetic_follows_from_the_config() -> None:
    """Every figure of the 8x80GB sharded recipe's header, recomputed from the config's own
    values (models, dtype, ranks in its launch command, vLLM share, micro-batch budget) and the
    models' parameter counts (built on the meta device from their released dimensions)."""
    import re

    import yaml
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from worldpm_reward.families.worldpm import WorldPMForRewardModel, worldpm_config

    text = SHARDED_RECIPE.read_text()
    header = " ".join(ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#"))
    cfg = yaml.safe_load(text)
    kwargs, extra = cfg["reward_model_kwargs"], cfg["extra"]
    assert kwargs["engine"] == "fsdp" and kwargs["dtype"] == "bf16"
    ranks = int(
        re.search(r"accelerate launch --num_processes (\d+) recipes/grpo_worldpm.py", header).group(1)
    )
    gpu_gb = int(re.search(r"One (\d+)x(\d+)GB node", header).group(2))
    assert ranks == int(re.search(r"One (\d+)x", header).group(1))

    with torch.device("meta"):
        rm = WorldPMForRewardModel(worldpm_config(RELEASED[cfg["reward_model"]]))
        policy = Qwen2ForCausalLM(Qwen2Config(**RELEASED[cfg["policy"]]))
    rm_params = sum(p.numel() for p in rm.parameters()) / 1e9
    layer = sum(p.numel() for p in rm.model.layers[0].parameters()) / 1e9
    embed = rm.model.embed_tokens.weight.numel() / 1e9
    policy_params = sum(p.numel() for p in policy.parameters()) / 1e9

    m = re.search(r"reward model: \S+ ([\d.]+)B params x 2 B \(bf16\) / (\d+) ranks = ~(\d+) GB", header)
    assert m and abs(float(m.group(1)) - rm_params) < 0.05 and int(m.group(2)) == ranks
    reward_gb = int(m.group(3))
    assert abs(reward_gb - rm_params * 2 / ranks) < 0.5
    m = re.search(
        r"embedding \(([\d.]+)B params = ([\d.]+) GB\) or two decoder layers .*?2 x ([\d.]+)B params = ([\d.]+) GB"
        r".*?one (\d+)-token micro-batch \(~([\d.]+) GB\) = ~(\d+) GB",
        header,
    )
    assert m, "no transient line"
    assert abs(float(m.group(1)) - embed) < 0.01 and abs(float(m.group(2)) - embed * 2) < 0.1
    assert abs(float(m.group(3)) - layer) < 0.01 and abs(float(m.group(4)) - 2 * layer * 2) < 0.1
    assert int(m.group(5)) == kwargs["max_batch_tokens"]
    h, inter = (
        RELEASED[cfg["reward_model"]]["hidden_size"],
        RELEASED[cfg["reward_model"]]["intermediate_size"],
    )
    activations = kwargs["max_batch_tokens"] * (2 * h + 3 * inter) * 2 / 1e9  # residual, normed, gate/up/act
    assert abs(float(m.group(6)) - activations) < 0.5
    transient_gb = int(m.group(7))
    assert transient_gb >= max(float(m.group(2)), float(m.group(4))) + float(m.group(6)) - 0.5

    m = re.search(r"policy: \S+ ([\d.]+)B params x 16 B .*?/ (\d+) ranks = ~(\d+) GB", header)
    assert m and abs(float(m.group(1)) - policy_params) < 0.05 and int(m.group(2)) == ranks
    assert extra["deepspeed"]["zero_optimization"]["stage"] == 3
    policy_gb = int(m.group(3))
    assert abs(policy_gb - policy_params * 16 / ranks) < 0.5
    m = re.search(r"vLLM: ([\d.]+) x (\d+) GB .*?= ~(\d+) GB", header)
    assert m and float(m.group(1)) == extra["vllm_gpu_memory_utilization"] and int(m.group(2)) == gpu_gb
    vllm_gb = int(m.group(3))
    assert abs(vllm_gb - extra["vllm_gpu_memory_utilization"] * gpu_gb) < 0.5
    assert extra["use_vllm"] and extra["vllm_mode"] == "colocate" and extra["vllm_enable_sleep_mode"]
    assert (
        policy_params * 2 < extra["vllm_gpu_memory_utilization"] * gpu_gb
    )  # vLLM's copy of the weights fits
    train_gb = int(re.search(r"training activations .*?= ~(\d+) GB", header).group(1))

    m = re.search(r"per GPU: ([\d +]+) = ~(\d+) GB of (\d+) GB", header)
    assert m and int(m.group(3)) == gpu_gb
    terms = [int(x) for x in m.group(1).split("+")]
    assert terms == [reward_gb, transient_gb, policy_gb, vllm_gb, train_gb]
    assert sum(terms) == int(m.group(2)) <= gpu_gb
    m = re.search(r"full copy per rank .*? would need (\d+) GB per GPU", header)
    assert m and abs(int(m.group(1)) - rm_params * 2) < 1 and int(m.group(1)) > gpu_gb
