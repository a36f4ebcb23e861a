"""Ships elmforest-lm-eval.pth at the top of site-packages with a wheel install (pyproject.toml
holds everything else). An editable install (`make install`) writes it with
`python -m elmforest_lm_eval_hook`."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "elmforest-lm-eval.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
