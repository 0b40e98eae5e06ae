"""A Markdown report of several runs side by side: ``lightning-ft report RUN_DIR [RUN_DIR ...] --out report.md``.

A run folder is what a Trainer's logger wrote (``CSVLogger`` / ``TensorBoardLogger`` version folder, or the
``default_root_dir`` without a logger). The report reads from each:

* the configuration: ``config.yaml`` (``lightning-ft`` / LightningCLI), else ``hparams.yaml``; flattened to dotted
  keys, and only the keys whose values differ between runs are shown;
* the final metrics: ``metrics_test.json`` and ``metrics_val.json`` (written by ``FineTuneModule`` at the end of
  test / validation), else the last value of each column of ``metrics.csv``;
* the curves: ``loss_history.json`` (else ``train/loss`` and ``val/loss`` of ``metrics.csv``) for one loss plot of
  every run, and every ``figures/*.png`` (ROC, PR, reliability, confusion matrix, ...) in a table with a column per
  run.

Images are linked by paths relative to the report, so keep the run folders where they are (or copy them along).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_ft.io import check_output, write_text_atomic

CONFIG_FILES = ("config.yaml", "hparams.yaml")
#: the first line of every report written here: an existing file that starts with it is ours to replace
REPORT_MARK = "<!-- lightning-ft report -->"
#: configuration keys that differ between any two runs and say nothing about the method
NOISE_KEYS = ("default_root_dir", "save_dir", "dirpath", "ckpt_path", "adapter_dir", "merged_dir", "output_path")


@dataclass
class RunSummary:
    """What the report shows of one run folder."""

    name: str
    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    losses: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``{"a.b.c": leaf}``; lists stay leaves."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def read_config(folder: Path) -> dict[str, Any]:
    import yaml

    class Loader(yaml.SafeLoader):
        """Safe loading, plus Lightning's ``hparams.yaml`` tags (``!!python/tuple`` ...) read as plain values."""

    def python_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        return loader.construct_scalar(node)

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", python_tag)
    for name in CONFIG_FILES:
        path = folder / name
        if path.exists():
            with open(path) as f:
                return flatten(yaml.load(f, Loader=Loader) or {})
    return {}


