"""The statistics ``benchmarks/compression.py`` reports its ratios with."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "compression_benchmark", Path(__file__).parents[1] / "benchmarks" / "compression.py"
)
compression_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compression_benchmark)


@pytest.mark.parametrize("paired", [True, False])
def test_bootstrap_interval_covers_the_ratio_of_two_samples_of_one_mean(paired):
    """Two samples of six seeds from one distribution: the 90% interval of the ratio of
    their means holds 1 in about 90% of draws (the plain percentile interval: ~82%)."""
    rng = np.random.default_rng(0)
    draws = 200
    covered = 0
    for i in range(draws):
        a, b = rng.normal(1600, 250, 6), rng.normal(1600, 250, 6)
        ratio, low, high = compression_benchmark.bootstrap_ratio(
            a, b, paired=paired, resamples=2000, seed=i
        )
        assert ratio == pytest.approx(a.mean() / b.mean())
        assert low < ratio < high
        covered += low <= 1.0 <= high
    assert 0.87 <= covered / draws <= 0.97  # the plain intervals: 0.81 and 0.855 here


def test_parting_step_finds_where_a_linked_full_run_left_the_trajectory():
    """Runs that log the same returns up to the first cut are paired; a differing return
    before it is the step they parted at; a difference after the cut is the cut's."""
    full = [{"global_step": str(s), "episode_return": str(r)} for s, r in ((2, 1.0), (4, 2.0))]
    same = [dict(r) for r in full]
    assert compression_benchmark.parting_step(full, same, first_cut=4) is None
    other = [dict(full[0]), {"global_step": "4", "episode_return": "2.5"}]
    assert compression_benchmark.parting_step(full, other, first_cut=4) == 4
    assert compression_benchmark.parting_step(full, other, first_cut=2) is None
    assert compression_benchmark.parting_step(full, other, first_cut=None) == 4
