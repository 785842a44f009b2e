"""Recipes named by their parts, TEACHER+STUDENT: any teacher (registered, or `timm:NAME`) with any student
(registered, or `timm:NAME`), composed as the published recipes are (`dpal.recipes.compose_recipe`)."""
from __future__ import annotations

from dpal.config import Recipe
from dpal.recipes import PAIR_SEPARATOR, RECIPES, compose_recipe
from dpal.students import pair_problem, student_spec
from dpal.teachers import teacher_spec
from dpal.timm_backbones import BackboneError


def resolve_recipe(name: str) -> Recipe:
    """A published recipe by name, or the recipe TEACHER+STUDENT; a BackboneError names a teacher or student that
    cannot be used, or a pair whose student cannot follow its teacher."""
    if name in RECIPES:
        return RECIPES[name]
    if PAIR_SEPARATOR not in name:
        raise BackboneError(f"unknown recipe {name!r}; accepted: {', '.join(RECIPES)}, or "
                            f"TEACHER{PAIR_SEPARATOR}STUDENT")
    teacher, student = name.split(PAIR_SEPARATOR, 1)
    recipe = compose_recipe(teacher_spec(teacher), student_spec(student))
    if problem := pair_problem(recipe):
        raise BackboneError(problem)
    return recipe


__all__ = ["resolve_recipe"]
