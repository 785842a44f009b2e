"""How faithful a store's coding is to the teacher: figures per target and the loss change it causes.

`fidelity` compares stored (coded, then decoded) targets with the teacher's float32 outputs on the same view
sets: cosine and relative L2 for the global and local tokens, KL(teacher || stored) and the teacher's mass
in the kept entries for relation rows, and, per distillation loss term, the relative change
|L(stored) - L(teacher)| / L(teacher) on a student at its initialisation (`student_probe`, seeded, so every
store of a teacher is judged by the same student). `run` records the figures of a calibration sample in the
store when it creates a compact store, or any store with a budget (`info` shows them), and refuses knobs
whose loss change exceeds `--max-loss-change`;
`run --dry-run` prints them for a compact store's knobs without writing anything; `verify` measures them
again on sampled stored view sets.
"""
from __future__ import annotations

import dataclasses

import torch

from dpal.config import Recipe, TeacherSpec
from dpal.decoder import DynamicPatternDecoder
from dpal.distill import distill_step_losses
from dpal.recipes import RECIPES
from dpal.students import build_student
from formats.targets import CompactTargets, Targets

FIDELITY_VIEW_SETS = 8  # view sets of the calibration sample whose figures a store records
LOSS_TERMS = ("global", "local", "relation")
# Figures, and whether larger (max) or smaller (min) is worse, in the order they are printed.
FIGURES = {"global_cosine": "min", "global_rel_l2": "max", "local_cosine": "min", "local_rel_l2": "max",
           "relation_kl": "max", "relation_kept_mass": "min",
           **{f"loss_change_{term}": "max" for term in LOSS_TERMS}}


def student_probe(spec: TeacherSpec, seed: int = 0) -> tuple[torch.nn.Module, DynamicPatternDecoder, Recipe]:
    """A freshly initialised student and decoder for this teacher's targets: the first recipe's student whose
    teacher lays tokens out alike (architecture, stride, CLS), its decoder widened to this teacher's width."""
    base = next(r for r in RECIPES.values() if (r.teacher.arch, r.teacher.token_stride, r.teacher.has_cls)
                == (spec.arch, spec.token_stride, spec.has_cls))
    recipe = dataclasses.replace(base, teacher=spec, decoder=dataclasses.replace(base.decoder, out_dim=spec.width))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student, decoder = build_student(recipe).eval(), DynamicPatternDecoder(recipe.decoder).eval()
    return student, decoder, recipe


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _rel_l2(stored: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||stored - teacher|| / ||teacher|| per view set (all but the batch axis)."""
    diff = (stored.double() - teacher.double()).flatten(1).norm(dim=1)
    return diff / teacher.double().flatten(1).norm(dim=1).clamp_min(1e-30)


def kept_mass(coded, teacher_relation: torch.Tensor) -> torch.Tensor:
    """The teacher's mass per relation row in the entries the coding keeps [B, Nc] (1 where it keeps all)."""
    if isinstance(coded, CompactTargets) and coded.relation_index is not None:
        return teacher_relation.double().gather(-1, coded.relation_index.long().to(teacher_relation.device)).sum(-1)
    return torch.ones(teacher_relation.shape[:-1], dtype=torch.float64)


def fidelity(coded: Targets | CompactTargets, teacher: Targets, views: dict[str, torch.Tensor],
             probe: tuple[torch.nn.Module, DynamicPatternDecoder, Recipe]) -> dict[str, list[float]]:
    """Figures of the stored coding `coded` against the teacher's float32 targets `teacher` (the same mask in
    both): name -> one value per view set, and for the loss changes one value for the batch, on `probe` for
    the rendered `views` (global_view, crowd_view; no local crops, whose loss term reads the global target)."""
    stored = coded.decoded()
    device = views["global_view"].device
    stored, teacher = (Targets(*(t.to(device) for t in (x.global_target, x.local_target, x.local_mask,
                                                         x.relation_target))) for x in (stored, teacher))
    p, q = teacher.relation_target.double(), stored.relation_target.double()
    q = q / q.sum(-1, keepdim=True)
    kl = (torch.xlogy(p, p) - p * q.clamp_min(1e-300).log()).sum(-1).mean(-1)
    figures = {"global_cosine": _cosine(stored.global_target, teacher.global_target),
               "global_rel_l2": _rel_l2(stored.global_target, teacher.global_target),
               "local_cosine": _cosine(stored.local_target, teacher.local_target).mean(-1),
               "local_rel_l2": _rel_l2(stored.local_target, teacher.local_target),
               "relation_kl": kl, "relation_kept_mass": kept_mass(coded, p).min(-1).values.cpu()}
    student, decoder, recipe = probe
    student, decoder = student.to(device), decoder.to(device)
    batch = views["global_view"].shape[0]
    local_views = views["global_view"].new_zeros((batch, 0, 3, *recipe.views.local_size))
    with torch.no_grad():  # one batch: the loss change is a figure of the whole sample
        losses = [distill_step_losses(student, decoder, recipe.teacher, global_view=views["global_view"],
                                      local_views=local_views, crowd_view=views["crowd_view"], moe_loss_weight=0.0,
                                      **targets.loss_arguments()) for targets in (stored, teacher)]
    coded_terms, teacher_terms = (terms.by_name() for terms in losses)
    for term in LOSS_TERMS:
        reference = float(teacher_terms[term])
        change = abs(float(coded_terms[term]) - reference) / max(abs(reference), 1e-30)
        figures[f"loss_change_{term}"] = [change]
    return {name: [float(v) for v in torch.as_tensor(values).flatten().tolist()] for name, values in figures.items()}


def summarise(per_view_set: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """name -> {'worst', 'mean'} over view sets (worst: the min or max as `FIGURES` says)."""
    return {name: {"worst": (min if FIGURES[name] == "min" else max)(values), "mean": sum(values) / len(values)}
            for name, values in per_view_set.items()}


def merge(parts: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    return {name: [v for part in parts for v in part[name]] for name in FIGURES}


def budget_problem(summary: dict[str, dict[str, float]] | None, max_loss_change: float | None) -> str | None:
    """None, or the first loss change above the budget, named, as one line."""
    if max_loss_change is None or summary is None:
        return None
    for term in LOSS_TERMS:
        worst = summary[f"loss_change_{term}"]["worst"]
        if worst > max_loss_change:
            return f"loss_change_{term} = {worst:.4g} exceeds --max-loss-change {max_loss_change:g}"
    return None


def figures_table(summary: dict[str, dict[str, float]], indent: str = "  ") -> str:
    lines = [f"{indent}{'figure':<26}{'worst':>12}{'mean':>12}"]
    lines += [f"{indent}{name:<26}{values['worst']:>12.5g}{values['mean']:>12.5g}" for name, values in summary.items()]
    return "\n".join(lines)
