"""Across experiments: does one pretraining preset beat another, and both beat scratch?

    python -m depthpipe.study [--by KEY ...] [--out FOLDER] [--repo PATH]

Reads the experiments through DVC's Python API (``dvc.api.exp_show``), groups them by ``aug`` and
any params given with ``--by``, and reports per group the number of seeds and the mean and
standard deviation of the main metrics; then, for each pair of presets, the per-seed paired
difference (same seed, same other params) with a 95% t-interval over seeds, and the same for
each preset against scratch. A difference whose interval covers zero is reported as not
separated, never as a win. ``--out`` receives ``study.md`` (the same tables) and ``study.png``
(bars: mean over seeds, error bars: one standard deviation).

The recipe that feeds it (each seed re-runs training on the same data, see ``seed`` and
``data.seed`` in params.yaml):

    dvc exp run --queue -S 'aug=aggressive,conservative' -S 'seed=0,1,2'
    dvc queue start
    python -m depthpipe.study --out study/
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from scipy import stats as scipy_stats

from depthpipe.errors import DepthpipeError, run_cli
from depthpipe.metrics import HIGHER_IS_BETTER

METRICS_FILE = "metrics/evaluate.json"
MAIN_METRICS = (
    "encoder.abs_rel",
    "encoder.delta1",
    "scratch.abs_rel",
    "scratch.delta1",
    "prior.abs_rel",
    "prior.delta1",
)
COMPARED = ("abs_rel", "delta1")  # the metrics the paired differences are computed for
# Rows of dvc.api.exp_show that are runs with results: experiments and the commits they started
# from (the workspace row, typ "baseline" with rev "workspace", is left out: it may hold a run
# in progress or uncommitted edits).
RUN_TYPES = ("baseline", "branch_commit", "branch_base")
CONFIDENCE = 0.95
MAX_SEEDS_ESTIMATE = 10_000  # beyond this "more seeds" is not the answer: say nothing


@dataclass(frozen=True)
class Run:
    name: str
    params: dict[str, Any]  # the grouping params, seed included
    metrics: dict[str, float]  # MAIN_METRICS


@dataclass(frozen=True)
class Difference:
    """Mean over seeds of a per-seed paired difference, and its t-interval (None for n < 2)."""

    label: str
    metric: str
    seeds: int
    mean: float
    low: float | None
    high: float | None
    sd: float | None = None  # of the per-seed differences; None for n < 2

    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "no interval: one seed per group (run more seeds, e.g. -S 'seed=0,1,2')"
        if self.low <= 0.0 <= self.high:
            needed = self.seeds_needed()
            scale = (
                f"; about {needed} seeds would separate a difference of this size"
                if needed is not None
                else ""
            )
            return f"not separated (the interval covers 0{scale})"
        first, second = self.label.split(" - ")
        better = first if (self.mean > 0) == HIGHER_IS_BETTER[self.metric] else second
        return f"separated: {better} is better"

    def seeds_needed(self) -> int | None:
        """Seeds whose t-interval would exclude zero if the mean and the spread stayed as measured
        (a planning figure, not a promise); None without a spread or a difference to separate."""
        if self.sd is None or self.sd == 0.0 or self.mean == 0.0:
            return None
        for n in range(2, MAX_SEEDS_ESTIMATE + 1):
            t = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1))
            if t * self.sd / math.sqrt(n) < abs(self.mean):
                return n
        return None


def read_runs(repo: str | None, by: Sequence[str]) -> tuple[list[Run], list[str]]:
    """The project's runs (``dvc.api.exp_show``), see ``runs_from_rows``."""
    import dvc.api

    rows = dvc.api.exp_show(repo=repo)
    keys = param_keys(Path(repo or ".") / "params.yaml")
    return runs_from_rows(rows, by, where=repo or "this project", params=keys)


def param_keys(params_file: Path) -> set[str]:
    """The dotted keys of a params file's leaves, as exp_show names its param columns; none
    when the file is not on this machine (a --repo URL)."""
    try:
        tree = yaml.safe_load(params_file.read_text())
    except OSError:
        return set()

    def leaves(node: Any, prefix: str) -> set[str]:
        if not isinstance(node, dict) or not node:
            return {prefix}
        return {key for k, v in node.items() for key in leaves(v, f"{prefix}{k}.")}

    return {key.rstrip(".") for key in leaves(tree, "")}


