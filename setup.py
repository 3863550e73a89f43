"""The compiled parts of the package (optional): rank pooling's small-problem iteration and
L-BFGS's per-iteration steps on CPU.

Metadata lives in pyproject.toml. Without a C compiler the extensions are skipped and the
same steps run on NumPy or torch instead (same results, slower on small problems).
"""

from setuptools import setup
from setuptools.extension import Extension

try:
    from Cython.Build import cythonize
except ImportError:  # a build without Cython: the NumPy and torch steps only
    ext_modules = []
else:
    ext_modules = cythonize(
        [Extension("poolings.rank._small_kernel", ["poolings/rank/_small_kernel.pyx"],
                   extra_compile_args=["-O3"], optional=True),
         Extension("argminlayers._lbfgs", ["argminlayers/_lbfgs.pyx"], extra_compile_args=["-O3"], optional=True)],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
