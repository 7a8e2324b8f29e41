"""The frontier analysis on trials drawn from known laws: recovery, intervals, extrapolation."""

import dataclasses

import numpy as np
import pytest

from mlpgrid.analysis import frontier, isoflop, parametric
from mlpgrid.analysis.frontier import FitError, FitOptions, Point, Trials
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
    """Over repeated draws, the 95% intervals hold the true value at least about 95% of the time,
    for E(C) and for the allocation of each of the three approaches (and E(P, D)'s exponents).
    Resampling trials is conservative for the envelope (a resample that lacks the best trial of
    a budget takes the next best), so the test also bounds how wide the intervals may be."""
    truth = {"alpha": LAW.alpha, "e_inf": LAW.e_inf, "parametric alpha": LAW.alpha_p, "parametric beta": LAW.beta}
    truth |= {f"{name} {k}": getattr(LAW, k) for name in frontier.APPROACHES
              for k in ("params_exponent", "examples_exponent")}  # fmt: skip
    max_width = {"alpha": 0.08, "e_inf": 0.015, "envelope": 0.2, "isoflop": 0.08, "parametric": 0.03}
    rng, draws = np.random.default_rng(1), 16
    covered = dict.fromkeys(truth, 0)
    for i in range(draws):
        boot = frontier.bootstrap(frontier.analyse(draw(LAW, rng)), repeats=60, seed=i)
        intervals = boot.fit_ci() | {f"parametric {k}": v for k, v in boot.parametric_ci().items()}
        intervals |= {f"{name} {k}": v for name in frontier.APPROACHES for k, v in boot.allocation_ci(name).items()}
        for name, value in truth.items():
            low, high = intervals[name]
            covered[name] += low <= value <= high
            kind = name.split()[0]  # E(C)'s alpha and E_inf, or an approach's allocation exponents
            if kind in max_width and name.endswith(("alpha", "e_inf", "exponent")) and " alpha" not in name:
                assert high - low < max_width[kind], name
    assert all(n >= draws - 2 for n in covered.values()), covered


def test_each_approach_recovers_the_synthetic_allocation():
    """One draw of the iso-compute grid: the three allocations, and E(P, D) itself, near the truth
    (over 30 draws the spread of P*'s exponent is 0.022 for the envelope, 0.0045 for the IsoFLOP
    minima and 0.0012 for E(P, D); ``benchmarks/frontier_approaches.py``)."""
    analysis = frontier.analyse(draw(LAW, np.random.default_rng(0)))
    fitted = analysis.fitted
    for name, tolerance in (("envelope", 0.07), ("isoflop", 0.015), ("parametric", 0.005)):
        assert fitted.approach(name).params_exponent == pytest.approx(LAW.params_exponent, abs=tolerance), name
        assert fitted.approach(name).examples_exponent == pytest.approx(LAW.examples_exponent, abs=tolerance), name
    law = fitted.parametric
    assert (law.alpha, law.beta, law.e_inf) == pytest.approx((LAW.alpha_p, LAW.beta, LAW.e_inf), rel=0.02)
    assert law.compute_ratio == pytest.approx(3), "C = 3 P D in the draw"
    assert 1 <= law.converged <= law.starts == parametric.DEFAULT_STARTS
    assert law.optimal_error(1e18) == pytest.approx(LAW.optimal_error(1e18), rel=0.02), "two decades past the data"
    true_best = (LAW.alpha_p * LAW.a / (LAW.beta * LAW.b)) ** (1 / (LAW.alpha_p + LAW.beta)) * (1e14 / 3) ** 0.2593
    assert float(law.params(1e14)) == pytest.approx(true_best, rel=0.05)
    assert float(fitted.isoflop.params(1e14)) == pytest.approx(true_best, rel=0.05)
    assert all(p.status == isoflop.USED for p in fitted.isoflop.profiles if len(p.params) >= 6)