def runs_from_rows(
    rows: list[dict[str, Any]],
    by: Sequence[str],
    where: str = "the project",
    params: Collection[str] = (),
) -> tuple[list[Run], list[str]]:
    """Runs with a complete metrics file, and a note for each experiment left out.

    Two runs with the same preset, ``by`` params and seed are one run when every other param in
    ``params`` (the project's params.yaml keys) agrees too, e.g. an experiment that repeats its
    baseline: the first is kept. When another param differs, which one belongs in the study is
    not ours to guess: an error names both runs and the params to add with --by.
    """
    rows = [row for row in rows if row.get("typ") in RUN_TYPES and row.get("rev") != "workspace"]
    if not rows:
        raise DepthpipeError(
            f"no experiments in {where}: queue some with "
            "dvc exp run --queue -S 'aug=aggressive,conservative' -S 'seed=0,1,2'"
        )
    keys = ("aug", *by, "seed")
    _check_params(rows, keys)
    runs: list[Run] = []
    skipped: list[str] = []
    seen: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
    for row in rows:
        name = str(row.get("Experiment") or row.get("rev"))
        metrics = {key: _metric(row, key) for key in MAIN_METRICS}
        missing = [key for key, value in metrics.items() if value is None]
        if missing:
            skipped.append(f"{name}: no {METRICS_FILE} ({', '.join(missing)} missing)")
            continue
        identity = tuple(row[key] for key in keys)
        if identity in seen:
            _check_same_run(seen[identity], (name, row), params, by)
            continue
        seen[identity] = (name, row)
        run_params = {key: row[key] for key in keys}
        runs.append(
            Run(name, run_params, {k: float(v) for k, v in metrics.items() if v is not None})
        )
    if not runs:
        raise DepthpipeError(
            f"no experiment has {METRICS_FILE}: "
            + "; ".join(skipped[:3])
            + (" ..." if len(skipped) > 3 else "")
        )
    return runs, skipped


def _check_same_run(
    first: tuple[str, dict[str, Any]],
    second: tuple[str, dict[str, Any]],
    params: Collection[str],
    by: Sequence[str],
) -> None:
    """Raise when two rows of one (aug, --by, seed) differ in another param."""
    differing = sorted(key for key in params if first[1].get(key) != second[1].get(key))
    if differing:
        raise DepthpipeError(
            f"{first[0]} and {second[0]} have the same aug, seed"
            + "".join(f", {key}" for key in by)
            + f" but differ in {', '.join(differing[:5])}: group by it too, e.g. --by "
            + " ".join([*by, differing[0]])
        )


def _check_params(rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    # Param columns are bare dotted keys; metric and dependency columns hold a path.
    known = sorted(k for k in rows[0] if k[:1].islower() and "/" not in k and ":" not in k)
    for key in keys:
        if all(row.get(key) is None for row in rows):
            raise DepthpipeError(
                f"--by {key}: no such param in the experiments (params.yaml keys are dotted, "
                f"e.g. finetune.lr; some known here: {', '.join(known[:12])})"
            )


def _metric(row: dict[str, Any], key: str) -> float | None:
    """exp_show names a column ``key``, or ``file:key`` when another file has the same key."""
    value = row.get(f"{METRICS_FILE}:{key}", row.get(key))
    return None if value is None or not isinstance(value, int | float) else float(value)


def group_key(run: Run, by: Sequence[str]) -> tuple[Any, ...]:
    return tuple(run.params[key] for key in ("aug", *by))


def summarise(runs: list[Run], by: Sequence[str]) -> list[dict[str, Any]]:
    """Per group: its params, n seeds, and (mean, sd) per main metric (sd None for one seed)."""
    groups: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run, by), []).append(run)
    table = []
    for key, members in sorted(groups.items(), key=lambda item: str(item[0])):
        row: dict[str, Any] = dict(zip(("aug", *by), key, strict=True))
        row["seeds"] = len(members)
        for metric in MAIN_METRICS:
            values = [m.metrics[metric] for m in members]
            sd = statistics.stdev(values) if len(values) > 1 else None
            row[metric] = (statistics.fmean(values), sd)
        table.append(row)
    return table


def t_interval(values: Sequence[float]) -> tuple[float | None, float | None]:
    """CONFIDENCE t-interval of the mean; (None, None) when fewer than 2 values."""
    if len(values) < 2:
        return None, None
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = (
        float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1))
        * sd
        / math.sqrt(len(values))
    )
    return mean - half, mean + half


