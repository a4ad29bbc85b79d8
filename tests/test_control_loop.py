"""The C control loop (``compressm_rl.control_loop``): an exported ``policy.c`` driving
MuJoCo's C library, built with the host's gcc and the ``mujoco`` wheel's ``libmujoco``
(no mocks). Its returns must be the ones ``evaluate`` gets from the same export through
Gymnasium, bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_c_export import write_sources

from compressm_rl.control_loop import format_loop_report, run_loop
from compressm_rl.runs.evaluate import evaluate
from envs import make_env
from export.c_build import ToolchainError
from export.c_runtime import CPolicy
from export.onnx_export import build_model
from policies.actor_critic import ActorCritic

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")

TASKS = [
    "Hopper-v5",
    "InvertedPendulum-v5",
    "Walker2d-v5",
    "HalfCheetah-v5",
    "Hopper-v5-P",
    "Swimmer-v5",
    "Ant-v5",
    "Humanoid-v5",
]


def write_export(env_id: str, out: Path) -> Path:
    """A randomly initialised SSM policy for ``env_id``, exported to C as ``compressm-rl
    export --format c`` writes it (the elementwise graph)."""
    env = make_env(env_id)
    obs_dim, space = env.observation_space.shape[0], env.action_space
    env.close()
    torch.manual_seed(0)
    policy = ActorCritic(
        obs_dim, space.shape[0], space.low, space.high, width=16, state_dims=[6, 4]
    )
    return write_sources(build_model(policy, env_id, merged=False), out)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loop_exports")
    return {env_id: write_export(env_id, root / env_id) for env_id in TASKS}


@pytest.mark.parametrize("env_id", TASKS)
def test_returns_equal_evaluate(exports, env_id):
    # 1000 steps: HalfCheetah and Swimmer never terminate; Ant seldom falls at random.
    episodes = 1 if env_id in ("HalfCheetah-v5", "Swimmer-v5", "Ant-v5") else 3
    result = run_loop(exports[env_id], episodes=episodes, seed=7)
    expected = evaluate(CPolicy(exports[env_id]), env_id, episodes, seed=7)
    np.testing.assert_array_equal(result["returns"], expected)  # bit for bit
    assert result["env_id"] == env_id and result["episodes"] == episodes
    assert result["steps"] == sum(result["episode_lengths"]) > episodes
    assert result["nonfinite_steps"] == 0 and result["mujoco_warnings"] == 0
    assert result["deadline_misses"] == 0 and result["rate_hz"] is None


def test_rate_run_reports_the_fields(exports):
    export = exports["Hopper-v5"]
    result = run_loop(export, episodes=2, seed=3, rate_hz=2000)
    assert result["returns"] == run_loop(export, episodes=2, seed=3)["returns"]
    assert result["rate_hz"] == 2000 and result["period_ns"] == 500_000
    assert isinstance(result["deadline_misses"], int)
    assert 0 <= result["deadline_misses"] <= result["steps"] == sum(result["episode_lengths"])
    for summary in (result, result["control_step"], result["wake_latency"]):
        values = [summary[k] for k in ("p50_us", "p99_us", "p999_us", "max_us")]
        assert all(isinstance(v, float) for v in values) and values == sorted(values)
    assert result["control_step"]["p50_us"] > result["p50_us"] > 0
    assert isinstance(result["max_lateness_us"], float)
    for name in ("sched_fifo", "mlockall"):
        assert isinstance(result[name], bool) and result[f"{name}_note"]
        assert result[name] == (result[f"{name}_note"] == "ok")
    assert result["machine"] and result["mujoco_version"]
    assert result["page_faults"] >= 0 and result["involuntary_switches"] >= 0
    assert result["steal_ms"] is None or result["steal_ms"] >= 0
    report = format_loop_report(result)
    assert "policy step" in report and "control step" in report and "2000 Hz" in report
    assert result["spin_us"] == 0.0

    spun = run_loop(export, episodes=1, seed=3, rate_hz=2000, spin_us=100.0)
    assert spun["spin_us"] == 100.0 and spun["returns"] == result["returns"][:1]
    assert "the last 100 µs of each wait spun" in format_loop_report(spun)

    plain = run_loop(export, episodes=1, seed=3, realtime=False)
    assert not plain["sched_fifo"] and plain["sched_fifo_note"] == "not requested"
    assert not plain["mlockall"] and "deadline misses: -" in format_loop_report(plain)


@pytest.mark.parametrize("env_id", ["Reacher-v5", "Pusher-v5", "NoSuchTask-v0"])
def test_unsupported_tasks_are_refused_before_building(exports, env_id, tmp_path):
    # A build would fail on the missing directory; the ValueError comes first.
    with pytest.raises(ValueError, match="supported: InvertedPendulum-v5, Hopper-v5") as error:
        run_loop(exports["Hopper-v5"], env_id=env_id, build_dir=tmp_path / "absent")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(episodes=0), "episodes"),
        (dict(episodes=2.5), "episodes"),
        (dict(episodes=True), "episodes"),
        (dict(seed=-1), "seed"),
        (dict(rate_hz=-100.0), "rate_hz"),
        (dict(rate_hz=float("nan")), "rate_hz"),
        (dict(rate_hz=1e9), "rate_hz"),
        (dict(rate_hz="fast"), "rate_hz"),
        (dict(spin_us=50.0), "give rate_hz too"),
        (dict(rate_hz=1000, spin_us=1000.0), "not shorter than the period"),
        (dict(rate_hz=1000, spin_us=-1.0), "spin_us"),
        (dict(env_id="Walker2d-v5"), "trained on another task"),
    ],
)
def test_bad_arguments_are_refused_before_building(exports, kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        run_loop(exports["Hopper-v5"], build_dir=tmp_path / "absent", **kwargs)


def test_missing_gcc_names_the_package(exports, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainError, match="apt-get install gcc"):
        run_loop(exports["InvertedPendulum-v5"], episodes=1)


def test_nothing_is_written_beside_the_export(exports, tmp_path):
    export = exports["InvertedPendulum-v5"]
    before = sorted(p.name for p in export.iterdir())
    run_loop(export, episodes=1, build_dir=tmp_path)
    assert sorted(p.name for p in export.iterdir()) == before
    assert list(tmp_path.iterdir()) == []  # the build directory is removed


def test_the_loop_sums_as_numpy_does(tmp_path):
    """The loop's sums (ctrl and contact costs, Humanoid's mass) round as ``np.sum``'s
    pairwise order does, for float64 and float32 and lengths 1–300: the random-policy
    episodes above touch only a few contacts, where any order gives the same sum."""
    import re
    import subprocess

    from compressm_rl.control_loop import LOOP_FLAGS
    from compressm_rl.control_loop_c import LOOP_SOURCE

    functions = re.findall(r"^static (?:double|float) np_sum\w*\(.*?^}\n", LOOP_SOURCE, re.S | re.M)
    assert len(functions) == 2
    harness = tmp_path / "sums.c"
    harness.write_text(
        "#include <stdint.h>\n#include <stdio.h>\n#include <stdlib.h>\n"
        + "".join(functions)
        + """
