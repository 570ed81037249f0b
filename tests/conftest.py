"""Suite-wide settings: one intra-op thread per process, and the ``device`` fixture.

The machine (and CI) has two cores shared by the test process, the servers it
starts and the trainers those launch; torch's default of one thread per core makes
every one of them contend. Set before torch is imported anywhere, and inherited by
child processes (launched trainers, `layerscope demo`).

``device`` runs a test once on "cpu" and once on "cuda"; the CUDA case is skipped
where torch sees no CUDA device (so a CPU machine runs exactly the CPU case).
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # a checkout without torch still collects its torch-free tests
        return False
    return torch.cuda.is_available()


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device"),
        ),
    ]
)
def device(request: pytest.FixtureRequest) -> str:
    """The device a test builds its model and inputs on: "cpu", then "cuda"."""
    param: str = request.param
    return param
