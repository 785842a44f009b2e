"""Per-step metrics: a CSV file (one row per optimizer step), TensorBoard events, and a PNG loss plot; with a
validation store, its loss terms in a CSV of their own (one row per evaluation), beside them in TensorBoard
(`val/...`) and in the plot.

On resume the CSVs keep only the rows up to the checkpoint's step and TensorBoard purges later events,
so a resumed run's logs read exactly like those of a run that was never interrupted.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from dpal.losses import LossTerms
from runtime.durable import atomic_write

METRICS_CSV = "metrics.csv"
VALIDATION_CSV = "val.csv"
LOSS_PLOT = "loss.png"
LOSS_COLUMNS = LossTerms.names()  # the total first
COLUMNS = ("step", "epoch") + LOSS_COLUMNS + ("lr", "ema_momentum", "moe_weight", "grad_norm",
                                              "samples_per_s", "data_wait_share")
VALIDATION_COLUMNS = ("step", "epoch") + LOSS_COLUMNS


class _CsvLog:
    """One append-only CSV of rows keyed by step; on resume, the rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, columns: tuple[str, ...], resume_step: int | None):
        self.path, self.columns = path, columns
        if resume_step is None or not path.exists():
            path.write_text(",".join(columns) + "\n")
        else:
            self._truncate_after(resume_step)
        self._file = open(path, "a", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=columns)

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write({self.path: text.getvalue().encode()})  # a kill meanwhile keeps the rows it had

    def write(self, row: dict) -> None:
        # Full float precision (repr) so that logs can be compared exactly (resume test).
        self._csv.writerow({key: (repr(float(value)) if isinstance(value, float) else value)
                            for key, value in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsLog:
    """Append-only CSVs + TensorBoard writer for the rank that logs (rank 0); `validation`: a run with a
    validation store, whose evaluations `log_validation` records."""

    def __init__(self, run_dir: Path, *, resume_step: int | None, validation: bool = False):
        from torch.utils.tensorboard import SummaryWriter  # heavy import; only the logging rank pays it

        self.path = Path(run_dir) / METRICS_CSV
        self._train = _CsvLog(self.path, COLUMNS, resume_step)
        self._validation = _CsvLog(Path(run_dir) / VALIDATION_CSV, VALIDATION_COLUMNS, resume_step) \
            if validation else None
        self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                 purge_step=None if resume_step is None else resume_step + 1)

    def log(self, row: dict) -> None:
        self._train.write(row)
        for key, value in row.items():
            if key != "step":
                group = "loss" if key in LOSS_COLUMNS else "train"
                self._tb.add_scalar(f"{group}/{key}", value, row["step"])

    def log_validation(self, row: dict) -> None:
        """One evaluation on the validation store: step, epoch and the mean loss terms (LOSS_COLUMNS)."""
        self._validation.write(row)
        for key in LOSS_COLUMNS:
            self._tb.add_scalar(f"val/{key}", row[key], row["step"])

    def close(self) -> None:
        self._train.close()
        if self._validation is not None:
            self._validation.close()
        self._tb.close()


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The CSV written by MetricsLog as a list of rows of floats."""
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def plot_losses(csv_path: Path, png_path: Path) -> None:
    """Loss curves (total and each term, log scale) plus the learning rate, from the metrics CSV; the total on
    the validation store as markers where the run folder holds its CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    steps = [row["step"] for row in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    for column in LOSS_COLUMNS:
        ax_loss.plot(steps, [row[column] for row in rows], label=column,
                     linewidth=2.0 if column == LOSS_COLUMNS[0] else 1.0)
    validation_csv = Path(csv_path).with_name(VALIDATION_CSV)
    if validation_csv.exists() and (validation := read_metrics(validation_csv)):
        ax_loss.plot([row["step"] for row in validation], [row[LOSS_COLUMNS[0]] for row in validation], "o--",
                     color="black", label="loss on the validation store")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", ncol=3)
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [row["lr"] for row in rows], color="black")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"{Path(csv_path).parent.name}: {len(rows)} steps")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