int main(void) {  /* stdin: n, then n doubles; stdout: np_sum and np_sum_f32 of them */
    int64_t n;
    while (fread(&n, sizeof n, 1, stdin) == 1) {
        double *a = malloc(sizeof(double) * n);
        float *b = malloc(sizeof(float) * n);
        if (fread(a, sizeof(double), n, stdin) != (size_t)n) return 1;
        for (int64_t i = 0; i < n; ++i) b[i] = (float)a[i];
        double s = np_sum(a, n);
        float t = np_sum_f32(b, n);
        fwrite(&s, sizeof s, 1, stdout);
        fwrite(&t, sizeof t, 1, stdout);
        free(a);
        free(b);
    }
    return 0;
}
"""
    )
    program = tmp_path / "sums"
    subprocess.run(["gcc", *LOOP_FLAGS, "-o", program, harness], check=True)
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal(n) * 10.0 ** rng.integers(-4, 5, n)
        for n in (*range(1, 40), 64, 84, 127, 128, 129, 200, 255, 256, 300)
    ]
    stdin = b"".join(np.int64(len(a)).tobytes() + a.tobytes() for a in arrays)
    out = subprocess.run([program], input=stdin, capture_output=True, check=True).stdout
    record = np.dtype([("f64", "<f8"), ("f32", "<f4")])
    sums = np.frombuffer(out, dtype=record)
    np.testing.assert_array_equal(sums["f64"], [np.sum(a) for a in arrays])
    np.testing.assert_array_equal(sums["f32"], [np.sum(a.astype(np.float32)) for a in arrays])
