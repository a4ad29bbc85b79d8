"""Data-parallel building blocks on real gloo process groups, launched by ``torchrun`` on
the loopback address (127.0.0.1 only), and the moment merge against numpy."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from compressm_rl.rl.distributed import (
    World,
    batch_moments,
    free_loopback_port,
    merge_moments,
)
from compressm_rl.runs import MetricsLog

ROOT = Path(__file__).resolve().parents[1]

# Each rank: a policy from a rank-dependent seed, its own data; then the collectives.
WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from compressm_rl.rl import distributed as D
    from compressm_rl.rl.ppo import gradient_buffer
    from policies.actor_critic import ActorCritic
    from policies.normalizer import RunningNormalizer

    out = sys.argv[1]
    world = D.init_world("cpu")
    torch.manual_seed(100 + world.rank)  # ranks start different
    policy = ActorCritic(5, 2, -np.ones(2), np.ones(2), width=8, state_dims=[3, 2])
    D.broadcast_module(policy, world)
    after_broadcast = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])

    # Gradients of rank-dependent data, averaged; then one Adam step on every rank.
    rng = np.random.default_rng(world.rank)
    obs = torch.as_tensor(rng.normal(size=(4, 6, 5)), dtype=torch.float32)
    reset = torch.zeros(4, 6, dtype=torch.bool)
    actions = torch.as_tensor(rng.normal(size=(4, 6, 2)), dtype=torch.float32)
    h_actor = torch.zeros(4, policy.actor.state_size)
    h_critic = torch.zeros(4, policy.critic.state_size)
    log_prob, _, values = policy.evaluate(obs, h_actor, h_critic, reset, actions)
    grads = gradient_buffer(list(policy.parameters()))  # as ppo_update lays them out
    (-(log_prob.mean()) + values.square().mean()).backward()
    local = torch.cat([p.grad.reshape(-1) for p in policy.parameters()]).clone()
    D.average_gradients(grads, world)
    averaged = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])
    torch.optim.Adam(policy.parameters(), lr=1e-2).step()
    after_step = torch.cat([p.detach().reshape(-1) for p in policy.parameters()])

    # A normaliser updated from this rank's data, then merged from every rank's batch.
    norm = RunningNormalizer(3)
    norm.update(np.random.default_rng(99).normal(size=(7, 3)))  # the shared state so far
    before = D.statistics(norm)
    batch = rng.normal(loc=world.rank, size=(10 + 5 * world.rank, 3))
    norm.update(batch)  # local, to be replaced
    D.merge_normalizer(norm, before, batch, world)
    plan = D.broadcast_object({"rank": world.rank, "cut": [3, 1]} if world.is_main else None, world)
    D.check_in_sync(policy, world)  # in sync: passes
    with torch.no_grad():
        policy.log_std[0] += world.rank  # rank 1 drifts
    try:
        D.check_in_sync(policy, world)
        diverged = False
    except D.RanksDiverged:
        diverged = True

    json.dump({
        "rank": world.rank, "size": world.size,
        "after_broadcast": after_broadcast.tolist(), "local_grad": local.tolist(),
        "averaged_grad": averaged.tolist(), "after_step": after_step.tolist(),
        "before": [before[0], before[1].tolist(), before[2].tolist()], "batch": batch.tolist(),
        "norm": [float(norm.count), norm.mean.tolist(), norm.var.tolist()], "plan": plan,
        "diverged": diverged,
    }, open(f"{out}/rank{world.rank}.json", "w"))
    D.shutdown(world)
    """
)


def test_collectives_on_two_gloo_ranks_launched_by_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    command += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(free_loopback_port()), str(script), str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert (r0["rank"], r1["rank"], r0["size"]) == (0, 1, 2)
    # Rank 0's parameters everywhere, bit for bit.
    assert r0["after_broadcast"] == r1["after_broadcast"]
    # The mean of the two ranks' gradients, the same on both; then identical steps.
    assert r0["local_grad"] != r1["local_grad"]
    mean = (np.array(r0["local_grad"]) + np.array(r1["local_grad"])) / 2
    np.testing.assert_allclose(r0["averaged_grad"], mean, rtol=1e-6, atol=1e-7)
    assert r0["averaged_grad"] == r1["averaged_grad"]
    assert r0["after_step"] == r1["after_step"]
    # Normaliser: identical on both ranks, equal to one process that saw all the data.
    assert r0["norm"] == r1["norm"]
    count, mean0, var0 = r0["before"][0], np.array(r0["before"][1]), np.array(r0["before"][2])
    for batch in (r0["batch"], r1["batch"]):
        count, mean0, var0 = merge_moments(count, mean0, var0, batch_moments(np.array(batch), (3,)))
    np.testing.assert_allclose(r0["norm"][1], mean0, rtol=1e-12)
    np.testing.assert_allclose(r0["norm"][2], var0, rtol=1e-12)
    assert r0["plan"] == r1["plan"] == {"rank": 0, "cut": [3, 1]}
    assert r0["diverged"] and r1["diverged"]  # both ranks see it


