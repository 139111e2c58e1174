"""pytest configuration: markers, and skipping what this machine cannot run."""
import os

import pytest

def pytest_configure(config):
    for name, what in [("gpu", "needs a CUDA GPU"), ("multigpu", "needs two or more CUDA GPUs"),
                       ("slow", "takes more than a few seconds")]:
        config.addinivalue_line("markers", f"{name}: {what}")

def pytest_collection_modifyitems(config, items):
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and n < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))

@pytest.fixture(autouse=True)
def _seed():
    "Every test starts from the same RNG state."
    import torch
    torch.manual_seed(0)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

def reference_keys(name: str, prefix: str = "") -> dict:
    """name -> shape of the released checkpoint's tensors (tests/fixtures/{name}, copied from the spec's key lists),
    for the rows under `prefix`, with the prefix stripped."""
    rows = {}
    with open(os.path.join(FIXTURES, name)) as f:
        for line in f:
            if line.startswith("#") or not line.strip(): continue
            key, shape = line.rstrip("\n").split("\t")
            if key.startswith(prefix):
                rows[key[len(prefix):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return rows