def test_isoflop_minima_of_valleys_steeper_on_one_side_land_near_the_truth():
    """Noise-free profiles of P^-1 against D^-0.35: a parabola through +-0.75 decade put every
    minimum 0.09 decade (24%) too large, towards the shallower side; the cubic's land within
    0.045 decade, 0.02 on average (the bias docs/frontier.md states)."""
    fitted = frontier.analyse(draw(LAW, np.random.default_rng(0), noise=0.0)).fitted
    g = (LAW.alpha_p * LAW.a / (LAW.beta * LAW.b)) ** (1 / (LAW.alpha_p + LAW.beta))
    used = fitted.isoflop.used()
    misses = [np.log10(p.best_params / (g * (p.compute / 3) ** LAW.params_exponent)) for p in used]
    assert len(used) >= 20 and max(np.abs(misses)) < 0.045 and abs(np.mean(misses)) < 0.02, misses


def test_isoflop_profiles_say_why_they_are_not_used():
    """Budgets whose sizes all lie below the best size (an off-centre grid) find the minimum
    outside them; budgets with two sizes have too few; with no usable profile, no fit and why."""
    points = []
    for compute in np.logspace(10, 14, 5):
        best = (LAW.alpha_p * LAW.a / (LAW.beta * LAW.b)) ** (1 / (LAW.alpha_p + LAW.beta))
        best *= (compute / 3) ** LAW.params_exponent
        for params in best * np.logspace(-2.5, -1, 5):  # 10x to 300x smaller than the best size
            examples = compute / (3 * params)
            points.append(Point(compute, float(LAW.error(params, examples)), params, examples, 1, f"P{params:.3g}"))
    trials = Trials(points)
    with pytest.raises(isoflop.IsoFlopError, match="0 of .* usable .*minimum outside the sizes tried"):
        isoflop.fit(trials.curves(1), trials.cells(trials.config_error)[0], trials.compute_ratio)
    curves = trials.curves(1)
    table = curves.at_budgets(trials.cells(trials.config_error)[0])
    assert np.isfinite(table).sum(axis=0).max() == 5, "each budget reads the sizes trained at it"
    two = [p for p in points if p.params < 1.5 * min(q.params for q in points if q.compute == p.compute)]
    assert {len(p.params) for p in profiles(two)} <= {0, 1, 2}
    assert {p.status for p in profiles(two)} == {isoflop.FEW}


def profiles(points):
    trials = Trials(points)
    cell_error = trials.cells(trials.config_error)[0]
    table = trials.curves(1).at_budgets(cell_error)
    return [isoflop._profile(10**c, trials.curves(1).size_log_p[np.isfinite(table[:, i])],
                             table[np.isfinite(table[:, i]), i], "log")
            for i, c in enumerate(trials.curves(1).budgets)]  # fmt: skip


def test_a_fixed_irreducible_error_is_held_in_every_fit():
    analysis = frontier.analyse(draw(LAW, np.random.default_rng(9)), FitOptions(e_inf=0.04))
    assert analysis.fit.e_inf == 0.04 and analysis.fitted.parametric.e_inf == pytest.approx(0.04)
    assert all(law.e_inf == 0.04 for law in analysis.laws.values())
    compute = np.logspace(9, 16, 12)
    with pytest.raises(FitError, match="fixed E_inf of 0.5 must be at least 0 and below every error"):
        frontier.fit_power_law(compute, 0.1 + compute**-0.1, e_inf=0.5)


def test_extrapolation_from_the_cheaper_two_thirds():
    rows = frontier.holdout(draw(LAW, np.random.default_rng(2)), fraction=1 / 3)
    assert len(rows) >= 3
    assert max(r["relative_error"] for r in rows) < 0.06, rows


