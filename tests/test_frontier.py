"""The frontier analysis on trials drawn from known laws: recovery, intervals, extrapolation."""

import numpy as np
import pytest

from mlpgrid import frontier
from mlpgrid.frontier import FitError, Point
from synthetic_law import Law, draw

LAW = Law()


def test_seeds_are_averaged_and_the_best_setting_kept():
    points = [
        Point(1e9, 0.30, 1e5, 1e4, 1, "B-1/Wi-8", "a", (("lr", "1e-3"),)),
        Point(1e9, 0.20, 1e5, 1e4, 1, "B-1/Wi-8", "b", (("lr", "1e-3"),)),  # another seed of the same
        Point(1e9, 0.26, 1e5, 1e4, 1, "B-1/Wi-8", "c", (("lr", "3e-3"),)),
        Point(2e9, 0.40, 1e5, 1e4, 2, "B-1/Wi-8", "d", (("lr", "1e-3"),)),
    ]
    best = frontier.best_settings(points)
    assert [(p.trial_id, p.error) for p in best] == [("a", pytest.approx(0.25)), ("d", 0.40)]
    assert frontier.lower_envelope(best) == best[:1], "a costlier, worse point is not on the frontier"


def test_lower_envelope_keeps_only_improvements():
    errors = {1e9: 0.5, 2e9: 0.6, 3e9: 0.4, 4e9: 0.4, 5e9: 0.3}
    points = [Point(c, e, 1, 1, c / 1e9) for c, e in errors.items()]
    assert [p.compute for p in frontier.lower_envelope(points)] == [1e9, 3e9, 5e9]


@pytest.mark.parametrize("space", ["log", "linear"])
def test_exact_power_law_is_recovered(space):
    truth = frontier.PowerLaw(a=50.0, b=3e9, alpha=0.3, e_inf=0.04)
    compute = np.logspace(9, 16, 12)
    fit = frontier.fit_power_law(compute, truth(compute), space)
    assert fit.alpha == pytest.approx(0.3, rel=1e-3) and fit.e_inf == pytest.approx(0.04, rel=1e-3)
    assert fit(1e18) == pytest.approx(truth(1e18), rel=1e-3)


def test_too_few_frontier_points_are_refused_with_the_number_needed():
    points = [Point(c, 0.5 / (1 + i), 1e5, 1e4, i + 1) for i, c in enumerate(np.logspace(9, 12, 4))]
    with pytest.raises(FitError, match="frontier of 4; .* needs at least 5 frontier points"):
        frontier.analyse(points)
    flat = [Point(c, 0.3, 1e5, 1e4, i + 1) for i, c in enumerate(np.logspace(9, 12, 10))]
    with pytest.raises(FitError, match="frontier of 1"):
        frontier.analyse(flat)


def test_a_frontier_that_does_not_fall_like_a_power_law_is_refused():
    compute = np.logspace(9, 12, 8)
    error = np.array([0.5, 0.49999, 0.49998, 0.49997, 0.1, 0.09999, 0.09998, 0.09997])  # one cliff
    with pytest.raises(FitError, match="degenerate|did not converge"):
        frontier.fit_power_law(compute, error)


def test_synthetic_law_is_recovered():
    """One draw of 243 trials, 2% noise: exponents and E_inf land near the truth (the spread over
    draws is 0.006 for alpha, 0.0012 for E_inf and 0.02 for the allocation exponents)."""
    analysis = frontier.analyse(draw(LAW, np.random.default_rng(0)))
    assert analysis.fit.alpha == pytest.approx(LAW.alpha, abs=0.02)
    assert analysis.fit.e_inf == pytest.approx(LAW.e_inf, abs=0.005)
    assert analysis.allocation.params_exponent == pytest.approx(LAW.params_exponent, abs=0.07)
    assert analysis.allocation.examples_exponent == pytest.approx(LAW.examples_exponent, abs=0.07)
    assert analysis.fit(1e18) == pytest.approx(LAW.optimal_error(1e18), rel=0.05), "two decades past the data"


def test_bootstrap_intervals_cover_the_truth():
    """Over repeated draws, the 95% intervals hold the true value at least about 95% of the time.
    Resampling trials is conservative here (a resample that lacks the best trial of a budget
    takes the next best), so the test also bounds how wide the intervals may be."""
    truth = {"alpha": LAW.alpha, "e_inf": LAW.e_inf, "params_exponent": LAW.params_exponent,
             "examples_exponent": LAW.examples_exponent}  # fmt: skip
    max_width = {"alpha": 0.08, "e_inf": 0.015, "params_exponent": 0.2, "examples_exponent": 0.2}
    rng, draws = np.random.default_rng(1), 16
    covered = dict.fromkeys(truth, 0)
    for i in range(draws):
        boot = frontier.bootstrap(draw(LAW, rng), repeats=60, seed=i)
        intervals = boot.fit_ci() | boot.allocation_ci()
        for name, value in truth.items():
            low, high = intervals[name]
            covered[name] += low <= value <= high
            assert high - low < max_width[name], name
    assert all(n >= draws - 2 for n in covered.values()), covered


def test_extrapolation_from_the_cheaper_two_thirds():
    rows = frontier.holdout(draw(LAW, np.random.default_rng(2)), fraction=1 / 3)
    assert len(rows) >= 3
    assert max(r["relative_error"] for r in rows) < 0.06, rows


def test_bootstrap_is_reproducible():
    points = draw(LAW, np.random.default_rng(3))
    assert frontier.bootstrap(points, repeats=10).fit_ci() == frontier.bootstrap(points, repeats=10).fit_ci()


def test_csv_points_and_their_errors(tmp_path):
    good = tmp_path / "points.csv"
    good.write_text("compute,error,params,examples,epochs,model,lr\n1e12,0.2,1e6,5e4,4,B-2/Wi-128,1e-3\n")
    [point] = frontier.read_csv(good)
    assert point == Point(1e12, 0.2, 1e6, 5e4, 4, "B-2/Wi-128", "", (("lr", "1e-3"),))
    missing = tmp_path / "missing.csv"
    missing.write_text("compute,eror,params,examples,epochs\n1e12,0.2,1e6,5e4,4\n")
    with pytest.raises(FitError, match="missing.csv: missing column\\(s\\) error"):
        frontier.read_csv(missing)
    bad = tmp_path / "bad.csv"
    bad.write_text("compute,error,params,examples,epochs\n1e12,0.2,1e6,5e4,4\n1e13,abc,1e6,5e4,-1\n")
    with pytest.raises(FitError) as e:
        frontier.read_csv(bad)
    assert "bad.csv: line 3: error: 'abc' is not a number" in str(e.value)
    assert "bad.csv: line 3: epochs: -1 must be positive and finite" in str(e.value)
