# The native parts: the fusion worker's core, built by cffi in API mode
# (cffi_modules has no pyproject.toml spelling), and the hook's front, a
# small executable built with the same compiler into the package.
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

HOOK_FRONT_SOURCE = "native/hookfront.c"
HOOK_FRONT_NAME = "hookfront"  # pagefusion.install.HOOK_FRONT_NAME


class BuildExtAndHookFront(build_ext):
    def run(self):
        super().run()
        objects = self.compiler.compile(
            [HOOK_FRONT_SOURCE],
            output_dir=self.build_temp,
            extra_postargs=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
        )
        self.compiler.link_executable(objects, HOOK_FRONT_NAME, output_dir=self._package_dir())

    def _package_dir(self):
        if self.inplace:
            return self.get_finalized_command("build_py").get_package_dir("pagefusion")
        return os.path.join(self.build_lib, "pagefusion")

    def get_outputs(self):
        return [*super().get_outputs(), os.path.join(self._package_dir(), HOOK_FRONT_NAME)]


setup(
    cffi_modules=["native/build.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtAndHookFront},
)
