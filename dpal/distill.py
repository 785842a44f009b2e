"""One distillation step's losses: the single place that wires student outputs, decoder calls (spec
section 5) and losses (spec section 6). Used by `train_student` with cached targets and by its
online-teacher baseline, so both optimise exactly the same objective.
"""
from __future__ import annotations

import torch

from dpal.config import TeacherSpec
from dpal.decoder import DynamicPatternDecoder
from dpal.losses import dequantize_rows, global_loss, local_loss, LossTerms, relation_kl

GLOBAL_PATTERN, LOCAL_PATTERN, RELATION_PATTERN = 0, 1, 2


def distill_step_losses(student: torch.nn.Module, decoder: DynamicPatternDecoder, teacher_spec: TeacherSpec, *,
                        global_view: torch.Tensor, local_views: torch.Tensor, crowd_view: torch.Tensor,
                        global_target: torch.Tensor, local_target: torch.Tensor, local_mask: torch.Tensor,
                        relation_target: torch.Tensor, moe_loss_weight: float,
                        local_scale: torch.Tensor | None = None,
                        relation_scale: torch.Tensor | None = None) -> LossTerms:
    """All loss terms of one step and their total.

    Views: global_view [B,3,256,128], local_views [B,V,3,128,96] (V local crops, may be 0),
    crowd_view [B,3,256,256]. Targets: global_target [B,D_t], local_target [B,N,D_t] (int8 with
    local_scale [B,N] allowed), local_mask [B,N], relation_target [B,Nc,Nc] probabilities (int8 codes of
    `dpal.losses.quantize_relation` with relation_scale [B,Nc] allowed). moe_loss_weight: `dpal.losses.moe_weight(epoch, optim)`.

    Returns the `LossTerms` (moe: the unweighted mean gate CE; total = global + local + relation +
    moe_loss_weight * moe + experts).
    """
    batch = global_view.shape[0]
    if local_views.dim() != 5 or local_views.shape[0] != batch:
        raise ValueError(f"local_views must be [B={batch}, V, 3, H, W], got {tuple(local_views.shape)}")
    num_local = local_views.shape[1]

    global_out = student(global_view)
    # Decoder calls per sample (spec section 5): the global view's CLS and each local crop's CLS share
    # pattern 0. The decoder treats samples independently and its aux/experts losses are batch means,
    # so one call over the 1 + V stacked CLS batches equals 1 + V separate calls and is counted as such.
    class_tokens = [global_out.cls]
    if num_local:
        local_out = student(local_views.flatten(0, 1))
        class_tokens.append(local_out.cls.unflatten(0, (batch, num_local)).transpose(0, 1).flatten(0, 1))
    cls_call = decoder(torch.cat(class_tokens), GLOBAL_PATTERN)
    student_globals = list(cls_call.y[:, 0].split(batch))  # [global view, local crop 1, ...]

    local_call = decoder(student.local_tokens(global_out, teacher_spec), LOCAL_PATTERN)
    crowd_out = student(crowd_view)
    relation_call = decoder(student.relation_tokens(crowd_out, teacher_spec), RELATION_PATTERN)

    local_target = dequantize_rows(local_target, local_scale)
    if local_call.y.shape != local_target.shape:
        raise ValueError(f"local target has shape {tuple(local_target.shape)} but the decoded student tokens "
                         f"are {tuple(local_call.y.shape)}: target grid or width does not match teacher "
                         f"{teacher_spec.name!r}")
    if relation_target.shape[-1] != relation_call.y.shape[1]:
        raise ValueError(f"relation target covers {relation_target.shape[-1]} tokens but the student gives "
                         f"{relation_call.y.shape[1]} crowd tokens for teacher {teacher_spec.name!r}")

    calls = [(cls_call, 1 + num_local), (local_call, 1), (relation_call, 1)]
    num_calls = sum(count for _, count in calls)
    return LossTerms.summed(global_=global_loss(student_globals, global_target),
                            local=local_loss(local_call.y, local_target, local_mask),
                            relation=relation_kl(relation_call.y, relation_target, relation_scale),
                            moe=sum(call.aux_loss * count for call, count in calls) / num_calls,
                            experts=sum(call.experts_loss * count for call, count in calls) / num_calls,
                            moe_loss_weight=moe_loss_weight)
