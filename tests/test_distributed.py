"""Data-parallel building blocks on real gloo process groups, launched by ``torchrun`` on
the loopback address (127.0.0.1 only), and the moment merge against numpy."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from compressm_rl.rl.distributed import World, batch_moments, merge_moments

ROOT = Path(__file__).resolve().parents[1]

# Each rank: a policy from a rank-dependent seed, its own data; then the collectives.
WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from compressm_rl.rl import distributed as D
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
    (-(log_prob.mean()) + values.square().mean()).backward()
    local = torch.cat([p.grad.reshape(-1) for p in policy.parameters()]).clone()
    D.all_reduce_gradients(policy.parameters(), world)
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

    json.dump({
        "rank": world.rank, "size": world.size,
        "after_broadcast": after_broadcast.tolist(), "local_grad": local.tolist(),
        "averaged_grad": averaged.tolist(), "after_step": after_step.tolist(),
        "before": [before[0], before[1].tolist(), before[2].tolist()], "batch": batch.tolist(),
        "norm": [float(norm.count), norm.mean.tolist(), norm.var.tolist()], "plan": plan,
    }, open(f"{out}/rank{world.rank}.json", "w"))
    D.shutdown(world)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collectives_on_two_gloo_ranks_launched_by_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    command += ["--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(free_port()), str(script), str(tmp_path)]
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
