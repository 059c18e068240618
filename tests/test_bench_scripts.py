"""The whole-model training-speed benchmark runs and appends rows (tiny CPU smoke run; no timing asserted)."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_speed_smoke(tmp_path):
    out = tmp_path / "train.csv"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--tiny", "--iters", "1", "--warmup", "1",
           "--batch", "2", "--precisions", "fp32", "--backends", "reference", "--out", str(out)]
    for _ in range(2):  # rows are appended, never overwritten
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 and all(r["backend"] == "reference" and float(r["img_per_s"]) > 0 for r in rows)
