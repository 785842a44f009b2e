"""`runtime.distributed`: the one torchrun set-up of both stages (rank, world size, device, backend)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.distributed import DeviceUnavailableError, setup_distributed

REPO = Path(__file__).resolve().parents[1]


def test_a_single_process_joins_no_group_and_picks_its_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed("cpu") == (0, 1, torch.device("cpu"))
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert setup_distributed(None) == setup_distributed("auto") == (0, 1, expected)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="--device cuda was asked for but no CUDA device is visible"):
            setup_distributed("cuda")


def test_ranks_started_as_torchrun_starts_them_join_one_gloo_group_on_the_cpu():
    """Two processes with torchrun's environment: each learns its rank, both pass a barrier, only rank 0 is
    the first rank, and a CPU device means the gloo backend."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = ("import torch.distributed as dist\n"
              "from runtime.distributed import barrier, is_rank0, setup_distributed\n"
              "rank, world, device = setup_distributed('cpu')\n"
              "barrier()\n"
              "print(rank, world, device, is_rank0(), dist.get_backend())\n"
              "dist.destroy_process_group()\n")
    ranks = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        ranks.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=300) for process in ranks]
    for process, (out, err) in zip(ranks, outputs):
        assert process.returncode == 0, err[-2000:]
    assert [out.split() for out, _ in outputs] == [["0", "2", "cpu", "True", "gloo"], ["1", "2", "cpu", "False", "gloo"]]
