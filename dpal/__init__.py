"""DPAL, the method in pure PyTorch: teachers, students, the dynamic pattern decoder, losses, views,
shape mask and checkpoint formats. The stages (`cache_teacher`, `train_student`) do the I/O and loops.

`dpal.load_student(FOLDER)` rebuilds an exported student (or its EMA) as a timm model; importing `dpal` also
registers the students with timm (`dpal.timm_models`), so `timm.create_model("local-dir:FOLDER")` does the same.
`dpal.register_teacher(spec)` / `dpal.register_student(spec)` add teachers and students defined in code
(docs/custom-models.md).
"""
import importlib.abc
import importlib.util
import sys

__all__ = ["load_student", "register_student", "register_teacher"]


def __getattr__(name: str):
    # Lazy: `dpal.students` imports timm (and with it torch and triton), so `import dpal` stays light;
    # `dpal.recipes` is light, so registering a model imports nothing heavy.
    if name == "load_student":
        from dpal import students
        return students.load_student
    if name in __all__:
        from dpal import recipes
        return getattr(recipes, name)
    raise AttributeError(f"module 'dpal' has no attribute {name!r}")


class _RegisterWithTimm(importlib.abc.Loader):
    """timm's own loader, followed by the students' registration once timm's module has run."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        import dpal.timm_models  # noqa: F401  (registers)


class _WhenTimmIsImported(importlib.abc.MetaPathFinder):
    """Registers the students with timm when (and only when) something imports timm: registering needs timm,
    which imports torch, and `import dpal` must stay light for the command lines' --help."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterWithTimm(spec.loader)
        return spec


if "timm" in sys.modules:
    import dpal.timm_models  # noqa: F401,E402  (registers)
elif not any(isinstance(finder, _WhenTimmIsImported) for finder in sys.meta_path):
    sys.meta_path.insert(0, _WhenTimmIsImported())
