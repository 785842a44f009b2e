"""Student exports on disk: a folder in timm's local-dir layout, written durably from what
`dpal.students.export_contents` makes, plus a `torch.export` program of the same features.

FOLDER/model.safetensors and FOLDER/config.json: `dpal.load_student(FOLDER)`, or with `dpal` imported
`timm.create_model("local-dir:FOLDER")`. FOLDER/model.pt2: `torch.export.load(...).module()(images)` gives
`forward_features` of images [B, 3, H, W] at the training size (B free), with torch alone.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from dpal.students import Student, export_contents, export_paths, feature_program
from runtime.durable import atomic_write

PROGRAM_FILE = "model.pt2"


def export_student(student: Student, folder, *, extra: dict | None = None, program: bool = True) -> Path:
    """Write the export folder of `student` (its EMA copy too): model.safetensors, config.json (with `extra`), and
    unless `program` is False model.pt2. Every file is written and fsynced before any replaces an older export's,
    so a crash never leaves a new config beside old weights. Returns the folder."""
    weights_path, config_path = export_paths(folder)
    weights, config = export_contents(student, extra=extra)
    files = {weights_path: weights, config_path: config}
    if program:
        buffer = io.BytesIO()
        torch.export.save(feature_program(student), buffer, extra_files={"config.json": config.decode()})
        files[weights_path.parent / PROGRAM_FILE] = buffer.getvalue()
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(files)
    return weights_path.parent


__all__ = ["PROGRAM_FILE", "export_student"]
