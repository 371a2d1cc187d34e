"""The compiled part of pmemfs (pmemfs/transfer.pyx); everything else is declared in pyproject.toml.

A build that cannot compile it fails, saying why: there is no slower pure-Python copy to fall back on.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HINT = (
    "pmemfs: cannot compile pmemfs/transfer.pyx, the registry's transfer path ({error}). It needs a C "
    "compiler and the Python headers: on Debian, apt-get install gcc python3-dev (make test installs them)."
)


class BuildExtOrSayWhy(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:
            raise SystemExit(HINT.format(error=error)) from error


setup(
    ext_modules=cythonize([Extension("pmemfs.transfer", ["pmemfs/transfer.pyx"])], quiet=True),
    cmdclass={"build_ext": BuildExtOrSayWhy},
)