def test_bootstrap_is_reproducible():
    points = draw(LAW, np.random.default_rng(3))
    analysis = frontier.analyse(points)
    assert frontier.bootstrap(analysis, repeats=10).fit_ci() == frontier.bootstrap(analysis, repeats=10).fit_ci()


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
    short = tmp_path / "short.csv"
    short.write_text("compute,error,params,examples,epochs\n1e12,0.2,1e6\n")
    with pytest.raises(FitError, match="line 2: examples: '' is not a number"):
        frontier.read_csv(short)
    lm = tmp_path / "lm.csv"
    lm.write_text("flops,loss,params,tokens\n6e18,3.1,1e8,1e10\n")
    points, labels = frontier.read_table(lm)
    assert points == [Point(6e18, 3.1, 1e8, 1e10, 1.0)], "without epochs, each row is one pass"
    assert (labels.error, labels.compute, labels.examples) == ("loss", "flops C", "tokens")
    both = tmp_path / "both.csv"
    both.write_text("compute,error,loss,params,examples\n1e12,0.2,0.3,1e6,5e4\n")
    with pytest.raises(FitError, match="both.csv: columns error and loss both give error; keep one"):
        frontier.read_csv(both)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("compute,error,params,examples,epochs,model\n1e12,0.2,1e6,5e4,4,Modèle\n".encode("latin-1"))
    with pytest.raises(FitError, match="latin.csv: not UTF-8 text \\(invalid continuation byte\\); save it as UTF-8"):
        frontier.read_csv(latin)


def test_selection_matches_the_rule_it_states():
    """Seeds averaged, the best setting of each (model, N, T) kept, the frontier the points no
    cheaper-or-equal point beats: on random points with many ties, against the rule written out."""
    rng = np.random.default_rng(5)
    points = [Point(float(rng.choice([1e9, 2e9, 4e9, 8e9])), float(rng.choice([0.1, 0.2, 0.3, 0.4])), 1e5,
                    float(rng.choice([1e3, 2e3])), float(rng.choice([1, 2])), str(rng.choice(["a", "b"])), str(i),
                    (("lr", str(rng.choice([1, 2, 3]))),)) for i in range(300)]  # fmt: skip
    configs: dict = {}
    for p in points:
        configs.setdefault((p.key(), p.compute, p.settings), []).append(p)
    cells: dict = {}
    for (key, compute, _), seeds in configs.items():
        mean = float(np.mean([p.error for p in seeds]))
        if (key, compute) not in cells or mean < cells[(key, compute)][0]:
            cells[(key, compute)] = (mean, seeds[0].trial_id)
    expected = sorted((compute, mean, trial) for (_, compute), (mean, trial) in cells.items())
    selected = frontier.best_settings(points)
    assert {p.trial_id: p.error for p in selected} == pytest.approx({t: m for _, m, t in expected})
    order = [(p.compute, round(p.error, 9)) for p in selected]
    assert order == sorted(order), "by compute, then error"
    envelope, best = [], np.inf
    for _, mean, trial in expected:
        if mean < best - 1e-12:
            envelope.append(trial)
            best = mean
    assert [p.trial_id for p in frontier.lower_envelope(points)] == envelope


def test_a_point_given_many_times_is_one_trial_to_the_intervals():
    """Repeating every row (a CSV concatenated with itself, a grid logged twice) leaves the
    intervals as they were: the bootstrap resamples configurations, not rows."""
    points = draw(LAW, np.random.default_rng(4))
    once = frontier.bootstrap(frontier.analyse(points), repeats=30)
    repeated = frontier.bootstrap(frontier.analyse(points * 100), repeats=30)
    assert once.fit_ci().keys() == repeated.fit_ci().keys()
    for name, interval in (once.fit_ci() | once.allocation_ci()).items():
        assert (repeated.fit_ci() | repeated.allocation_ci())[name] == pytest.approx(interval, rel=1e-6), name


def test_seeds_widen_the_intervals_by_their_spread():
    """Three seeds per configuration whose errors scatter: the intervals are wider than for
    their means given once each, since the seeds are resampled too."""
    points = draw(LAW, np.random.default_rng(6))
    means = frontier.bootstrap(frontier.analyse(points), repeats=40).fit_ci()["alpha"]
    rng = np.random.default_rng(7)
    seeds = [dataclasses.replace(p, error=p.error * float(np.exp(rng.normal(0, 0.05))), trial_id=f"{p.trial_id}{s}")
             for p in points for s in range(3)]  # fmt: skip
    spread = frontier.bootstrap(frontier.analyse(seeds), repeats=40).fit_ci()["alpha"]
    assert spread[1] - spread[0] > means[1] - means[0]


