"""Starting from SLURM's environment (``srun`` one task per process, as open_clip supports) as well as
torchrun's: host-list expansion, rank/world/local-rank logic on simulated SLURM environments, and a real
two-process DDP run launched the way ``srun`` would (SLURM variables only, no torchrun)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm.distributed import expand_nodelist, free_port, world_from_env
from vlm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[8-10],cpu5", ["gpu8", "gpu9", "gpu10", "cpu5"]),
    ("a[1,3],b[009-010]", ["a1", "a3", "b009", "b010"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_two_nodes_four_tasks_each():
    """Task 5 of 2 nodes x 4 tasks: rank 5, local rank 1, rendezvous on the first node, a port from the job id
    that every task of the job derives alike; the torchrun names are exported for the rest of the code."""
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[12-13]",
           "SLURM_JOB_ID": "4242"}
    assert world_from_env(env) == (5, 8, 1, "slurm")
    assert env["MASTER_ADDR"] == "gpu12" and env["MASTER_PORT"] == str(20000 + 4242)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    other = {**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        other.pop(k)
    world_from_env(other)
    assert other["MASTER_PORT"] == env["MASTER_PORT"] and other["MASTER_ADDR"] == env["MASTER_ADDR"]


def test_torchrun_wins_and_explicit_rendezvous_is_kept():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert world_from_env(env) == (1, 2, 1, "torchrun")
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "10.1.2.3",
           "MASTER_PORT": "29500"}
    world_from_env(env)
    assert env["MASTER_ADDR"] == "10.1.2.3" and env["MASTER_PORT"] == "29500"
    assert world_from_env({}) == (0, 1, 0, "none")
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0, "slurm")
    with pytest.raises(UserError, match="SLURM_JOB_NODELIST"):
        world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": ""})


@pytest.mark.dist
def test_srun_style_two_process_training(tmp_path):
    """Two processes started with SLURM's variables only (what ``srun --ntasks 2`` gives each task) train one
    DDP run: both exit 0, rank 0 writes the final model, the logged samples/s counts both ranks."""
    from vlm.data_recipes.demo import build_demo

    demo = build_demo(tmp_path / "demo", train=64, val=8, size=32, train_shards=2, val_shards=1, langs=["en", "de"])
    run_dir = tmp_path / "run"
    ov = {"model.image_tower": "tiny:vit", "model.image_tower_cfg": "{}", "model.text_tower": "tiny:text",
          "model.text_tower_cfg": "{context_length: 32}", "model.embed_dim": "null", "data.shards": demo.train_spec,
          "data.batch_size": 4, "data.num_workers": 0, "data.shuffle_buffer": 16, "data.shuffle_initial": 4,
          "val_data": "null", "train.steps": 3, "train.precision": "fp32", "train.threads": 1, "train.log_every": 1,
          "train.run_dir": str(run_dir), "train.resume": "null", "train.device": "cpu", "train.progress": "false",
          "train.tensorboard": "false", "optim.warmup_steps": 1}
    cmd = [sys.executable, "-m", "vlm", "train", "pretrain_demo", *[f"{k}={v}" for k, v in ov.items()]]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    port = free_port()
    procs = [subprocess.Popen(cmd, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**base, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(r), "SLURM_NTASKS": "2",
                                   "SLURM_LOCALID": str(r), "SLURM_JOB_NODELIST": "localhost",
                                   "SLURM_JOB_ID": str(port - 20000 if port >= 20000 else port),
                                   "MASTER_PORT": str(port)})
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    assert "done: step 3" in outs[0] and "done:" not in outs[1]  # one summary, from rank 0
    assert (run_dir / "final" / "model.safetensors").is_file()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
