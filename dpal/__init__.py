"""DPAL, the method in pure PyTorch: teachers, students, the dynamic pattern decoder, losses, views,
shape mask and checkpoint formats. The stages (`cache_teacher`, `train_student`) do the I/O and loops.

`dpal.load_student(path)` rebuilds an exported student (or its EMA) as a plain timm model.
"""
from dpal.students import export_student, load_student

__all__ = ["export_student", "load_student"]
