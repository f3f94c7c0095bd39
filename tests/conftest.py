import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run faster on one thread, and far faster when the machine is shared:
    # two spinning OpenMP threads per process on 2 cores slow small kernels down many times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
