"""Shared pytest setup.

Without a GPU, Triton kernels run under Triton's CPU interpreter. ``TRITON_INTERPRET`` is read when a kernel is
decorated, so it must be set before anything imports ``cascade_clip.kernels``: that is why it is set here, at
collection time, and only when no CUDA device is present.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "reference")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing the shared CPU cores (10x faster under load).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (runs at real shapes; skipped on CPU)")


# Comma-separated ops backends that must load (`make test` sets "cpp,triton"). Without it a backend that fails to load
# (a C++ extension built for another torch, a missing Triton) only skips or drops its tests, and a green run would
# hide that most of the kernel checks never ran.
REQUIRE_BACKENDS_VAR = "CASCADE_CLIP_REQUIRE_BACKENDS"


def pytest_sessionstart(session):
    required = [name.strip() for name in os.environ.get(REQUIRE_BACKENDS_VAR, "").split(",") if name.strip()]
    if not required:
        return
    import warnings

    from cascade_clip import ops
    from cascade_clip.ops.registry import _LOADERS

    problems = []
    for name in required:
        if name != "reference" and name not in _LOADERS:
            problems.append(f"{name!r} is not an ops backend (known: reference, {', '.join(_LOADERS)})")
            continue
        with warnings.catch_warnings():  # the loaders' own warnings would repeat the reason given below
            warnings.simplefilter("ignore")
            available = name in ops.available_backends()
        if not available:
            problems.append(f"{name!r} did not load: {ops.unavailable_reason(name)}")
    if problems:
        pytest.exit(f"{REQUIRE_BACKENDS_VAR}={os.environ[REQUIRE_BACKENDS_VAR]}: required ops backend(s) unavailable, "
                    f"their tests would be skipped: {'; '.join(problems)}", returncode=pytest.ExitCode.TESTS_FAILED)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
