"""The compiled parts of pmemfs (pmemfs/*.pyx); the rest is declared in pyproject.toml.

A build that cannot compile them fails, saying why: there is no slower pure-Python copy to fall back on.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HINT = (
    "pmemfs: cannot compile {source}, part of the per-request path ({error}). It needs a C compiler, the "
    "Python headers and the kernel's FUSE header: on Debian, apt-get install gcc python3-dev linux-libc-dev "
    "(make test installs them)."
)


class BuildExtOrSayWhy(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:
            raise SystemExit(HINT.format(source=", ".join(ext.sources), error=error)) from error


setup(
    ext_modules=cythonize(
        [Extension(f"pmemfs.{name}", [f"pmemfs/{name}.pyx"]) for name in ("transfer", "datapath", "lane")], quiet=True
    ),
    cmdclass={"build_ext": BuildExtOrSayWhy},
)
