
import pytest
import torch

# Numbers in tests are deterministic and computed in exact float32/float64, never TF32.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# Tests use tiny models, where a second intra-op thread costs more in synchronization than it saves
# (30x on a loaded 2-core machine); the benchmarks set their own thread counts.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_kept_mappings():
    """Each test starts and ends with no probe keeping released basis mappings (a probe a test leaves open would
    keep them for every later test)."""
    from geomprobe.linalg import host_blocks

    yield
    if host_blocks._keepers or host_blocks.kept_bytes():
        host_blocks._keepers = 0
        host_blocks.release_kept()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Dense Hessians of the digits MLP and CNN, computed once per module that asks (the budgeted-diagonal tests).
@pytest.fixture(scope="module")
def mlp_hessian():
    from test_budgeted_diagonal import _network_hessian

    return _network_hessian("mlp")


@pytest.fixture(scope="module")
def cnn_hessian():
    from test_budgeted_diagonal import _network_hessian

    return _network_hessian("cnn")
