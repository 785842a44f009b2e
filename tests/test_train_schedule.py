"""train_student pieces that are pure arithmetic: traversal order, view-set choice, schedules, decay groups,
atomic checkpoints and run-folder refusals (the end-to-end behaviour is in test_train_cli.py)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from dpal.config import ViewConfig
from dpal.decoder import DynamicPatternDecoder
from dpal.recipes import get_recipe
from train_student.checkpoint import (RunFolderError, keep_step_copy, load_checkpoint, prepare_run_folder,
                                      recorded_run_id, save_checkpoint)
from train_student.data import FeedPlan, block_view_sets, local_crop_params
from train_student.step import param_groups
from train_student.loop import ema_momentum, learning_rate


def _plan(**overrides):
    settings = dict(num_images=103, chunk_images=4, micro_batch=3, world_size=1, rank=0, accum_steps=2, seed=7,
                    window_images=12)
    settings.update(overrides)
    return FeedPlan(**settings)


def test_epoch_stream_is_a_permutation_that_keeps_blocks_within_windows():
    plan = _plan()
    stream = plan.epoch_stream(3)
    assert sorted(stream.tolist()) == list(range(103))
    whole = _plan(num_images=96).epoch_stream(3)  # whole blocks only, so windows are aligned
    window = plan.window_images  # 3 blocks of 4 images
    for start in range(0, 96, window):
        assert len(set((whole[start:start + window] // plan.chunk_images).tolist())) == 3
    # consecutive blocks are not simply walked in order, and epochs differ
    assert not np.array_equal(stream, np.arange(103))
    assert not np.array_equal(plan.epoch_stream(3), plan.epoch_stream(4))
    assert np.array_equal(plan.epoch_stream(3), _plan().epoch_stream(3))


def test_ranks_split_each_global_batch_like_one_process():
    one = _plan(micro_batch=6, world_size=1)
    two = [_plan(micro_batch=3, world_size=2, rank=r) for r in range(2)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 103 // 12
    single = one.rank_order(5).reshape(-1, 6)
    split = [p.rank_order(5).reshape(-1, 3) for p in two]
    assert np.array_equal(single, np.concatenate(split, axis=1))
    assert not set(split[0].ravel()) & set(split[1].ravel())


def test_view_set_cycles_through_all_stored_sets_across_epochs():
    plan = _plan(num_images=200, chunk_images=4, seed=1)  # 50 blocks
    chosen = np.stack([block_view_sets(plan, epoch, 3) for epoch in range(6)])
    assert chosen.shape == (6, 50)
    for column in chosen.T:  # every block, hence every image, changes set each epoch and uses all K
        assert sorted(column[:3].tolist()) == [0, 1, 2]
        assert np.array_equal(column[:3], column[3:])
    assert len(set(chosen[0].tolist())) == 3  # not all blocks use the same set in an epoch
    assert np.array_equal(chosen[2], block_view_sets(_plan(num_images=200, chunk_images=4, seed=1, rank=1,
                                                           world_size=2), 2, 3))  # same on every rank


def test_local_crops_are_fresh_per_epoch_and_rank_slices_agree():
    cfg = ViewConfig()
    one = local_crop_params(_plan(micro_batch=4), cfg, epoch=0, micro_step=2)
    halves = [local_crop_params(_plan(micro_batch=2, world_size=2, rank=r), cfg, epoch=0, micro_step=2)
              for r in range(2)]
    assert torch.equal(one, torch.cat(halves))
    assert not torch.equal(one, local_crop_params(_plan(micro_batch=4), cfg, epoch=1, micro_step=2))


def test_lr_warms_up_linearly_then_follows_a_half_cosine():
    lrs = [learning_rate(s, peak=1.0, min_lr=0.1, warmup_steps=4, total_steps=20) for s in range(21)]
    assert lrs[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])  # from 0: step i of W gets peak * i / W
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_ema_momentum_goes_from_start_to_one_by_cosine():
    values = [ema_momentum(s, start=0.996, end=1.0, total_steps=10) for s in range(11)]
    assert values[0] == pytest.approx(0.996) and values[10] == pytest.approx(1.0)
    assert values[5] == pytest.approx(0.998)


def test_weight_decay_on_matrices_not_on_biases_or_norms():
    module = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5))
    module.register_parameter("queries", torch.nn.Parameter(torch.zeros(3, 5)))
    decay, no_decay = param_groups(module, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(module[0].weight), id(module.queries)}
    assert {id(p) for p in no_decay["params"]} == {id(module[0].bias), id(module[1].weight), id(module[1].bias)}


def test_gate_token_is_decayed_like_the_originals_moe_tokens():
    decoder = DynamicPatternDecoder(get_recipe("path-b_vit-ti").decoder)
    holder = torch.nn.Module()
    holder.decoder = decoder  # as the Distiller holds it: the name is "decoder.gate_token"
    decay, no_decay = param_groups(holder, 0.05)
    decayed, exempt = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert decoder.gate_token.ndim == 1 and id(decoder.gate_token) in decayed
    assert {id(decoder.pattern_queries), id(decoder.gate_weight), id(decoder.expert_proj.weight)} <= decayed
    assert {id(decoder.expert_proj.bias), id(decoder.gate_norm.weight), id(decoder.out_norm.bias)} <= exempt
    assert len(decayed) + len(exempt) == len(list(decoder.parameters()))


def _prepare(run, config, *, resume, inexact=False):
    prepare_run_folder(run, config, resume=resume, resumable_keys={"max_steps"},
                       inexact_keys={"compile": "pass --compile as recorded"}, inexact=inexact)


def test_checkpoint_is_replaced_atomically_and_run_folders_are_not_mixed(tmp_path):
    run = tmp_path / "run"
    _prepare(run, {"recipe": "a", "max_steps": 5, "compile": False}, resume=False)
    run_id = recorded_run_id(run)
    save_checkpoint(run, {"step": 1, "w": torch.ones(3)}, run_id)
    save_checkpoint(run, {"step": 2, "w": torch.zeros(3)}, run_id)
    state = load_checkpoint(run, run_id)
    assert state["step"] == 2 and torch.equal(state["w"], torch.zeros(3))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "run.json"]  # no temporary left
    with pytest.raises(RunFolderError, match="already holds another run"):
        _prepare(run, {"recipe": "a", "max_steps": 5, "compile": False}, resume=False)
    with pytest.raises(RunFolderError, match="recipe: recorded 'a', now 'b'"):
        _prepare(run, {"recipe": "b", "max_steps": 5, "compile": False}, resume=True)
    _prepare(run, {"recipe": "a", "max_steps": 9, "compile": False}, resume=True)
    with pytest.raises(RunFolderError, match="holds no run"):
        _prepare(tmp_path / "other", {"recipe": "a"}, resume=True)


def test_a_resume_that_changes_the_arithmetic_is_refused_unless_inexact_and_then_recorded(tmp_path, capsys):
    run = tmp_path / "run"
    _prepare(run, {"recipe": "a", "max_steps": 5, "compile": False}, resume=False)
    save_checkpoint(run, {"step": 1}, recorded_run_id(run))
    with pytest.raises(RunFolderError, match=r"compile: recorded False, now True\), so its losses would not "
                                             r"continue bit-identically: pass --compile as recorded; or pass "
                                             r"--inexact-resume"):
        _prepare(run, {"recipe": "a", "max_steps": 5, "compile": True}, resume=True)
    assert json.loads((run / "run.json").read_text())["compile"] is False  # the refusal changed nothing
    _prepare(run, {"recipe": "a", "max_steps": 5, "compile": True}, resume=True, inexact=True)
    assert "warning: --inexact-resume: continuing with other arithmetic (compile: recorded False, now True)" in \
        capsys.readouterr().err
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["compile"] is True and recorded["inexact_resumes"] == [["compile: recorded False, now True"]]
    _prepare(run, {"recipe": "a", "max_steps": 5, "compile": True}, resume=True)  # now the recorded setting


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    """A checkpoint copied from another run folder (same settings, other run) is refused on resume, as is one
    without a run id (written by a trainer before run ids)."""
    first, second = tmp_path / "first", tmp_path / "second"
    for run in (first, second):
        _prepare(run, {"recipe": "a", "max_steps": 5, "compile": False}, resume=False)
    assert recorded_run_id(first) != recorded_run_id(second)
    save_checkpoint(first, {"step": 3}, recorded_run_id(first))
    shutil.copy(first / "checkpoint.pt", second / "checkpoint.pt")
    recorded = (second / "run.json").read_text()
    with pytest.raises(RunFolderError, match="belongs to another run"):  # checked before run.json changes
        _prepare(second, {"recipe": "a", "max_steps": 9, "compile": False}, resume=True)
    assert (second / "run.json").read_text() == recorded
    with pytest.raises(RunFolderError, match=f"belongs to another run \\(run id {recorded_run_id(first)}, while "
                                             f".*records {recorded_run_id(second)}\\): it was copied or moved"):
        load_checkpoint(second, recorded_run_id(second))
    torch.save({"format": 1, "step": 3}, second / "checkpoint.pt")
    with pytest.raises(RunFolderError, match="checkpoint format 1, this trainer writes format 2"):
        load_checkpoint(second, recorded_run_id(second))


def test_keep_checkpoints_keeps_the_newest_n_step_copies(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, {"step": step, "w": torch.full((3,), float(step))}, "run-a")
        keep_step_copy(tmp_path, step, keep=3)
    kept = sorted(path.name for path in tmp_path.glob("checkpoint-*.pt"))
    assert kept == ["checkpoint-00000002.pt", "checkpoint-00000003.pt", "checkpoint-00000004.pt"]
    assert [load_checkpoint(tmp_path, "run-a", path=tmp_path / name)["step"] for name in kept] == [2, 3, 4]
    assert (tmp_path / kept[-1]).samefile(tmp_path / "checkpoint.pt")  # the newest costs no space
    keep_step_copy(tmp_path, 5, keep=1)  # the default: checkpoint.pt alone, no step copies made
    assert not (tmp_path / "checkpoint-00000005.pt").exists()
    with pytest.raises(RunFolderError, match="^export: .*checkpoint-00000009.pt does not exist"):
        load_checkpoint(tmp_path, "run-a", path=tmp_path / "checkpoint-00000009.pt", purpose="export")
