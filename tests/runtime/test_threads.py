"""Thread counts follow the environment and the CPU affinity."""

from __future__ import annotations


import torch


def test_threads_follow_the_environment_and_the_affinity(monkeypatch):
    from bdpruning.runtime.threads import available_cores, configure_threads

    saved = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        monkeypatch.setenv("BDPRUNE_NUM_THREADS", "1")
        assert configure_threads() == 1 == torch.get_num_threads()
        monkeypatch.delenv("BDPRUNE_NUM_THREADS")
        assert configure_threads() == available_cores() == torch.get_num_threads()
        assert configure_threads(processes=2 * available_cores()) == 1
    finally:
        torch.set_num_threads(saved)
