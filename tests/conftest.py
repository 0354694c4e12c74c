import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import qkv  # noqa: E402,F401  (registers torch.ops.qkv)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(0)


CPU_CAPABILITIES = ("default", "avx2", "avx512")


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
