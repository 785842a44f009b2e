"""The eight published recipes (spec section 8) as named, immutable configurations; the teachers and students
they are made of, which code may add to (`register_teacher`, `register_student`); and how a recipe is composed
from a teacher and a student (`compose_recipe`; other pairs by name in `dpal.pairs`)."""
from __future__ import annotations

import re
import sys

from dpal.config import DecoderSpec, OptimConfig, Recipe, StudentSpec, TeacherSpec

TEACHERS: dict[str, TeacherSpec] = {
    "path-b": TeacherSpec("path-b", "vit", "vit_base_patch16_224", width=768, depth=12, num_heads=12,
                          patch_size=16, token_stride=16, has_cls=True),
    "path-l": TeacherSpec("path-l", "vit", "vit_large_patch16_224", width=1024, depth=24, num_heads=16,
                          patch_size=16, token_stride=16, has_cls=True),
    "solider-b": TeacherSpec("solider-b", "swin", "swin_base_patch4_window7_224", width=1024, depth=24,
                             num_heads=32, patch_size=4, token_stride=32, has_cls=False),
}

STUDENTS: dict[str, StudentSpec] = {
    "vit-ti": StudentSpec("vit-ti", "vit", "vit_tiny_patch16_224", width=192, num_heads=6, drop_path=0.0),
    "vit-s": StudentSpec("vit-s", "vit", "vit_small_patch16_224", width=384, num_heads=6, drop_path=0.0),
    "vit-b": StudentSpec("vit-b", "vit", "vit_base_patch16_224", width=768, num_heads=12, drop_path=0.0,
                         inter_dim=192),
    # Swin students down-project to 192 before the decoder, as the original's Swin decoder (down_dim) did:
    # at D 768 its expert generator (D -> D*D_t) alone would hold ~450M (PATH-B) / ~600M (SOLIDER-B) weights.
    "swin-t": StudentSpec("swin-t", "swin", "swin_tiny_patch4_window7_224", width=768, num_heads=24,
                          drop_path=0.1, inter_dim=192),
    "swin-s": StudentSpec("swin-s", "swin", "swin_small_patch4_window7_224", width=768, num_heads=24,
                          drop_path=0.1, inter_dim=192),
}

def timm_architecture(student_name: str) -> str:
    """The name a student is registered under in timm once `dpal` is imported (`dpal.timm_models`)."""
    return "dpal_" + student_name.replace("-", "_")


# Students trained at 128 per GPU with 2 accumulation steps (spec section 7).
_HALF_BATCH_STUDENTS = {"vit-b", "swin-s"}

_PAIRS = [
    ("path-b", "vit-ti"), ("path-b", "vit-s"), ("path-b", "swin-t"), ("path-b", "swin-s"),
    ("path-l", "vit-ti"), ("path-l", "vit-b"),
    ("solider-b", "swin-t"), ("solider-b", "swin-s"),
]


PAIR_SEPARATOR = "+"  # a recipe named by its parts: TEACHER+STUDENT (timm names hold underscores, never a "+")
TIMM_PREFIX = "timm:"  # a teacher or student named after a timm model: timm:NAME (`dpal.timm_backbones`)


def pair_name(teacher: str, student: str) -> str:
    """The recipe name of a teacher and a student: the published recipe's when they form one."""
    return f"{teacher}_{student}" if (teacher, student) in _PAIRS else f"{teacher}{PAIR_SEPARATOR}{student}"


def compose_recipe(teacher: TeacherSpec, student: StudentSpec) -> Recipe:
    """The recipe distilling `teacher` into `student` as the published ones are built: the decoder maps the
    student's width (or its down-projection) onto the teacher's width; vit-b and swin-s at half the batch."""
    decoder = DecoderSpec(in_dim=student.inter_dim or student.width, out_dim=teacher.width, student_dim=student.width)
    optim = OptimConfig(batch_per_gpu=128, accum_steps=2) if student.name in _HALF_BATCH_STUDENTS else OptimConfig()
    return Recipe(pair_name(teacher.name, student.name), teacher, student, decoder, optim)


RECIPES: dict[str, Recipe] = {r.name: r for r in (compose_recipe(TEACHERS[t], STUDENTS[s]) for t, s in _PAIRS)}


def list_recipes() -> list[str]:
    return list(RECIPES)


def register_teacher(spec: TeacherSpec) -> TeacherSpec:
    """Make a teacher defined in code known by its name to every command and function that takes a teacher
    name (`cache_teacher run --teacher NAME`, `train_student --teacher NAME`, `dpal.teachers.build_teacher`).
    The spec defines the model: a ViT (`arch` 'vit', timm's VisionTransformer at the spec's width, depth and
    heads) or a Swin ('swin', SOLIDER-B's layout); its weights load as the released PATH / SOLIDER files do."""
    return _register(TEACHERS, spec, "teacher", TeacherSpec)


def register_student(spec: StudentSpec) -> StudentSpec:
    """Make a student defined in code known by its name (`train_student --student NAME`) and to timm as
    `dpal_NAME` (`timm.create_model`, exports). `timm_name` names the timm model it is built from."""
    if STUDENTS.get(spec.name) == spec:  # registered already, with timm too
        return spec
    _register(STUDENTS, spec, "student", StudentSpec)
    if "dpal.timm_models" in sys.modules:  # registered with timm already: add this one (else at that import)
        sys.modules["dpal.timm_models"].register(spec.name)
    return spec


def _register(known: dict, spec, role: str, kind: type):
    if not isinstance(spec, kind):
        raise TypeError(f"register_{role} takes a {kind.__name__}, got {type(spec).__name__}")
    if spec.arch not in ("vit", "swin"):
        raise ValueError(f"{role} {spec.name!r}: arch {spec.arch!r} is not one of 'vit', 'swin'")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", spec.name):
        raise ValueError(f"{role} name {spec.name!r}: use lower-case letters, digits, '.' and '-' (no '_', '+' or "
                         f"':', which separate the parts of recipe and timm names)")
    if known.get(spec.name, spec) != spec:
        raise ValueError(f"{role} {spec.name!r} is registered already with another spec; choose another name")
    known[spec.name] = spec
    return spec


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}") from None
