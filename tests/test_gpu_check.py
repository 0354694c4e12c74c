"""What of `make gpu-check` (scripts/gpu_check.sh, scripts/gpu_check.py) can be checked without a
GPU: the script's syntax and its message on a machine without one, and its Python pieces."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import build_config  # noqa: E402
import gpu_check  # noqa: E402


def test_the_scripts_parse():
    for script in ("gpu_check.sh", "cuda_build_check.sh", "gpu_lease.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_the_gpu_check_runs_the_core_tests_on_the_device():
    files = gpu_check.device_test_files()
    for name in ("test_core_forward.py", "test_core_backward.py", "test_features_forward.py", "test_varlen.py"):
        assert f"tests/{name}" in files
    assert "tests/test_cuda.py" not in files and "tests/test_modules.py" not in files


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_the_script_stops_with_a_clear_message(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU visible to" in proc.stderr and "nothing to check here" in proc.stderr
    assert not list(tmp_path.iterdir()), "nothing is built or written without a GPU"


def test_arch_list_is_the_gpus_own_arch_and_the_sm90a_kernels_come_with_9_0():
    """sm_90a code has its own gencode in setup.py (build_config.sm90_wanted): the GPU's own arch is
    the whole list, so the other kernels are not compiled a second time for sm_90a."""
    assert gpu_check.arch_list((9, 0)) == "9.0"
    assert gpu_check.arch_list((8, 0)) == "8.0"
    assert gpu_check.arch_list((8, 6)) == "8.6"
    assert build_config.sm90_wanted(gpu_check.arch_list((9, 0)))
    assert not build_config.sm90_wanted(gpu_check.arch_list((8, 0)))
    assert not build_config.sm90_wanted(gpu_check.arch_list((10, 0)))
    for archs, wanted in [("8.0;9.0", True), ("9.0a", True), ("9.0+PTX", True), ("8.0 9.0", True), ("8.0;8.6", False),
                          ("10.0", False), ("", False)]:
        assert build_config.sm90_wanted(archs) == wanted, archs


def test_machine_name_is_the_benchmarks_folder_name():
    from qkv.bench.machine import slugify

    assert gpu_check.machine_name("NVIDIA H100 80GB HBM3") == "cuda-nvidia-h100-80gb-hbm3"
    assert gpu_check.machine_name("NVIDIA H200") == slugify("cuda-NVIDIA H200")


def test_summary_has_one_line_per_failure(tmp_path):
    xml = tmp_path / "report.xml"
    xml.write_text(textwrap.dedent("""\
        <testsuites><testsuite name="pytest">
          <testcase classname="tests.test_cuda" name="test_forward[bf16]"/>
          <testcase classname="tests.test_cuda" name="test_skip"><skipped message="no"/></testcase>
          <testcase classname="tests.test_cuda" name="test_opcheck[fwd]">
            <failure message="AssertionError: Unhandled FakeTensor Device Propagation&#10;more">trace</failure></testcase>
          <testcase classname="tests.test_cuda" name="test_head_dim_limit_is_a_clear_error">
            <failure message="worker 'gw3' crashed while running 'tests/test_cuda.py::test_head_dim_limit_is_a_clear_error'"/></testcase>
        </testsuite></testsuites>"""))
    counts, lines = gpu_check.test_summary(str(xml))
    assert counts == "1 passed, 2 failed, 1 skipped"
    assert lines == [
        "FAILED tests/test_cuda.py::test_opcheck[fwd]: AssertionError: Unhandled FakeTensor Device Propagation",
        "FAILED tests/test_cuda.py::test_head_dim_limit_is_a_clear_error: worker 'gw3' crashed while running "
        "'tests/test_cuda.py::test_head_dim_limit_is_a_clear_error'",
    ]


def test_a_crashing_test_fails_alone_without_xdist(tmp_path, monkeypatch):
    (tmp_path / "test_crashy.py").write_text(textwrap.dedent("""\
        import os, signal
        def test_a(): pass
        def test_crash(): os.kill(os.getpid(), signal.SIGSEGV)
        def test_c(): pass
        def test_d(): assert False, "plain failure"
        """))
    monkeypatch.setattr(gpu_check, "has_xdist", lambda: False)
    monkeypatch.chdir(tmp_path)
    status = gpu_check.run_tests(str(tmp_path / "out"), ["test_crashy.py"], workers=2)
    assert status != 0
    counts, lines = gpu_check.test_summary(str(tmp_path / "out.xml"))
    assert counts == "2 passed, 2 failed, 0 skipped", (counts, lines, (tmp_path / "out.log").read_text())
    assert "FAILED test_crashy.py::test_crash: the test process died with signal 11" in lines
    assert any(line.startswith("FAILED test_crashy.py::test_d: ") for line in lines)


QUERY_METRICS = """\
Device NVIDIA H100 80GB HBM3 (GH100)
------------------------------------------ -------------------------------------------------
Metric Name                                Metric Description
gpu__time_duration                         total duration in nanoseconds
sm__inst_issued                            # of warp instructions issued
sm__maximum_warps_per_active_cycle_pct     theoretical occupancy
sm__pipe_tensor_cycles_active              # of cycles where the tensor pipe was active
sm__warps_active                           cumulative # of warps in flight
"""

NCU_CSV = """\
==PROF== Connected to process 646
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","launch__registers_per_thread","sm__maximum_warps_per_active_cycle_pct","sm__warps_active.avg.pct_of_peak_sustained_active","sm__inst_issued.avg.pct_of_peak_sustained_active","sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active","gpu__time_duration.sum"
"","","","","","","","register/thread","%","%","%","%","us"
"0","646","python3.12","127.0.0.1","void mma_forward_kernel<__nv_bfloat16, 128>(ForwardArgs)","1","7","232","12.50","12.41","42.08","23.9","9,440.13"
"1","646","python3.12","127.0.0.1","void generic_delta_kernel<float>(DeltaArgs)","1","7","32","100","81.2","10.3","0","12.5"
==PROF== Disconnected from process 646
"""


def test_ncu_metrics_are_chosen_from_what_this_ncu_offers():
    chosen = gpu_check.ncu_metrics(QUERY_METRICS)
    assert chosen == {
        "registers/thread": "launch__registers_per_thread",
        "theoretical occupancy %": "sm__maximum_warps_per_active_cycle_pct",
        "achieved occupancy %": "sm__warps_active.avg.pct_of_peak_sustained_active",
        "issue slots busy %": "sm__inst_issued.avg.pct_of_peak_sustained_active",
        "tensor pipe %": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
        "duration us": "gpu__time_duration.sum",
    }
    assert gpu_check.quantities_of(list(chosen.values())) == chosen


def test_ncu_summary_has_a_row_per_kernel():
    chosen = gpu_check.ncu_metrics(QUERY_METRICS)
    table = gpu_check.ncu_summary(NCU_CSV, chosen).splitlines()
    assert table[0].split()[:2] == ["kernel", "registers/thread"]
    assert len(table) == 3
    assert table[1].split() == ["mma_forward_kernel<__nv_bfloat16,", "128>", "232", "12.5", "12.4", "42.1", "23.9", "9440"]
    assert table[2].startswith("generic_delta_kernel<float>")
    assert gpu_check.ncu_summary("==ERROR== ERR_NVGPUCTRPERM", chosen) == "ncu wrote no kernel results"


def test_ncu_summary_reports_durations_in_microseconds_whatever_unit_ncu_chose():
    chosen = gpu_check.ncu_metrics(QUERY_METRICS)
    in_ns = NCU_CSV.replace('"%","us"', '"%","ns"').replace('"9,440.13"', '"9,440,130"')
    assert gpu_check.ncu_summary(in_ns, chosen).splitlines()[1].split()[-1] == "9440"


def test_collect_copies_at_most_eight_existing_files(tmp_path):
    files = []
    for i in range(10):
        path = tmp_path / f"f{i}.txt"
        path.write_text(str(i))
        files.append(str(path))
    copied = gpu_check.collect(str(tmp_path / "out"), [str(tmp_path / "missing.txt"), *files])
    assert copied == files[:8]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"f{i}.txt" for i in range(8)]
