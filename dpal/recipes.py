"""The eight published recipes (spec section 8) as named, immutable configurations."""
from __future__ import annotations

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


def _make_recipe(teacher_name: str, student_name: str) -> Recipe:
    teacher, student = TEACHERS[teacher_name], STUDENTS[student_name]
    decoder = DecoderSpec(in_dim=student.inter_dim or student.width, out_dim=teacher.width,
                          student_dim=student.width)
    optim = OptimConfig(batch_per_gpu=128, accum_steps=2) if student_name in _HALF_BATCH_STUDENTS else OptimConfig()
    return Recipe(f"{teacher_name}_{student_name}", teacher, student, decoder, optim)


RECIPES: dict[str, Recipe] = {r.name: r for r in (_make_recipe(t, s) for t, s in _PAIRS)}


def list_recipes() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}") from None