# Each rank: identical models, then NaN / infinity put into them; what check_in_sync says.
NON_FINITE_WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from compressm_rl.rl import distributed as D
    from policies.actor_critic import ActorCritic

    world = D.init_world("cpu")
    torch.manual_seed(0)
    policy = ActorCritic(5, 2, -np.ones(2), np.ones(2), width=8, state_dims=[3, 2])
    D.broadcast_module(policy, world)
    D.check_in_sync(policy, world)  # in sync and finite: passes

    def outcome(**step):
        try:
            D.check_in_sync(policy, world, **step)
            return None
        except Exception as error:  # the same class and message on every rank, or a bug
            return [type(error).__name__, str(error)]

    nu = policy.actor.blocks[1].lru.nu_log
    with torch.no_grad():
        kept = nu.clone()
        nu[0] = float("nan")  # a blow-up: the same NaN on every rank
    same_nan = outcome()
    with torch.no_grad():
        nu.copy_(kept)
        if world.rank == 1:  # one rank's statistics overflow
            policy.obs_norm.var[2] = float("inf")
    one_inf = outcome(update=7, step=896)
    json.dump({"same_nan": same_nan, "one_inf": one_inf},
              open(f"{sys.argv[1]}/rank{world.rank}.json", "w"))
    D.shutdown(world)
    """
)


def test_non_finite_weights_are_reported_as_a_diverged_training_not_a_bug(tmp_path):
    """NaN in identical weights on every rank is a training blow-up, not ranks out of step
    (NaN != NaN): every rank raises ``NonFiniteWeights`` naming the tensor and the update."""
    script = tmp_path / "worker.py"
    script.write_text(NON_FINITE_WORKER)
    proc = torchrun(script, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1))
    assert r0 == r1  # every rank takes the same decision, with the same words
    kind, message = r0["same_nan"]
    assert kind == "NonFiniteWeights", message
    assert message.startswith("parameter 'actor.blocks.1.lru.nu_log' holds NaN (on every rank)")
    assert "training diverged" in message and "bug" not in message
    kind, message = r0["one_inf"]
    assert kind == "NonFiniteWeights", message
    assert message.startswith(
        "buffer 'obs_norm.var' holds infinity at update 7, env step 896 (on rank 1): "
        "training diverged; lower the learning rate"
    )


def test_merge_moments_equals_the_statistics_of_all_the_data():
    rng = np.random.default_rng(0)
    first, *parts = (rng.normal(loc=k, scale=k + 1, size=(20 + 7 * k, 4)) for k in range(4))
    count, mean, var = float(len(first)), first.mean(0), first.var(0)
    for part in parts:
        count, mean, var = merge_moments(count, mean, var, batch_moments(part, (4,)))
    everything = np.concatenate([first, *parts])
    assert count == len(everything)
    np.testing.assert_allclose(mean, everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, everything.var(0), rtol=1e-12)


def test_a_world_of_one_communicates_nothing():
    world = World()
    assert world.is_main and not world.distributed


def test_a_non_finite_weight_in_a_world_of_one_is_named():
    import torch

    from compressm_rl.rl.distributed import NonFiniteWeights, check_in_sync

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    check_in_sync(module, World(), update=4, step=256)  # finite: nothing to say
    with torch.no_grad():
        module[1].bias[0] = float("inf")
    with pytest.raises(NonFiniteWeights, match=r"parameter '1.bias' holds infinity at update 4"):
        check_in_sync(module, World(), update=4, step=256)


# ----- the runner on two ranks ------------------------------------------------------------
TINY = {"state_dim": 8, "width": 16, "seed": 3}
TINY_PPO = {"num_envs": 2, "rollout_steps": 32, "seq_len": 16, "epochs": 2, "minibatches": 2}

# A rank of a training job through the Python API; "die" makes rank 1 exit mid-run.
RUNNER = textwrap.dedent(
    f"""
    import os, sys
    from compressm_rl.runs import TrainConfig
    from compressm_rl.train import train

    run_dir, mode, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = dict(env_id="Hopper-v5", total_steps=total, **{TINY!r}, ppo={TINY_PPO!r})
    config = TrainConfig.from_dict(settings)
    if mode == "die" and os.environ["RANK"] == "1":
        train(config, run_dir, max_iterations=1, progress=False)
        os._exit(3)  # a rank that dies while the other trains on
    train(config, run_dir, resume=mode == "resume", progress=False,
          max_iterations=1 if mode == "first" else None)
    """
)


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 240):
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    command += ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(free_loopback_port()), str(script), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "compression",
    [["--compress-tol", "0.3"], ["--compress-to", "10", "--heal-steps", "3"]],
    ids=["tol", "budget-heal"],
)
def test_two_ranks_train_and_compress_in_step_and_rank_0_writes(tmp_path, compression):
    """`compressm-rl train --nproc 2` with in-training compression: every iteration ends
    with the ranks' models compared (``check_in_sync``: a mismatch ends the job), so the
    reductions (decided on rank 0 from both ranks' rollouts, applied on both) and the
    healing (on rank 0, then broadcast) kept them identical; rank 0 writes, steps count
    both ranks. The budget case also adapts its lr to the KL averaged over ranks
    (``desired_kl``): ranks stepping at different lrs would fail the check."""
    import yaml

    budget = "--compress-to" in compression
    adaptive = {"desired_kl": 0.01, "anneal_lr": False} if budget else {}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "ppo": {**TINY_PPO, **adaptive}}))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "compressm_rl.cli", "train", "--env", "Hopper-v5"]
    command += ["--total-steps", "384", "--config", str(config), "--out", str(run)]
    command += [*compression, "--compress-at", "0.3,0.6"]
    proc = subprocess.run(
        [*command, "--nproc", "2", "--no-progress"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run saved in") == 1  # rank 0 speaks
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in lines[1:]] == ["128", "256", "384"]  # 2 ranks × 64
    from compressm_rl.runs import load_checkpoint

    state = load_checkpoint(run)
    assert state.world_size == 2 and state.global_step == 384
    events = json.loads((run / "compression.json").read_text())
    events = events["events"] if isinstance(events, dict) else events
    steps = sorted({e["step"] for e in events})
    assert steps == [128, 256]  # two reduction points, each logged once (by rank 0)
    assert len(events) == 2 * 4  # 2 points × (actor, critic) × 2 layers
    assert sum(state.policy.actor.state_dims) < 16  # something was cut
    if budget:
        assert sum(state.policy.actor.state_dims) == sum(state.policy.critic.state_dims) == 10
        assert any(e["kl_healed"] is not None for e in events)
        lrs = [float(row["lr"]) for row in MetricsLog(run).read()]
        assert any(lr != 3e-4 for lr in lrs)  # adapted
    assert (run / "hsv_1.png").exists() and (run / "hsv_2.png").exists()
    # One rank cannot continue a two-rank run: a clear error, nothing written.
    before = (run / "metrics.csv").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "compressm_rl.cli", "train", "--resume", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--nproc 2" in proc.stderr
    assert (run / "metrics.csv").read_text() == before


def test_a_two_rank_run_resumes_on_two_ranks(tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    run = tmp_path / "run"
    first = torchrun(script, str(run), "first", "384")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # one iteration
    resumed = torchrun(script, str(run), "resume", "384")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in lines[1:]] == ["128", "256", "384"]


def test_ctrl_c_stops_a_two_rank_job_saved_and_it_resumes(tmp_path):
    """Ctrl-C on `train --nproc 2`: torchrun passes the signal to each rank once, both
    abandon the iteration in flight (rank 1 may be inside a collective), rank 0 saves the
    last completed one, and the command exits 130 within seconds with one message; the
    run then resumes on two ranks and ends where it would have."""
    import signal
    import time

    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "ppo": TINY_PPO}))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "compressm_rl.cli", "train", "--env", "Hopper-v5"]
    command += ["--total-steps", "768", "--config", str(config), "--out", str(run)]
    command += ["--nproc", "2", "--no-progress"]
    job = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.csv", time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert job.poll() is None and time.monotonic() < deadline, "no iteration finished"
        time.sleep(0.1)
    job.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground command
    start = time.monotonic()
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr[-3000:]
    assert time.monotonic() - start < 60
    assert stderr.count("stopped by SIGINT") == 1
    assert "Traceback" not in stderr and len(stderr.splitlines()) <= 3, stderr
    from compressm_rl.runs import load_checkpoint

    rows = metrics.read_text().splitlines()[1:]
    saved = load_checkpoint(run).global_step
    assert saved == int(rows[-1].split(",")[1]) and saved < 768  # every finished iteration kept
    resumed = subprocess.run(
        [sys.executable, "-m", "compressm_rl.cli", "train", "--resume", str(run), "--nproc", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [int(line.split(",")[1]) for line in metrics.read_text().splitlines()[1:]]
    assert steps == list(range(128, 769, 128))


def _train_command(tmp_path: Path, run: Path, total_steps: int) -> list[str]:
    import yaml

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "ppo": TINY_PPO}))
    command = [sys.executable, "-m", "compressm_rl.cli", "train", "--env", "Hopper-v5"]
    command += ["--total-steps", str(total_steps), "--config", str(config), "--out", str(run)]
    return [*command, "--nproc", "2", "--no-progress"]


def test_nproc_is_bounded_by_the_cpus(tmp_path, capsys):
    from compressm_rl.cli import main

    assert main(["train", "--env", "Hopper-v5", "--out", str(tmp_path / "r"), "--nproc", "1000"])
    assert "--nproc = 1000 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_busy_run_directory_is_one_line_with_two_ranks(tmp_path):
    from compressm_rl.runs import locked_run_dir

    run = tmp_path / "run"
    run.mkdir()
    with locked_run_dir(run):  # another process trains there
        job = subprocess.run(
            _train_command(tmp_path, run, 256), cwd=ROOT, capture_output=True, text=True
        )
    assert job.returncode == 2, job.stderr[-3000:]
    assert job.stderr.count("another process is training") == 1, job.stderr
    assert "Traceback" not in job.stderr and len(job.stderr.splitlines()) == 1, job.stderr


def test_the_ranks_die_with_a_killed_launcher(tmp_path):
    """`kill -9` of `train --nproc 2`: torchrun and the ranks stop (SIGTERM: saved) and
    release the run directory, instead of training on detached."""
    import os
    import signal
    import time

    from compressm_rl.runs import locked_run_dir

    run = tmp_path / "run"
    job = subprocess.Popen(_train_command(tmp_path, run, 100_000), cwd=ROOT)
    metrics, deadline = run / "metrics.csv", time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert job.poll() is None and time.monotonic() < deadline, "no iteration finished"
        time.sleep(0.1)
    job.send_signal(signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 60
    while True:
        try:
            with locked_run_dir(run):
                break  # the ranks are gone: rank 0 held the lock until it exited
        except OSError:
            assert time.monotonic() < deadline, "the ranks still train after their launcher died"
            time.sleep(0.2)
    while leftovers := [p for p in os.listdir("/proc") if p.isdigit() and _runs_in(p, run)]:
        assert time.monotonic() < deadline, f"processes {leftovers} outlived their launcher"
        time.sleep(0.2)


def _runs_in(pid: str, run: Path) -> bool:
    """Whether process ``pid`` runs a command naming ``run`` (a zombie names nothing)."""
    try:
        return str(run) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_a_rank_that_dies_ends_the_job_non_zero(tmp_path):
    import time

    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    start = time.perf_counter()
    proc = torchrun(script, str(tmp_path / "run"), "die", "100000")
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end"


def test_two_nodes_rendezvous_over_loopback(tmp_path):
    """`torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`, both "nodes"
    on this machine (127.0.0.1): they meet, train in step, and rank 0 writes."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
    command += ["--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "test"]
    command += ["--rdzv-endpoint", f"127.0.0.1:{free_loopback_port()}", "--local-addr", "127.0.0.1"]
    command += [str(script), str(run), "full", "256"]
    nodes = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err.decode()[-3000:]
    lines = (run / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in lines[1:]] == ["128", "256"]
