"""The compiled part of the package: rank pooling's small-problem iteration (optional).

Metadata lives in pyproject.toml. Without a C compiler the extension is skipped and the
iteration runs on NumPy instead (same results, slower on small problems).
"""

from setuptools import setup
from setuptools.extension import Extension

try:
    from Cython.Build import cythonize
except ImportError:  # a build without Cython: the NumPy iteration only
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("poolings.rank._small_kernel", ["poolings/rank/_small_kernel.pyx"],
                   extra_compile_args=["-O3"], optional=True)],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
