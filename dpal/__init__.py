"""DPAL, the method in pure PyTorch: teachers, students, the dynamic pattern decoder, losses, views,
shape mask and checkpoint formats. The stages (`cache_teacher`, `train_student`) do the I/O and loops.

`dpal.load_student(path)` rebuilds an exported student (or its EMA) as a plain timm model.
"""
__all__ = ["load_student"]


def __getattr__(name: str):
    # Lazy: `dpal.students` imports timm (and with it torch and triton), so `import dpal` stays light.
    if name in __all__:
        from dpal import students
        return getattr(students, name)
    raise AttributeError(f"module 'dpal' has no attribute {name!r}")
