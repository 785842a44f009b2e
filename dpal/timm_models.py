"""The students as registered timm models: `dpal_vit_ti`, `dpal_vit_s`, `dpal_vit_b`, `dpal_swin_t`, `dpal_swin_s`.

Importing `dpal` registers them as soon as timm is imported (before or after dpal). An export's config.json
names one of them, so:

- with dpal imported, `timm.create_model("local-dir:RUN/student_ema")` is `dpal.load_student` of that folder: the
  weights are checked against their recorded checksum and the model computes exactly the trained features
  (whether or not `pretrained=True` is passed: an export without its weights is never what is meant);
  `num_classes` and `drop_path_rate` may be changed, any other argument that differs from the export is refused;
- without dpal, timm refuses the name (`RuntimeError: Unknown model (dpal_vit_ti)`), instead of building a stock
  network that would load the same keys and compute other features (a ViT-Ti whose last block has the teacher's
  12 heads; Swin students whose windows adapt to the grid);
- `timm.create_model("dpal_vit_ti", last_block_heads=12)` builds a randomly initialised student.
"""
from __future__ import annotations

from timm.models import register_model
from torch import nn

from dpal.recipes import STUDENTS, timm_architecture

# Arguments timm's factory passes to every entry point; they carry no architecture of their own.
_FACTORY_ARGUMENTS = ("pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")
# What a user may change when loading an export: they do not change the features.
_FREE_ON_LOAD = ("num_classes", "drop_path_rate")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _entry_point(student_name: str):
    def create(pretrained: bool = False, pretrained_cfg=None, **kwargs) -> nn.Module:
        # Imported here: this module is imported while timm's own import finishes, possibly from dpal.students.
        from dpal.students import architecture_config, create_backbone, load_student, read_student_config, \
            timm_config

        for name in _FACTORY_ARGUMENTS:
            kwargs.pop(name, None)
        registered = timm_architecture(student_name)
        source = pretrained_cfg.get("source") if isinstance(pretrained_cfg, dict) else None
        if source == "local-dir":
            folder = pretrained_cfg["file"]
            config = read_student_config(folder)
            if timm_architecture(config["student"]) != registered:
                raise ValueError(f"{folder}: config.json names {registered} but its weights are a "
                                 f"{timm_architecture(config['student'])}; export again")
            recorded = timm_config(config)["model_args"]
            changed = sorted(k for k, v in kwargs.items() if k not in _FREE_ON_LOAD and _plain(v) != recorded.get(k))
            if changed:
                raise ValueError(f"local-dir:{folder}: {', '.join(changed)} would change the exported architecture; "
                                 f"only {' and '.join(_FREE_ON_LOAD)} may be set when loading an export")
            return load_student(folder, num_classes=kwargs.get("num_classes", 0),
                                drop_path_rate=kwargs.get("drop_path_rate"))
        if pretrained or pretrained_cfg:
            raise ValueError(f"{registered} has no published weights; load a trained export with "
                             f"timm.create_model('local-dir:RUN_DIR/student_ema')")
        last_block_heads = kwargs.pop("last_block_heads", None) if STUDENTS[student_name].arch == "vit" else None
        return create_backbone(architecture_config(STUDENTS[student_name], last_block_heads=last_block_heads,
                                                   **kwargs))

    create.__name__ = create.__qualname__ = timm_architecture(student_name)
    create.__module__ = __name__
    create.__doc__ = f"DPAL student {student_name} (see dpal.timm_models)."
    return create


REGISTERED: list[str] = []


def register(student_name: str) -> None:
    """Register a student of dpal.recipes.STUDENTS with timm (`dpal.register_student` calls this for students
    defined in code after timm was imported)."""
    REGISTERED.append(register_model(_entry_point(student_name)).__name__)


for _name in STUDENTS:
    register(_name)

__all__ = ["REGISTERED", "register"]
