"""`make run`'s job (cascade_clip.quickstart), shortened: writes the synthetic VOC-layout set, trains, evaluates before
and after, and prints the metrics table and the seen mIoU line."""

import os
import re

from cascade_clip import quickstart


def test_quickstart_short_run(tmp_path, capsys):
    result = quickstart.main(["--work-dir", str(tmp_path), "--iters", "3", "--kernels", "reference",
                              "--set", "model.img_size=32", "--set", "model.crop_size=32", "--set", "model.stride=27", "--set", "eval.short_side=32",
                              "--set", "data.scale=128,32"])
    out = capsys.readouterr().out
    assert "synthetic dataset (VOC layout)" in out
    assert out.count("mIoU(seen)") == 2  # the table before and after training
    assert re.search(r"seen mIoU before training: \d+\.\d\d   after 3 iterations: \d+\.\d\d", out)
    assert os.path.isfile(tmp_path / "train" / "latest.pt")
    assert os.path.isfile(tmp_path / "data" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "train.txt")
    assert result["metrics_before"] is not None and result["metrics"] is not None
