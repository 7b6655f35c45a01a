import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--torch-threads", type=int, default=None,
        help="run at this many intra-op threads (torch.set_num_threads); default: torch's default for the machine",
    )


def pytest_configure(config):
    threads = config.getoption("--torch-threads")
    if threads:
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread(request):
    """One intra-op thread for a module of tiny models unless ``--torch-threads`` is given: on two shared cores
    each parallel region of a tiny op cost up to 20 ms. Use: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    if request.config.getoption("--torch-threads"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_report_header(config):
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"


@pytest.fixture(scope="session")
def cuda_emulator(tmp_path_factory):
    """An ``Emulator`` (tests/cuda_emulation/emulator.py): csrc/cuda's launchers run on the CPU; skips without g++."""
    from cuda_emulation.emulator import Emulator, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    return Emulator(tmp_path_factory.mktemp("cuda_emulation"))