def test_a_dense_grid_is_drawn_as_a_density(tmp_path, monkeypatch):
    from mlpgrid.analysis import plots

    monkeypatch.setattr(plots, "DENSE_POINTS", 100)  # the draw has 243 points
    analysis = frontier.analyse(draw(LAW, np.random.default_rng(8)))
    figures = plots.draw_all(analysis, frontier.bootstrap(analysis, repeats=5), [1e17], tmp_path)
    assert [f.name for f in figures] == ["error_vs_compute.png", "allocation.png", "isoflop.png", "bottlenecks.png"]
    assert all(f.stat().st_size > 10_000 for f in figures)


# E = 0.01 under errors of 0.3 and more, falling slowly: the trials cannot tell E = 0 from E = 0.02.
FLAT_FLOOR = Law(e_inf=0.01, a=3.0, alpha_p=0.15, b=3.0, beta=0.12)


def test_an_irreducible_error_the_trials_do_not_constrain_is_reported_not_identified():
    analysis = frontier.analyse(draw(FLAT_FLOOR, np.random.default_rng(0), noise=0.03))
    law = analysis.fitted.parametric
    low, high = law.e_inf_range
    assert low < law.e_inf / 5 and high > law.e_inf * 5, "held at a tenth or ten times, it fits as well"
    assert any("irreducible error is not identified" in note for note in analysis.notes)
    boot = frontier.bootstrap(analysis, repeats=30)
    spread = boot.parametric_ci()["e_inf"]
    assert spread[1] > 20 * spread[0], "resamples start from the ranked grid too: they find the flat direction"
    summary = frontier.summary(analysis, boot)
    assert summary["approaches"]["parametric"]["law_ci"]["e_inf"] is None
    assert summary["approaches"]["parametric"]["law"]["e_inf_identified"] is False
    assert summary["approaches"]["parametric"]["law_ci"]["beta"] is not None

    determined = frontier.analyse(draw(LAW, np.random.default_rng(0))).fitted.parametric
    assert determined.e_inf_range is None


def test_an_interval_needs_most_resamples_fitted():
    analysis = frontier.analyse(draw(LAW, np.random.default_rng(3)))
    boot = frontier.bootstrap(analysis, repeats=10)
    assert boot.failed == 0 and all(boot.fit_ci().values())
    few = frontier.Bootstrap(boot.samples[:4], failed=6, level=0.95)
    assert not any(few.fit_ci().values()) and few.error_ci(1e14) is None, "4 of 10: no interval"
    most = frontier.Bootstrap(boot.samples[:6], failed=4, level=0.95)
    assert all(most.fit_ci().values())
    assert frontier.summary(analysis, few)["bootstrap"]["intervals"] is False


def test_figures_name_their_models_and_source_and_say_what_they_leave_out(tmp_path, monkeypatch):
    """Up to a dozen models each get a legend entry (no colour bar), the title names what the
    points are of, and a figure that cannot be drawn is named with why."""
    from mlpgrid.analysis import plots

    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.setdefault(path.name, fig) and path)
    sizes = sorted({p.params for p in draw(LAW, np.random.default_rng(3))})[::3]  # 7 of the 21 sizes
    analysis = frontier.analyse([p for p in draw(LAW, np.random.default_rng(3)) if p.params in sizes])
    labels = frontier.Labels(source="demo: fashion-mnist, test_error")
    plots.draw_all(analysis, frontier.bootstrap(analysis, repeats=5), [1e17], tmp_path, labels)
    fig = figures["error_vs_compute.png"]
    ax = fig.axes[0]
    assert len(fig.axes) == 1, "a legend of models, no colour bar"
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum(name.startswith("P") and name.endswith(")") for name in names) == len(sizes), names
    assert ax.get_title().endswith("demo: fashion-mnist, test_error")
    fig.canvas.draw()
    ticks = [t.get_text() for t in ax.yaxis.get_ticklabels(which="both") if t.get_text()]
    assert ticks and all(float(t) > 0 for t in ticks), f"plain numbers, not 4×10⁻¹: {ticks}"
    analysis.fitted.isoflop = None
    analysis.fitted.notes.append("IsoFLOP profiles (approach 2) not fitted: because")
    assert plots.not_drawn(analysis) == {"isoflop.png": "IsoFLOP profiles (approach 2) not fitted: because"}
