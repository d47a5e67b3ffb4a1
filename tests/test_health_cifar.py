"""The five methods train on the real CIFAR-10 files, in both regimes (benchmarks/health.py on a small slice).

This is the check that digits-only and formula tests missed: every method at its paper defaults, no
gradient clipping, from a random network and switched on over a trained one, must keep every loss
term finite, move its aux terms, and say what it did.
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


def test_aux_terms_are_finite_and_move(rows):
    results, _ = rows
    for row in results:
        for name, (first, last) in row.aux.items():
            assert math.isfinite(first) and math.isfinite(last), (row.regime, row.method, name)
        if row.method in ("safa", "rsg", "lcreg"):
            assert row.aux, f"{row.regime}/{row.method} reported no aux term"
            assert any(first != last for first, last in row.aux.values()), (row.regime, row.method, row.aux)


def test_every_method_reports_non_zero_diagnostics(rows):
    results, _ = rows
    for row in results:
        if row.method == "none":
            assert row.diagnostics == {}
            continue
        assert row.diagnostics, f"{row.regime}/{row.method} reported no diagnostics"
        assert any(value != 0 for value in row.diagnostics.values()), (row.regime, row.method, row.diagnostics)
        assert all(math.isfinite(value) for value in row.diagnostics.values()), (row.regime, row.method, row.diagnostics)


def test_the_table_renders_one_line_per_run(rows):
    results, options = rows
    table = render(results, options, "python -m benchmarks.health (test)")
    assert table.count("\n| ce |") == len(results)
    assert f"{len(results)} of {len(results)} runs finite." in table
