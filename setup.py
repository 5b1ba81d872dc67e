# The C core is built by cffi in API (out-of-line) mode; see csrc/build_tplog.py.
#
# cffi compiles the extension against CPython's stable ABI (Py_LIMITED_API, `_tplog.abi3.so`),
# and the C core uses no Python API of its own, so one wheel serves every CPython from 3.10 on:
# `py_limited_api` tags it `cp310-abi3` instead of the interpreter that built it.
from setuptools import setup

setup(
    cffi_modules=["csrc/build_tplog.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
