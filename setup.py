# The native fusion core is built by cffi in API mode; cffi_modules has no
# pyproject.toml spelling, so it alone lives here.
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
