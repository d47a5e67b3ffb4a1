"""The five methods train on the real CIFAR-10 files, in both regimes (benchmarks/health.py on a small slice).

This is the check that digits-only and formula tests missed: every method at its paper defaults, no
gradient clipping, from a random network and switched on over a trained one, must keep every loss
term finite, bring down the term it trains, and show in its diagnostics that it did its job.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.health import HealthOptions, render, run_health

pytestmark = [pytest.mark.slow, pytest.mark.cifar]


@pytest.fixture(scope="module")
def rows(cifar_root, tmp_path_factory):
    options = HealthOptions(data_root=str(cifar_root), max_train_per_class=60, max_eval_per_class=10, epochs=2, baseline_epochs=3,
                            losses=("ce",), cache_dir=tmp_path_factory.mktemp("health"), device="cpu")
    return run_health(options), options


def test_every_method_stays_finite_in_both_regimes(rows):
    results, _ = rows
    assert {(r.regime, r.method) for r in results} == {(g, m) for g in ("scratch", "warm") for m in ("none", "smart", "safa", "rsg", "lcreg", "m2m")}
    failed = [f"{r.regime}/{r.method}: {r.failure}" for r in results if not r.finite]
    assert not failed, failed


AUX_TERMS = {"safa": {"recycle_delta", "recycle_feature", "ms_tail", "ms_head", "contrastive"},
             "rsg": {"cesc_center", "mv_contrastive", "mv_direction", "mv_length"},
             "lcreg": {"recon", "latent_aug"}}
#: the term of each method that is trained to go down and does within two epochs, in both regimes
LEARNING_TERM = {"safa": "recycle_delta", "rsg": "cesc_center", "lcreg": "recon"}


def test_each_method_reports_its_aux_terms_and_its_learning_term_goes_down(rows):
    results, _ = rows
    for row in results:
        assert set(row.aux) == AUX_TERMS.get(row.method, set()), (row.regime, row.method, sorted(row.aux))
        for name, (first, last) in row.aux.items():
            assert math.isfinite(first) and math.isfinite(last), (row.regime, row.method, name)
        if row.method in LEARNING_TERM:
            first, last = row.aux[LEARNING_TERM[row.method]]
            assert last < first, (row.regime, row.method, LEARNING_TERM[row.method], first, last)


def test_each_method_did_what_it_is_for(rows):
    """The quantities that mean the method acted, not merely a non-zero number: SMART moved every tail sample
    and weighed it above a head sample's 1 (Sec. 3.5); SAFA and RSG generated features, SAFA's Q tells real from
    generated pairs better than chance; LCReg's reconstruction is below its chance level; M2m tried translations and
    measured g on them.

    M2m cannot be required to keep one here: at the paper's β = 0.999, Eq. 3 keeps a g-passed translation from class
    k0 to k with probability 1 − β^(n_k0 − n_k) ≤ 1 − 0.999^59 = 0.057 on this 60-per-class slice, and the slice makes
    ~9 attempts in two epochs, so E[kept] < 0.6 even if g passed every one. Kept translations are shown where they
    can be: tests/test_aug_m2m.py (a hand-set g and β = 0, each kept row checked against Alg. 1's γ test)."""
    results, _ = rows
    for row in results:
        d, where = row.diagnostics, (row.regime, row.method, row.diagnostics)
        assert all(math.isfinite(value) for value in d.values()), where
        if row.method == "none":
            assert d == {}, where
        elif row.method == "smart":
            assert d["transferred"] > 0 and d["transferred_share"] == 1.0 and d["omega_min"] > 1.0, where
        elif row.method == "safa":
            assert d["generated"] > 0 and d["q_accuracy"] > 0.5, where
            first, last = row.aux["contrastive"]
            assert last < math.log(2), where  # Q's loss below chance (an untrained Q gets there too: see next)
            if row.regime == "scratch":  # Q learns: 0.671 -> 0.603 measured; with Q's term detached 0.680 -> 0.677
                assert last < 0.95 * first, where
        elif row.method == "rsg":
            assert d["generated"] > 0 and d["generating_share"] > 0, where
        elif row.method == "lcreg":
            assert d["recon_ratio"] < 1.0 and d["recon_term"] < d["recon_chance"], where
        elif row.method == "m2m":  # see the note below on why a kept translation is not required here
            assert d["attempts"] > 0 and d["accepted"] <= d["g_passed"] <= d["attempts"], where
            assert 0 < d["g_confidence"] < 1 and d["acceptance_rate"] == d["accepted"] / d["attempts"], where


def test_the_table_renders_one_line_per_run(rows):
    results, options = rows
    table = render(results, options, "python -m benchmarks.health (test)")
    assert table.count("\n| ce |") == len(results)
    assert f"{len(results)} of {len(results)} runs finite." in table
