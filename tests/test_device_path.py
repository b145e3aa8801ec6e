"""Issue 23 (items 2, 3): the CUDA path's defects, tested on the CPU with ``torch.cuda`` mocked
where it can be; the tests marked ``cuda`` run on a box with a GPU and are skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import asyncrl.runstate as runstate
from asyncrl.learner import pick_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_bad_cuda_ordinal_is_a_value_error_not_a_traceback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="2 CUDA device"):
        pick_device("cuda:2")
    with pytest.raises(ValueError, match="learner.device"):
        pick_device("cuda:x")


def test_the_cuda_rng_state_is_restored_when_present_and_left_alone_when_absent(monkeypatch):
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: set_calls.append((state, index)))

    class Stop(Exception):
        pass

    class C:  # restore stops at the manifest read after the RNG states: enough here
        class algo:
            load_state_dict = staticmethod(lambda s: None)

    manifest = {}  # manifest.get raises nothing; the config lookup below raises KeyError
    state = {"algo": {}, "torch_rng": torch.get_rng_state(), "cuda_rng": [torch.zeros(16, dtype=torch.uint8)] * 2}
    with pytest.raises(KeyError):
        runstate.restore(C, None, manifest, state, False)
    assert [index for _, index in set_calls] == [0]  # one device here: the second state is not set
    set_calls.clear()
    del state["cuda_rng"]  # a CPU box's checkpoint: the CUDA state as it is
    with pytest.raises(KeyError):
        runstate.restore(C, None, manifest, state, False)
    assert set_calls == []


def test_continuous_and_discrete_sampling_return_numpy_from_cpu_tensors():
    from algos.actor_critic import sample_actions
    from types import SimpleNamespace

    class Net:
        log_std = None

        def policy(self, obs):
            return obs

    obs = torch.randn(4, 3)
    actions, extras = sample_actions(Net(), None, obs, np.random.default_rng(0), greedy=False)
    assert isinstance(actions, np.ndarray) and isinstance(extras["log_prob"], np.ndarray)
    net = Net()
    net.log_std = torch.zeros(3)
    spec = SimpleNamespace(action_low=-1.0, action_high=1.0)
    actions, extras = sample_actions(net, spec, obs, np.random.default_rng(0), greedy=False)
    assert actions.shape == (4, 3) and extras["raw_action"].shape == (4, 3)
    assert np.all(np.abs(actions) <= 1.0)


@cuda
def test_sampling_on_the_device_matches_the_cpu():
    from algos.actor_critic import sample_actions

    class Net:
        log_std = None

        def policy(self, obs):
            return obs

    obs = torch.randn(8, 5)
    cpu = sample_actions(Net(), None, obs, np.random.default_rng(3), greedy=False)
    dev = sample_actions(Net(), None, obs.cuda(), np.random.default_rng(3), greedy=False)
    np.testing.assert_array_equal(cpu[0], dev[0])
    np.testing.assert_allclose(cpu[1]["log_prob"], dev[1]["log_prob"], rtol=1e-5)


@cuda
def test_the_cuda_rng_state_is_checkpointed_on_a_gpu():
    torch.zeros(1, device="cuda")  # initialise CUDA
    states = torch.cuda.get_rng_state_all()
    assert all(isinstance(s, torch.Tensor) for s in states)  # weights_only loads it


def test_the_device_picked_is_said_in_one_line(monkeypatch):
    from asyncrl.learner import device_line

    assert device_line("cpu", torch.device("cpu")) == "learner on cpu"
    monkeypatch.setattr(torch.version, "cuda", None)
    line = device_line("auto", torch.device("cpu"))
    assert line.startswith("learner on cpu (torch has no CUDA") and "\n" not in line


def test_serial_mode_on_cuda_turns_on_deterministic_algorithms(monkeypatch):
    from asyncrl import learner

    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only: calls.append((on, warn_only)))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    learner.deterministic_on_cuda()
    import os
    assert calls == [(True, True)] and torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
