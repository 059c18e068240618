"""Packaging: kernels install only as cascade_clip.kernels; package data ships; the CLI entry point exists."""

import importlib.util
import subprocess
import sys


def test_no_top_level_kernels_module():
    assert importlib.util.find_spec("cascade_clip.kernels") is not None
    # A top-level `kernels` is another PyPI project's name: ours must never install or import as one.
    code = "import importlib.util, sys; sys.path = [p for p in sys.path if p not in ('', '.')]; print(importlib.util.find_spec('kernels'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "None"


def test_package_data_ships():
    from cascade_clip.catalog import dataset_info
    from cascade_clip.clip_arch import register_architectures

    assert dataset_info("voc").classes[0] == "aeroplane"
    register_architectures()
    import open_clip

    assert "cascade-tiny" in open_clip.list_models()


def test_cli_dispatches_every_subcommand_help():
    from cascade_clip.cli import COMMANDS

    for name in COMMANDS:
        out = subprocess.run(
            [sys.executable, "-m", "cascade_clip.cli", name, "--help"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"cascade-clip {name} --help failed: {out.stderr[-500:]}"
        assert "usage:" in out.stdout


def test_python_dash_m_package_is_the_command():
    out = subprocess.run([sys.executable, "-m", "cascade_clip", "config", "show", "--config", "voc-st"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-500:]
    assert '"transductive": true' in out.stdout  # the -st preset, resolved
    out = subprocess.run([sys.executable, "-m", "cascade_clip", "nonsense"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice: 'nonsense'" in out.stderr
