"""The recipe recovers a planted subspace, better as the SAE's features become monosemantic."""

import pytest

from ssae_kernels.recipes.subspace.recovery import planted_recovery, recovery_curve


def test_monosemantic_features_recover_the_planted_subspace_exactly():
    for seed in range(3):
        r = planted_recovery(0.0, seed=seed)
        assert r["error"] < 1e-5 and max(r["angles_degrees"]) < 1e-2
        assert r["selected_behaviour"] == 1.0


def test_recovery_error_shrinks_as_features_become_monosemantic():
    rows = recovery_curve((0.0, 0.05, 0.1, 0.2, 0.4), seeds=3)
    errors = [r["error_mean"] for r in rows]
    assert errors == sorted(errors) and len(set(errors)) == len(errors), errors  # strictly growing with eps
    assert errors[0] < 1e-5 and errors[-1] > 0.3
    angles = [r["largest_angle_degrees_mean"] for r in rows]
    assert angles == sorted(angles) and angles[-1] > 15


def test_error_is_the_sine_of_the_largest_principal_angle():
    import math

    r = planted_recovery(0.3, seed=1)
    assert r["error"] == pytest.approx(math.sin(math.radians(max(r["angles_degrees"]))), rel=1e-6)
    assert r["angles_degrees"] == sorted(r["angles_degrees"])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="eps"):
        planted_recovery(1.0)
    with pytest.raises(ValueError, match="rank"):
        planted_recovery(0.1, rank=9, behaviour_features=8)


def test_write_recovery_writes_the_plot_and_its_numbers(tmp_path):
    import json

    from ssae_kernels.recipes.subspace.recovery import write_recovery

    out = str(tmp_path / "recovery")
    rows = write_recovery(out, eps_values=(0.0, 0.2), seeds=1)
    with open(out + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads(open(out + ".json").read())["rows"] == rows and rows[1]["error_mean"] > rows[0]["error_mean"]
