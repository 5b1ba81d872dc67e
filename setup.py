# The C core is built by cffi in API (out-of-line) mode; see csrc/build_tplog.py.
from setuptools import setup

setup(cffi_modules=["csrc/build_tplog.py:ffibuilder"])
