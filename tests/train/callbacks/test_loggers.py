"""metrics.jsonl after a resume that goes back: the rows past the checkpoint are dropped, atomically."""

from __future__ import annotations

import json

from train.callbacks.loggers import MetricsJsonl, trim_metrics


def test_rows_past_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 10.0 - s} for s in range(0, 8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "lo')  # torn last line (kill -9)
    metrics = MetricsJsonl(tmp_path, resume_step=5)
    assert metrics.dropped == 3
    metrics.on_log(6, {"loss": 4.5})
    metrics.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5, 6]
    assert trim_metrics(path, 6) == 0 and not (tmp_path / "metrics.jsonl.tmp").exists()
