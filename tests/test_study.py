"""depthpipe.study on rows shaped as dvc.api.exp_show returns them (the real API runs in
tests/test_dvc_e2e.py::test_study__reads_real_experiments)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from depthpipe.errors import DepthpipeError
from depthpipe.study import (
    Difference,
    markdown,
    paired_differences,
    runs_from_rows,
    summarise,
    t_interval,
)


def _row(name: str, aug: str, seed: int, enc: float, scr: float, **extra: Any) -> dict[str, Any]:
    """One exp_show row: enc/scr are abs_rel; delta1 mirrors them (1 - abs_rel)."""
    return {
        "Experiment": name,
        "rev": name[:7],
        "typ": "branch_commit",
        "aug": aug,
        "seed": seed,
        "data.seed": 0,
        "encoder.abs_rel": enc,
        "encoder.delta1": 1 - enc,
        "scratch.abs_rel": scr,
        "scratch.delta1": 1 - scr,
        "prior.abs_rel": 0.9,
        "prior.delta1": 0.2,
        "dvclive/finetune/scratch/metrics.json:val.abs_rel": 0.5,
        **extra,
    }


GRID = [
    _row("a0", "aggressive", 0, 0.50, 0.60),
    _row("a1", "aggressive", 1, 0.52, 0.61),
    _row("a2", "aggressive", 2, 0.49, 0.59),
    _row("c0", "conservative", 0, 0.40, 0.60),
    _row("c1", "conservative", 1, 0.43, 0.61),
    _row("c2", "conservative", 2, 0.41, 0.59),
    {"Experiment": None, "rev": "workspace", "typ": "baseline", "aug": "aggressive", "seed": 9},
]


def test_study__groups_means_and_separated_presets() -> None:
    runs, skipped = runs_from_rows(GRID, [])
    assert len(runs) == 6 and skipped == []  # the workspace row is not a run
    table = summarise(runs, [])
    aggressive = next(row for row in table if row["aug"] == "aggressive")
    assert aggressive["seeds"] == 3
    mean, sd = aggressive["encoder.abs_rel"]
    assert mean == pytest.approx(0.50333, abs=1e-4) and sd == pytest.approx(0.01528, abs=1e-4)
    differences = {(d.label, d.metric): d for d in paired_differences(runs, [])}
    preset = differences[("aggressive - conservative", "abs_rel")]
    assert preset.seeds == 3 and preset.mean == pytest.approx(0.09)
    assert preset.low is not None and preset.low > 0
    assert preset.verdict() == "separated: conservative is better"
    vs_scratch = differences[("conservative - scratch", "abs_rel")]
    assert vs_scratch.mean == pytest.approx(-0.18667, abs=1e-4)
    assert vs_scratch.verdict() == "separated: conservative is better"
    text = markdown(table, list(differences.values()), [])
    assert "| aggressive | 3 | 0.5033 ± 0.0153 |" in text


def test_study__noise_is_not_separated() -> None:
    rows = [
        _row("a0", "aggressive", 0, 0.50, 0.6),
        _row("a1", "aggressive", 1, 0.40, 0.6),
        _row("c0", "conservative", 0, 0.45, 0.6),
        _row("c1", "conservative", 1, 0.46, 0.6),
    ]
    runs, _ = runs_from_rows(rows, [])
    preset = next(d for d in paired_differences(runs, []) if d.label.endswith("conservative"))
    assert preset.verdict().startswith("not separated (the interval covers 0; about ")


def test_t_interval__known_values() -> None:
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert low == pytest.approx(2 - 4.3027 / 3**0.5, abs=1e-3)
    assert high == pytest.approx(2 + 4.3027 / 3**0.5, abs=1e-3)
    assert t_interval([1.0]) == (None, None)


def test_study__one_seed_per_group_says_why_there_is_no_interval() -> None:
    rows = [_row("a0", "aggressive", 0, 0.5, 0.6), _row("c0", "conservative", 0, 0.4, 0.6)]
    runs, _ = runs_from_rows(rows, [])
    differences = paired_differences(runs, [])
    assert differences and all(d.low is None for d in differences)
    assert "no interval: one seed per group" in differences[0].verdict()
    assert "nan" not in markdown(summarise(runs, []), differences, []).lower()


def test_study__experiment_without_metrics_is_left_out_and_named() -> None:
    broken = {k: v for k, v in _row("b0", "aggressive", 3, 0.5, 0.6).items() if "." not in k}
    runs, skipped = runs_from_rows([*GRID, broken], [])
    assert len(runs) == 6
    assert skipped and skipped[0].startswith("b0: no metrics/evaluate.json")


def test_study__no_experiment_or_no_metrics_at_all_is_an_error() -> None:
    with pytest.raises(DepthpipeError, match="no experiments in the project: queue some"):
        runs_from_rows([GRID[-1]], [])
    bare = [{"Experiment": "x", "rev": "abc", "typ": "branch_commit", "aug": "a", "seed": 0}]
    with pytest.raises(DepthpipeError, match=r"no experiment has metrics/evaluate\.json"):
        runs_from_rows(bare, [])


def test_study__by_a_param_that_does_not_exist_is_named() -> None:
    with pytest.raises(DepthpipeError, match=r"--by finetune\.lrr: no such param"):
        runs_from_rows(GRID, ["finetune.lrr"])


def test_study__by_another_param_pairs_within_it(tmp_path: Path) -> None:
    rows = [
        _row(
            f"{aug[0]}{seed}{frozen}",
            aug,
            seed,
            0.4 + 0.01 * seed + 0.1 * (aug == "aggressive"),
            0.6,
            **{"finetune.freeze_encoder": frozen},
        )
        for aug in ("aggressive", "conservative")
        for seed in (0, 1)
        for frozen in (False, True)
    ]
    runs, _ = runs_from_rows(rows, ["finetune.freeze_encoder"])
    table = summarise(runs, ["finetune.freeze_encoder"])
    assert len(table) == 4 and all(row["seeds"] == 2 for row in table)
    labels = {d.label for d in paired_differences(runs, ["finetune.freeze_encoder"])}
    assert "aggressive - conservative, finetune.freeze_encoder=True" in labels


def test_study__networks_against_the_prior_and_scratch_once_per_seed() -> None:
    runs, _ = runs_from_rows(GRID, [])
    differences = {(d.label, d.metric): d for d in paired_differences(runs, [])}
    # prior.abs_rel is 0.9 in every row: conservative encoders 0.40/0.43/0.41
    over_prior = differences[("conservative - prior", "abs_rel")]
    assert over_prior.mean == pytest.approx(0.41333 - 0.9, abs=1e-4)
    assert over_prior.verdict() == "separated: conservative is better"
    # scratch is one network per seed (shared by both presets): 3 values, not 6
    scratch = differences[("scratch - prior", "delta1")]
    assert scratch.seeds == 3
    assert scratch.mean == pytest.approx((1 - 0.6) - 0.2, abs=1e-9)


def test_study__seeds_needed_from_the_measured_spread() -> None:
    # per-seed differences 0.1 and 0.3: mean 0.2, sd 0.1414; t(0.975, n-1) * sd / sqrt(n) drops
    # below 0.2 first at n = 5 (2.776 * 0.1414 / 2.236 = 0.176; n = 4 gives 0.225)
    low, high = t_interval([0.1, 0.3])
    difference = Difference("a - b", "abs_rel", 2, 0.2, low, high, sd=0.1 * 2**0.5)
    assert difference.seeds_needed() == 5
    assert "about 5 seeds would separate" in difference.verdict()
    assert Difference("a - b", "abs_rel", 2, 0.0, -1.0, 1.0, sd=0.1).seeds_needed() is None


def test_study__runs_differing_only_outside_the_grouping_are_refused_not_dropped() -> None:
    """A frozen-encoder run beside the baseline, same aug and seed, without --by: which one
    belongs in the study is not for the study to guess. With --by it is grouped; an exact
    repeat of a run (same params) counts once."""
    params = {"aug", "seed", "data.seed", "finetune.freeze_encoder"}
    base = _row("c0", "conservative", 0, 0.40, 0.60, **{"finetune.freeze_encoder": False})
    frozen = _row("f0", "conservative", 0, 0.45, 0.60, **{"finetune.freeze_encoder": True})
    with pytest.raises(
        DepthpipeError,
        match=r"c0 and f0 have the same aug, seed but differ in "
        r"finetune.freeze_encoder: group by it too, e.g. --by finetune.freeze_encoder",
    ):
        runs_from_rows([base, frozen], [], params=params)
    runs, _ = runs_from_rows([base, frozen], ["finetune.freeze_encoder"], params=params)
    assert sorted(run.name for run in runs) == ["c0", "f0"]
    repeat = _row("r0", "conservative", 0, 0.41, 0.60, **{"finetune.freeze_encoder": False})
    runs, _ = runs_from_rows([base, repeat], [], params=params)
    assert [run.name for run in runs] == ["c0"]


def test_param_keys__dotted_leaves_of_params_yaml(tmp_path: Path) -> None:
    from depthpipe.study import param_keys

    (tmp_path / "params.yaml").write_text("aug: c\nfinetune:\n  lr: 0.1\n  trainer: {devices: 1}\n")
    assert param_keys(tmp_path / "params.yaml") == {
        "aug",
        "finetune.lr",
        "finetune.trainer.devices",
    }
    assert param_keys(tmp_path / "missing.yaml") == set()
