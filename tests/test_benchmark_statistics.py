"""The statistics the sweep (``compressm_rl.sweep.stats``) and ``benchmarks/compression.py``
report their ratios with, and the flags both share with `compressm-rl train`."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from compressm_rl.sweep.stats import bootstrap_mean, bootstrap_ratio, parting_step

_spec = importlib.util.spec_from_file_location(
    "compression_benchmark", Path(__file__).parents[1] / "benchmarks" / "compression.py"
)
compression_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compression_benchmark)


@pytest.mark.parametrize("paired", [True, False])
def test_bootstrap_interval_covers_the_ratio_of_two_samples_of_one_mean(paired):
    """Two samples of six seeds from one distribution: the 90% interval of the ratio of
    their means holds 1 in about 90% of draws. The plain percentile interval held it in
    0.79-0.835 (paired) and 0.84-0.845 (unpaired) of 400 draws for three generator seeds,
    the expanded one in 0.88-0.90 and 0.92-0.94."""
    rng = np.random.default_rng(0)
    draws = 400
    covered = 0
    for i in range(draws):
        a, b = rng.normal(1600, 250, 6), rng.normal(1600, 250, 6)
        ratio, low, high = bootstrap_ratio(a, b, paired=paired, resamples=1000, seed=i)
        assert ratio == pytest.approx(a.mean() / b.mean())
        assert low < ratio < high
        covered += low <= 1.0 <= high
    assert 0.86 <= covered / draws <= 0.97


def test_paired_bootstrap_uses_the_pairing():
    """Pairs that move together (one seed's luck in both) give a much narrower paired
    interval than the same numbers resampled apart."""
    rng = np.random.default_rng(1)
    a = rng.normal(1600, 250, 6)
    b = a * rng.normal(1.0, 0.02, 6)
    _, low_p, high_p = bootstrap_ratio(a, b, paired=True)
    _, low_u, high_u = bootstrap_ratio(a, b, paired=False)
    assert high_p - low_p < 0.3 * (high_u - low_u)


def test_bootstrap_refuses_unequal_pairs_and_gives_no_interval_from_one_seed():
    with pytest.raises(ValueError, match="equal lengths"):
        bootstrap_ratio(np.ones(6), np.ones(12), paired=True)
    ratio, low, high = bootstrap_ratio(np.array([2.0]), np.array([1.0]))
    assert ratio == 2.0 and np.isnan(low) and np.isnan(high)
    _, low, high = bootstrap_ratio(np.ones(6), np.ones(12), paired=False)
    assert low == high == 1.0  # a pooled reference against one sample, unpaired


def test_bootstrap_mean_interval_covers_the_mean():
    """Six seeds from one normal distribution: the expanded 90% interval of their mean
    holds the true mean in about 90% of draws; one seed gives no interval."""
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(400):
        mean, low, high = bootstrap_mean(rng.normal(1600, 250, 6), resamples=1000, seed=i)
        assert low < mean < high
        covered += low <= 1600 <= high
    assert 0.85 <= covered / 400 <= 0.97
    mean, low, high = bootstrap_mean(np.array([3.0]))
    assert mean == 3.0 and np.isnan(low) and np.isnan(high)


def test_the_benchmark_re_exports_what_compare_reads():
    """``benchmarks/compare.py`` imports its helpers from ``benchmarks/compression.py``."""
    names = ("TRAIN_RETURN_ITERATIONS", "bootstrap_ratio", "is_done", "run_parting_step")
    for name in (*names, "running_returns", "summarise"):
        assert hasattr(compression_benchmark, name), name
    assert compression_benchmark.bootstrap_ratio is bootstrap_ratio


def test_parting_step_finds_where_a_linked_full_run_left_the_trajectory():
    """Runs that log the same returns up to the first cut are paired; a differing return
    before it is the step they parted at; a difference after the cut is the cut's."""
    full = [{"global_step": str(s), "episode_return": str(r)} for s, r in ((2, 1.0), (4, 2.0))]
    same = [dict(r) for r in full]
    assert parting_step(full, same, first_cut=4) is None
    other = [dict(full[0]), {"global_step": "4", "episode_return": "2.5"}]
    assert parting_step(full, other, first_cut=4) == 4
    assert parting_step(full, other, first_cut=2) is None
    assert parting_step(full, other, first_cut=None) == 4


def test_compare_pairs_a_row_only_where_every_run_kept_the_reference_trajectory(tmp_path):
    """``compare.py`` pairs a row with the reference where each run logged the reference
    run's returns up to its first cut (read from its event log), and only then."""
    import sys

    from compressm_rl.compression import LayerRef, ReductionEvent
    from compressm_rl.runs import EventLog, MetricsLog

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import compare
    finally:
        sys.path.pop(0)

    def run(name: str, returns: list[float], cut: int | None = None) -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        for step, ret in zip((2, 4, 6), returns, strict=True):
            MetricsLog(run_dir).append({"global_step": step, "episode_return": ret})
        if cut is not None:
            EventLog(run_dir).append(
                [ReductionEvent(LayerRef("actor", 0), 8, 4, "applied", step=cut)]
            )
        return run_dir

    full = [run("full0", [1.0, 2.0, 3.0]), run("full1", [1.5, 2.5, 3.5])]
    kept = [run("cut0", [1.0, 2.0, 9.0], cut=4), run("cut1", [1.5, 2.5, 0.5], cut=4)]
    parted = [kept[0], run("cut1b", [1.5, 2.6, 0.5], cut=4)]
    uncut = [run("small0", [1.0, 2.0, 9.0]), run("small1", [1.5, 2.5, 0.5])]
    assert compare.kept_trajectories(kept, full)
    assert not compare.kept_trajectories(parted, full)  # parted before its cut
    assert not compare.kept_trajectories(uncut, full)  # no cut: the whole log must agree
    assert not compare.kept_trajectories(kept[:1], full)  # no partner for every run
    assert compare.kept_trajectories(full, full)


def test_the_benchmark_takes_trains_compression_flags_and_defaults():
    """One vocabulary: `benchmarks/compression.py` spells and defaults every compression
    setting as `compressm-rl train` does (both derived from CompressionConfig)."""
    from compressm_rl.cli import build_parser

    def options(parser) -> dict:
        return {o: a for a in parser._actions for o in a.option_strings}

    train = options(build_parser()._subparsers._group_actions[0].choices["train"])
    bench = options(compression_benchmark.build_parser())
    compression_flags = [o for o in train if o.startswith("--compress") or "heal" in o]
    assert "--compress-to" in compression_flags and "--compress-gramian" in compression_flags
    for flag in [*compression_flags, "--min-state", "--total-steps"]:
        assert flag in bench, flag
        if flag != "--total-steps":  # the benchmark's own default: 1M steps, not a preset
            assert (bench[flag].default, bench[flag].help) == (
                train[flag].default,
                train[flag].help,
            )
    assert not {"--tol", "--gramian", "--allocation", "--at", "--steps"} & set(bench)


def test_the_sweep_takes_every_flag_of_train_s_settings_with_its_defaults():
    """`compressm-rl sweep` spells, defaults and explains every run setting as `train`
    does (both derived from the settings dataclasses by ``add_flags``)."""
    from compressm_rl.cli import build_parser

    def options(parser) -> dict:
        return {o: a for a in parser._actions for o in a.option_strings}

    commands = build_parser()._subparsers._group_actions[0].choices
    train, sweep = options(commands["train"]), options(commands["sweep"])
    settings = [o for o, a in train.items() if a.dest not in ("help", "resume", "overwrite")]
    settings = [o for o in settings if o not in ("--out", "--nproc", "--no-progress")]
    assert {"--total-steps", "--compress-gramian", "--heal-steps", "--env"} <= set(settings)
    for flag in settings:
        assert flag in sweep, flag
        if flag not in ("--env", "--config"):  # their help says what they are to a sweep
            assert (sweep[flag].default, sweep[flag].help) == (
                train[flag].default,
                train[flag].help,
            )


_spec_r = importlib.util.spec_from_file_location(
    "robustness_benchmark", Path(__file__).parents[1] / "benchmarks" / "robustness.py"
)
robustness_benchmark = importlib.util.module_from_spec(_spec_r)
# robustness.py and tasks.py import compression.py by name, as scripts in benchmarks/.
sys.modules.setdefault("compression", compression_benchmark)
_spec_r.loader.exec_module(robustness_benchmark)


def test_held_out_points_are_the_grid_points_outside_the_training_ranges():
    """``wide`` trains on mass 0.7-1.3 and friction 0.5-1.5: of the default 3 x 3 grid only
    the nominal point is inside; an unrandomized key is held out wherever it is not 1."""
    from compressm_rl.runs.evaluate import parse_grid_spec

    grid = parse_grid_spec("mass=0.5:1.5:3,friction=0.3:2.0:3")
    outside = robustness_benchmark.held_out(grid, "wide")
    points = robustness_benchmark.grid_points(grid)
    assert points[4] == (1.0, 1.15) and outside == [True] * 4 + [False] + [True] * 4
    assert robustness_benchmark.held_out(parse_grid_spec("gain=0.8:1.0:2"), "mass=0.5:2") == [
        True,
        False,
    ]


def test_robustness_report_pairs_each_ratio_by_seed():
    """SSM / MLP from per-seed held-out means: a seed where both do badly moves both, so
    the paired interval of two policies that differ by 10% everywhere excludes 1."""
    outside = [True, False]
    luck = np.array([500.0, 1500.0, 900.0, 1200.0])

    def rows(scale):
        return [
            {"train_dist": scale * x, "train_return": x, "grid_means": [scale * x, 0.0]}
            for x in luck
        ]

    methods = {m: rows(1.1 if m != "mlp" else 1.0) for m in robustness_benchmark.METHODS}
    table = {"Hopper-v5": {**methods, "seeds": [0, 1, 2, 3]}}
    args = robustness_benchmark.build_parser().parse_args(["--grid", "mass=0.5:1.0:2"])
    text = robustness_benchmark.report(args, table, outside)
    assert "| Hopper-v5 | SSM / MLP | 1.10 [1.10, 1.10] | 1.10 [1.10, 1.10] |" in text
    assert "| Hopper-v5 | SSM compressed / SSM | 1.00 [1.00, 1.00] |" in text
    # Off the training distribution every policy keeps its held-out / training return.
    assert "| Hopper-v5 | 4 | MLP | 1025 [" in text and "| 1.00 [1.00, 1.00] | 1025 [" in text
    # Per grid point: the held-out mass 0.5 first, then the nominal point, marked inside.
    assert "| task | policy | 0.5 | 1 (in) |" in text
    assert f"| Hopper-v5 | MLP | {luck.mean():.0f} | 0 |" in text


def test_the_stateless_ssm_acts_on_each_observation_alone():
    """Its every action is what a fresh episode would do on that observation; the SSM with
    memory acts differently on the second step (its state then carries the first)."""
    import torch

    from compressm_rl.runs import TorchController
    from policies.actor_critic import ActorCritic

    torch.manual_seed(0)
    policy = ActorCritic(6, 2, -np.ones(2), np.ones(2), width=8, state_dims=[4, 4])
    observations = np.random.default_rng(0).normal(size=(3, 6))
    stateless = robustness_benchmark.StatelessController(policy)
    with_memory = TorchController(policy)
    for obs in observations:
        fresh = TorchController(policy)
        np.testing.assert_array_equal(stateless.act(obs), fresh.act(obs))
    with_memory.act(observations[0])
    assert not np.array_equal(with_memory.act(observations[1]), stateless.act(observations[1]))


_spec_t = importlib.util.spec_from_file_location(
    "tasks_benchmark", Path(__file__).parents[1] / "benchmarks" / "tasks.py"
)
tasks_benchmark = importlib.util.module_from_spec(_spec_t)
_spec_t.loader.exec_module(tasks_benchmark)


def test_task_runs_go_seed_by_seed_and_workers_split_them():
    """Every task gets its first seed before any gets a second; two workers take every
    other run, together all of them once; each run's config is the task's preset."""
    from compressm_rl.rl.config import PPOConfig, preset_for

    args = tasks_benchmark.build_parser().parse_args(
        ["--envs", "Ant-v5,Humanoid-v5", "--seeds", "0,1", "--out", "o"]
    )
    runs = tasks_benchmark.runs(args)
    assert [(env, seed) for env, seed, _ in runs] == [
        ("Ant-v5", 0),
        ("Humanoid-v5", 0),
        ("Ant-v5", 1),
        ("Humanoid-v5", 1),
    ]
    assert runs[0::2] + runs[1::2] != runs and sorted(runs[0::2] + runs[1::2]) == sorted(runs)
    config = tasks_benchmark.config_of(args, "Ant-v5", 1)
    preset = preset_for("Ant-v5")  # not the defaults: the file's values are applied
    assert config.seed == 1 and config.ppo.lr == preset.lr != PPOConfig().lr
    assert config.ppo.with_overrides(total_steps=preset.total_steps) == preset
    assert config.ppo.total_steps == 1_000_000
