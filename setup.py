"""The one C extension: router/_ngrams.c (the classifier's n-gram hashing on the request path).

Everything else about the package is in pyproject.toml. `optional=True`: without a compiler the
install still succeeds and router/features.py hashes with numpy (same numbers, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("router._ngrams", ["router/_ngrams.c"], optional=True, extra_compile_args=["-O2"])])
