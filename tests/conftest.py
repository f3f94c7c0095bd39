import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _index_cache(tmp_path_factory):
    # Folder sources write a file index to the user's cache folder: keep the tests' indexes out of it.
    saved = os.environ.get("VQGPT_CACHE")
    os.environ["VQGPT_CACHE"] = str(tmp_path_factory.mktemp("vqgpt-cache"))
    yield
    if saved is None:
        os.environ.pop("VQGPT_CACHE", None)
    else:
        os.environ["VQGPT_CACHE"] = saved


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models run faster on one thread, and far faster when the machine is shared:
    # two spinning OpenMP threads per process on 2 cores slow small kernels down many times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