def last_csv_values(path: Path) -> dict[str, float]:
    """The last non-empty value of every metric column of a ``CSVLogger`` ``metrics.csv``."""
    out: dict[str, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k not in ("step", "epoch") and v not in ("", None):
                    out[k] = float(v)
    return out


def csv_series(path: Path, name: str) -> list[tuple[int, float]]:
    from lightning_ft.report import read_metric_series

    return read_metric_series(path, name)


def load_run(folder: str | os.PathLike, name: str | None = None) -> RunSummary:
    """Read one run folder (see the module docstring); a clear error when it holds none of those files."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"run folder {folder} does not exist (give the logger's version folder, e.g. logs/version_0)"
        )
    run = RunSummary(name or folder.name, folder, read_config(folder))
    csv_path = folder / "metrics.csv"
    if csv_path.exists():
        run.metrics.update(last_csv_values(csv_path))
    for stage in ("val", "test"):
        path = folder / f"metrics_{stage}.json"
        if path.exists():
            run.metrics.update(
                {k: float(v) for k, v in json.loads(path.read_text()).items() if k.startswith(f"{stage}/")}
            )
    history = folder / "loss_history.json"
    if history.exists():
        run.losses = {k: [(int(s), float(v)) for s, v in pts] for k, pts in json.loads(history.read_text()).items()}
    elif csv_path.exists():
        run.losses = {k: csv_series(csv_path, k) for k in ("train/loss", "val/loss")}
    for png in sorted((folder / "figures").glob("*.png")):
        run.figures[png.stem] = png
    if not (run.config or run.metrics or run.figures):
        raise FileNotFoundError(
            f"{folder} holds no config.yaml / hparams.yaml, metrics.csv, metrics_*.json or figures/: is it a run "
            "folder? Give the folder a logger wrote (e.g. runs/x/logs/version_0)."
        )
    return run


def _cell(value: Any, metric: bool = False) -> str:
    if metric and isinstance(value, float):
        return f"{value:.4f}"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text.replace("|", "\\|")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def config_differences(runs: Sequence[RunSummary]) -> list[str]:
    """Dotted configuration keys whose values differ between the runs (paths and folders left out)."""
    keys = sorted({k for r in runs for k in r.config})
    missing = object()
    return [
        k
        for k in keys
        if not any(k.endswith(n) for n in NOISE_KEYS) and len({repr(r.config.get(k, missing)) for r in runs}) > 1
    ]


def write_run_report(
    run_dirs: Sequence[str | os.PathLike | RunSummary],
    out: str | os.PathLike,
    names: Sequence[str] | None = None,
    title: str = "Run report",
    overwrite: bool = False,
) -> Path:
    """Write the Markdown report of ``run_dirs`` to ``out`` (and ``<out stem>_loss.png`` next to it); return ``out``.

    ``names`` label the runs (default: the folder names, made unique). An entry may also be a ready
    :class:`RunSummary` (e.g. a zero-shot test whose numbers you hold in memory), shown as it is. An existing
    ``out`` or loss PNG is replaced only when this function wrote it (or with ``overwrite=True``); anything else
    there is a clear error before anything is written.
    """
    if not run_dirs:
        raise ValueError("give at least one run folder")
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} names for {len(run_dirs)} run folders")
    folders = [d.folder if isinstance(d, RunSummary) else Path(d) for d in run_dirs]
    labels = list(names) if names else _unique_names(folders)
    runs = [d if isinstance(d, RunSummary) else load_run(d, n) for d, n in zip(run_dirs, labels)]
    from lightning_ft.report import is_own_plot

    out = check_output(out, "report", is_own=is_own_report, folder=False, overwrite=overwrite)
    loss_png = check_output(
        out.with_name(out.stem + "_loss.png"), "report loss plot", is_own=is_own_plot, folder=False, overwrite=overwrite
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [REPORT_MARK, f"# {title}", ""]
    lines += _table(["run", "folder"], [[r.name, f"`{_rel(r.folder, out)}`"] for r in runs]) + [""]

    diff = config_differences(runs)
    lines += ["## Configuration differences", ""]
    if diff:
        lines += _table(
            ["key", *(r.name for r in runs)], [[k, *(_cell(r.config.get(k, "-")) for r in runs)] for k in diff]
        )
    else:
        lines.append("The runs share every configuration value read (or none was found).")
    lines.append("")

    metric_names = sorted({k for r in runs for k in r.metrics if k.split("/")[0] in ("val", "test")})
    lines += ["## Final metrics", ""]
    if metric_names:
        rows = [[m, *(_cell(r.metrics[m], metric=True) if m in r.metrics else "-" for r in runs)] for m in metric_names]
        lines += _table(["metric", *(r.name for r in runs)], rows)
    else:
        lines.append("No validation or test metrics found.")
    lines.append("")

    if any(any(r.losses.values()) for r in runs):
        from lightning_ft.evaluation.figures import loss_figure, save_png

        series = {f"{r.name} {k}": v for r in runs for k, v in r.losses.items() if v}
        save_png(loss_figure(series, "loss"), loss_png)
        lines += ["## Loss curves", "", f"![loss curves]({_rel(loss_png, out)})", ""]

    figure_names = sorted({k for r in runs for k in r.figures if k != "loss_curve"})
    if figure_names:
        lines += ["## Figures", ""]
        rows = [
            [f, *(f"![{f}]({_rel(r.figures[f], out)})" if f in r.figures else "-" for r in runs)] for f in figure_names
        ]
        lines += _table(["figure", *(r.name for r in runs)], rows) + [""]
    write_text_atomic(out, "\n".join(lines))
    return out


#: what a test writes into the run folder (``FineTuneModule``); the configuration files are copied, not moved
TEST_OUTPUTS = ("metrics_test.json", "generations_test.jsonl", "figures", "confusion_matrix_test.md")


def move_test_outputs(run: str | os.PathLike, to: str | os.PathLike) -> Path:
    """Move a test's outputs out of the run folder ``run`` into ``to`` (and copy its configuration along), so that
    a second test by the same Trainer (zero-shot, then tuned) does not replace them; ``to`` is then a run folder of
    its own for :func:`write_run_report`. Call on global rank 0 only. Returns ``to``."""
    import shutil

    run, to = Path(run).expanduser(), Path(to).expanduser()
    to.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (run / name).exists():
            shutil.copy2(run / name, to / name)
    for name in TEST_OUTPUTS:
        if (run / name).exists():
            if (to / name).is_dir():
                shutil.rmtree(to / name)
            shutil.move(str(run / name), str(to / name))
    return to


def is_own_report(path: str | os.PathLike) -> bool:
    """True when ``path`` is a report :func:`write_run_report` wrote (its first line is ``REPORT_MARK``)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\n") == REPORT_MARK
    except (OSError, UnicodeDecodeError):
        return False


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out.parent.resolve())).as_posix()


def _unique_names(folders: list[Path]) -> list[str]:
    """The shortest trailing parts of the paths that tell the runs apart (``a/version_0``, ``b/version_0``)."""
    parts = [f.resolve().parts for f in folders]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(f) for f in folders]


def main(argv: Sequence[str] | None = None, prog: str = "lightning-ft report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="run folders (a logger's version folder)")
    parser.add_argument("--out", default="report.md", help="the Markdown file to write (default: report.md)")
    parser.add_argument("--names", nargs="+", help="a label per run folder, in order")
    parser.add_argument("--title", default="Run report")
    parser.add_argument("--overwrite", action="store_true", help="replace --out even when it is not a report")
    args = parser.parse_args(argv)
    try:
        path = write_run_report(args.run_dirs, args.out, args.names, args.title, args.overwrite)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {path}")
    return 0
