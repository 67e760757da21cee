"""Ships ``core/quantplug-hook.pth`` at the top of site-packages (in wheels and in editable
installs) so that it runs ``core/_quantplug_hook.py`` at start-up; see that module. Everything
else about the distribution is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "quantplug-hook.pth"
SOURCE = Path(__file__).parent / "core" / PTH


class BuildPy(build_py):
    """Adds the .pth file to the wheel's root (site-packages)."""

    def run(self):
        super().run()
        self.copy_file(str(SOURCE), str(Path(self.build_lib) / PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheel(editable_wheel):
    """Editable installs do not use build_py's outputs; put the .pth beside setuptools' own .pth
    files. (A private setuptools hook: if it changes, tests/faults/test_plain_transformers.py fails.)"""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        target = Path(installation_dir) / PTH
        target.write_bytes(SOURCE.read_bytes())


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
