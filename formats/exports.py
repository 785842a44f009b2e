"""Student exports on disk: what `dpal.students.export_contents` makes, written durably (`dpal.load_student`
reads them back as timm models)."""
from __future__ import annotations

from pathlib import Path

from dpal.students import Student, export_contents, export_paths
from formats.durable import atomic_write


def export_student(student: Student, path, *, extra: dict | None = None) -> tuple[Path, Path]:
    """Write NAME.safetensors (the backbone's timm state dict) and NAME.json (its architecture + `extra`);
    `path` is NAME, NAME.safetensors or NAME.json. Both are written and fsynced before either replaces an older
    export, so a crash never leaves a new config beside old weights. Returns (weights path, config path)."""
    weights_path, config_path = export_paths(path)
    weights, config = export_contents(student, extra=extra)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write({weights_path: weights, config_path: config})
    return weights_path, config_path
