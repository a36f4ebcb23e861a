"""Registers the `elmforest` model with lm-evaluation-harness, so that installing elmforest is
enough for `lm_eval --model elmforest ...` (lm-eval reads no plugin entry points).

A .pth file imports this at interpreter start. It costs one cheap import finder and imports
nothing: only when lm_eval.models is imported does it add `elmforest` to lm-eval's registry,
as a lazy name (the forest code loads when lm-eval asks for the model).
"""

import importlib.abc
import importlib.util
import sys


class _RegisterWhenLoaded(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # find the real module, once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            try:
                from lm_eval.api.registry import model_registry

                if "elmforest" not in model_registry:
                    model_registry.register("elmforest", target="btm.lm_eval_harness:ElmforestLM")
            except Exception:  # never break lm-eval itself
                pass

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _RegisterWhenLoaded) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenLoaded())


def install() -> str:
    """Write the .pth that imports this module into this environment's site packages (a wheel
    install ships it; `make install`, an editable install, calls this)."""
    import sysconfig
    from pathlib import Path

    dst = Path(sysconfig.get_paths()["purelib"]) / "elmforest-lm-eval.pth"
    dst.write_text((Path(__file__).parent / "elmforest-lm-eval.pth").read_text())
    return str(dst)


if __name__ == "__main__":
    print(install())
