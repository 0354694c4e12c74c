"""Shared test setup: the import path, a fresh seed per test, and the `device` parametrization.

One suite for every device (as torchvision's test/test_ops.py): a test module that declares

    pytestmark = pytest.mark.usefixtures("device")

runs each of its tests once per device, ids ``cpu`` and ``cuda``; the cuda run is skipped with
"no CUDA device" where there is none (the cpu run makes the same checks). While a test runs on a
device, torch's factory functions (randn, zeros, arange, tensor...) allocate there
(``torch.device`` as a context manager), so a test body written for the CPU runs unchanged on the
GPU against the same float64 reference (reference.py). What must stay on the CPU says so
(``dropout_seed``, generators). Each device's run also carries a mark of its name, so
``-m cuda`` (or ``-m "not cpu"``) selects the GPU runs, as ``make gpu-check`` does.

A mark refines the cuda run:
  @pytest.mark.cpu_only("why")   the test checks something only the CPU kernels have (thread
                                 counts, their tiling): skipped on other devices with that reason.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import qkv  # noqa: E402,F401  (registers torch.ops.qkv)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu: the cpu run of a device-parametrized test")
    config.addinivalue_line("markers", "cuda: a run on a CUDA device (device-parametrized, or tests/test_cuda.py)")
    config.addinivalue_line("markers", "cpu_only(reason): checks only the CPU kernels have; skipped on other devices")


def pytest_collection_modifyitems(config, items):
    for item in items:
        device = getattr(item, "callspec", None) and item.callspec.params.get("device")
        if device in ("cpu", "cuda"):
            item.add_marker(device)


@pytest.fixture(params=DEVICES)
def device(request):
    """The device under test; factory functions allocate on it for the test's duration."""
    name = request.param
    marker = request.node.get_closest_marker("cpu_only")
    if name != "cpu" and marker is not None:
        pytest.skip(f"CPU-specific: {marker.args[0] if marker.args else 'checks the CPU kernels only'}")
    if name == "cpu":  # the default: no torch-function mode in the way of the CPU timings
        yield name
        return
    with torch.device(name):
        yield name


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(0)


CPU_CAPABILITIES = ("default", "avx2", "avx512", "amx")


@pytest.fixture(scope="module", params=CPU_CAPABILITIES)
def cpu_capability(request):
    """Runs a module's tests on each copy of the CPU kernels this CPU can run, as
    QKV_CPU_CAPABILITY would select it (switched in-process); skipped for the others."""
    name = request.param
    if name not in qkv._C._supported_cpu_capabilities():
        pytest.skip(f"this CPU cannot run the {name} kernels (it supports {qkv._C._supported_cpu_capabilities()})")
    previous = qkv._C._set_cpu_capability(name)
    yield name
    qkv._C._set_cpu_capability(previous)
