"""`make run`'s job runs end to end and reports what it computed."""

import re

from cascade_clip import demo


def test_demo_runs(capsys):
    demo.main(["--batch", "2", "--size", "64", "--backend", "reference"])
    out = capsys.readouterr().out
    assert "images (2, 3, 64, 64) -> mask_logits (2, 15, 64, 64)" in out
    loss = float(re.search(r"loss (\S+) = focal", out).group(1))
    assert 0 < loss < 1e4
    assert "-> scores (1, 20," in out