def paired_differences(runs: list[Run], by: Sequence[str]) -> list[Difference]:
    """Preset vs preset (encoder metrics, same seed and other params) and each preset vs
    scratch (within each run); the mean and t-interval over seeds."""
    by_key = {(group_key(run, by), run.params["seed"]): run for run in runs}
    presets = sorted({run.params["aug"] for run in runs})
    contexts = sorted({group_key(run, by)[1:] for run in runs}, key=str)
    out: list[Difference] = []
    for context in contexts:
        suffix = "".join(f", {k}={v}" for k, v in zip(by, context, strict=True))
        for first, second in itertools.combinations(presets, 2):
            seeds = sorted(
                {s for (g, s) in by_key if g == (first, *context)}
                & {s for (g, s) in by_key if g == (second, *context)}
            )
            for metric in COMPARED:
                values = [
                    by_key[((first, *context), s)].metrics[f"encoder.{metric}"]
                    - by_key[((second, *context), s)].metrics[f"encoder.{metric}"]
                    for s in seeds
                ]
                out.append(_difference(f"{first} - {second}{suffix}", metric, values))
        for preset in presets:
            members = [run for (g, _), run in by_key.items() if g == (preset, *context)]
            for baseline in ("scratch", "prior"):
                for metric in COMPARED:
                    values = [
                        m.metrics[f"encoder.{metric}"] - m.metrics[f"{baseline}.{metric}"]
                        for m in members
                    ]
                    out.append(_difference(f"{preset} - {baseline}{suffix}", metric, values))
        # finetune@scratch does not depend on aug: one value per seed, whichever preset ran it.
        scratch_by_seed = {s: run for (g, s), run in by_key.items() if g[1:] == context}
        for metric in COMPARED:
            values = [
                run.metrics[f"scratch.{metric}"] - run.metrics[f"prior.{metric}"]
                for _, run in sorted(scratch_by_seed.items())
            ]
            out.append(_difference(f"scratch - prior{suffix}", metric, values))
    return [d for d in out if d.seeds > 0]


def _difference(label: str, metric: str, values: list[float]) -> Difference:
    low, high = t_interval(values)
    mean = statistics.fmean(values) if values else math.nan
    sd = statistics.stdev(values) if len(values) > 1 else None
    return Difference(label, metric, len(values), mean, low, high, sd)


def markdown(table: list[dict[str, Any]], differences: list[Difference], by: Sequence[str]) -> str:
    head = ["aug", *by, "seeds", *MAIN_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [str(row[k]) for k in ("aug", *by, "seeds")]
        cells += [_mean_sd(*row[m]) for m in MAIN_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| paired difference (per seed) | metric | seeds | mean | 95% interval | verdict |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for d in differences:
        interval = "-" if d.low is None else f"[{d.low:+.4f}, {d.high:+.4f}]"
        lines.append(
            f"| {d.label} | {d.metric} | {d.seeds} | {d.mean:+.4f} | {interval} | {d.verdict()} |"
        )
    return "\n".join(lines) + "\n"


def _mean_sd(mean: float, sd: float | None) -> str:
    return f"{mean:.4f}" if sd is None else f"{mean:.4f} ± {sd:.4f}"


def bar_chart(table: list[dict[str, Any]], by: Sequence[str], path: Path) -> None:
    """Mean over seeds per group and model, error bars one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COMPARED), figsize=(5.5 * len(COMPARED), 3.6))
    labels = [" ".join(str(row[k]) for k in ("aug", *by)) for row in table]
    for ax, metric in zip(axes, COMPARED, strict=True):
        for offset, model in enumerate(("encoder", "scratch", "prior")):
            stats_ = [row[f"{model}.{metric}"] for row in table]
            xs = [i + (offset - 1) * 0.27 for i in range(len(table))]
            ax.bar(
                xs,
                [m for m, _ in stats_],
                0.27,
                yerr=[sd or 0.0 for _, sd in stats_],
                capsize=3,
                label=model,
            )
        ax.set_xticks(range(len(table)), labels, fontsize=8)
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        ax.set_title(f"test {metric} ({better} is better), mean ± sd over seeds", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(repo: str | None, by: Sequence[str], out: Path | None) -> str:
    runs, skipped = read_runs(repo, by)
    table = summarise(runs, by)
    differences = paired_differences(runs, by)
    report = markdown(table, differences, by)
    notes = [f"left out {note}" for note in skipped]
    if not any(d.low is not None for d in differences):
        notes.append("no interval anywhere: every group has one seed, so nothing can be separated")
    text = report + ("\n" + "\n".join(notes) + "\n" if notes else "")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "study.md").write_text(text)
        bar_chart(table, by, out / "study.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--by", nargs="*", default=[], help="more params to group by (dotted)")
    parser.add_argument("--out", type=Path, help="folder for study.md and study.png")
    parser.add_argument("--repo", help="the DVC project (default: the current one)")
    args = parser.parse_args()
    print(run(args.repo, args.by, args.out), end="")


if __name__ == "__main__":
    run_cli(main)
