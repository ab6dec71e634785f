"""The run's metrics: JSON lines in ``run_dir/metrics.jsonl``, plus TensorBoard when installed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per row; epoch rows are also logged as a line of text."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._tb = None

    def write(self, row: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if row["kind"] == "epoch":
            log.info(
                "epoch %d done: loss %.4f, %.0f img/s, %.1f s",
                row["epoch"] + 1,
                row["loss"],
                row["img_per_s"],
                row["seconds"],
            )
        tb = self._tensorboard()
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "iteration"):
                    tb.add_scalar(f"{row['kind']}/{k}", v, row.get("iteration", 0))

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: only when tensorboard is installed
                self._tb = False
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb or None
