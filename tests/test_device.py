"""``--device cpu|cuda|auto``: on the CPU nothing changes, the rollout moves to
the learner's device once per iteration, a missing CUDA is a clear error before anything
is written, and checkpoints resume on any device. CPU only: real MuJoCo, tiny runs."""

import importlib
from dataclasses import replace

import pytest
import torch

from compressm_rl.cli import main
from compressm_rl.rl import rollout as rollout_module
from compressm_rl.runs import load_checkpoint, load_config, load_policy
from compressm_rl.train import train

CUDA_MISSING = "CUDA is not available"


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without CUDA, also where the tests run on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_and_auto_without_cuda_train_bit_identically(tmp_path, tiny_config, no_cuda):
    trained = {}
    for device in ("cpu", "auto"):
        config = tiny_config(total_steps=128, seed=3, device=device)
        trained[device] = train(config, tmp_path / device, progress=False).state_dict()
    assert trained["cpu"].keys() == trained["auto"].keys()
    for name, value in trained["cpu"].items():
        assert torch.equal(value, trained["auto"][name]), name


def _is_transfer(args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names a device (not a dtype cast alone)."""
    values = [*args, kwargs.get("device")]
    return any(isinstance(v, torch.device | str) for v in values)


def test_the_rollout_moves_to_the_device_once_per_iteration(tmp_path, tiny_config, monkeypatch):
    moves, transfers = [], {"rollout": 0, "move": 0}
    phase = {"now": None}
    original_to, original_move = torch.Tensor.to, rollout_module.Rollout.to

    def counting_to(self, *args, **kwargs):
        if phase["now"] is not None and _is_transfer(args, kwargs):
            transfers[phase["now"]] += 1
        return original_to(self, *args, **kwargs)

    def counted_move(self, device):
        moves.append(torch.device(device))
        phase["now"] = "move"
        try:
            return original_move(self, device)
        finally:
            phase["now"] = None

    def counted_collect(*args, **kwargs):
        phase["now"] = "rollout"
        try:
            return collect(*args, **kwargs)
        finally:
            phase["now"] = None

    # (the package exports the function ``iteration`` under the module's name)
    iteration_module = importlib.import_module("compressm_rl.rl.iteration")
    collect = iteration_module.collect_rollout
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    monkeypatch.setattr(rollout_module.Rollout, "to", counted_move)
    monkeypatch.setattr(iteration_module, "collect_rollout", counted_collect)

    iterations = 3
    config = tiny_config(total_steps=iterations * 64, device="cpu")  # 2 envs x 32 steps
    train(config, tmp_path, progress=False)

    assert moves == [torch.device("cpu")] * iterations  # one move per iteration
    assert transfers["rollout"] == 0  # the 32 steps of a rollout never name a device
    tensors = [
        name
        for name, value in vars(rollout_module.Rollout).get("__dataclass_fields__").items()
        if value.type == "Tensor"
    ]
    assert transfers["move"] == iterations * len(tensors)  # one per tensor (no truncations)


def test_device_cuda_without_cuda_exits_2_before_a_run_directory_exists(tmp_path, capsys, no_cuda):
    out = tmp_path / "run"
    argv = ["train", "--env", "InvertedPendulum-v5", "--out", str(out), "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert CUDA_MISSING in err and "--device cpu" in err, err
    assert not out.exists()


def test_a_config_file_asking_for_cuda_without_cuda_exits_2(tmp_path, capsys, no_cuda):
    cfg, out = tmp_path / "c.yaml", tmp_path / "run"
    cfg.write_text("device: cuda\n")
    argv = ["train", "--env", "InvertedPendulum-v5", "--config", str(cfg), "--out", str(out)]
    assert main(argv) == 2
    assert CUDA_MISSING in capsys.readouterr().err and not out.exists()


def test_train_itself_checks_the_device_before_creating_the_run_directory(
    tmp_path, tiny_config, no_cuda
):
    with pytest.raises(ValueError, match=CUDA_MISSING):
        train(tiny_config(device="cuda"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_an_unknown_device_is_named(tiny_config):
    with pytest.raises(ValueError, match="device = 'gpu' is out of range"):
        tiny_config(device="gpu")


def test_a_run_resumes_with_device_cpu_and_a_cuda_run_loads_without_cuda(
    tmp_path, tiny_config, capsys, no_cuda
):
    run = tmp_path / "run"
    config = tiny_config(total_steps=128, device="auto")
    train(config, run, progress=False, max_iterations=1)  # stopped after its first iteration
    assert load_checkpoint(run).global_step == 64

    # Resuming on a machine without CUDA a run that asked for it: the error names the fix,
    # and nothing in the run directory changes.
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("auto", "cuda"))
    before["config.yaml"] = (run / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert load_config(run).device == "cuda"  # a config that says cuda still loads

    assert main(["train", "--resume", str(run), "--device", "cpu", "--no-progress"]) == 0
    state = load_checkpoint(run)
    assert state.global_step == 128 and state.config.device == "cpu"
    assert state.config == replace(config, device="cpu")
    policy, meta = load_policy(run)
    assert meta["global_step"] == 128
    assert all(p.device.type == "cpu" and p.isfinite().all() for p in policy.parameters())
