"""Builds tiny_ext.cpp with setuptools into OUT_DIR, either with setuptools' plain build_ext
("plain") or with the build_ext qkv's setup.py uses ("qkv"), under the caller's environment.
QKV_TEST_LIBRARY_DIRS (os.pathsep-separated) becomes the extension's library_dirs, as torch/lib
and the CUDA lib folder are for qkv._C.

Usage: build_tiny.py plain|qkv OUT_DIR   (prints the path of the built library)
"""
import ctypes
import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "scripts"))
from shared_cxx_runtime import with_shared_cxx_runtime  # noqa: E402

mode, out_dir = sys.argv[1], os.path.abspath(sys.argv[2])
# A torch process has libstdc++.so.6 loaded (setup.py imports torch); loading it is enough here.
ctypes.CDLL("libstdc++.so.6")
library_dirs = [d for d in os.environ.get("QKV_TEST_LIBRARY_DIRS", "").split(os.pathsep) if d]
setup(
    name="tiny_ext",
    ext_modules=[Extension("tiny_ext", [os.path.join(HERE, "tiny_ext.cpp")], language="c++",
                           library_dirs=library_dirs)],
    cmdclass={"build_ext": with_shared_cxx_runtime(build_ext) if mode == "qkv" else build_ext},
    script_args=["-q", "build_ext", "--build-lib", out_dir, "--build-temp", os.path.join(out_dir, "temp")],
)
print(glob.glob(os.path.join(out_dir, "tiny_ext*.so"))[0])
