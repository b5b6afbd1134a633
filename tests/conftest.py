import contextlib

import pytest
import torch

from streamrl.testing import small_disk

torch.set_num_threads(1)


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size, name="disk")`` mounts a fresh tmpfs of ``size`` under ``tmp_path`` for the test (skips the test
    where mounting is not allowed: it needs root)."""
    with contextlib.ExitStack() as mounts:

        def mount(size: str, name: str = "disk"):
            try:
                return mounts.enter_context(small_disk(tmp_path / name, size))
            except OSError as exc:
                pytest.skip(str(exc))

        yield mount
