"""The acting core (asyncrl.acting.PolicyStep): greedy and exploring actions, the recurrent state
zeroed where episodes begin, the pull cadence, weights from a flat tensor, the RNG round trip."""

import numpy as np
import torch
from torch import nn

from asyncrl.acting import PolicyStep
from asyncrl.weights import WeightStore


class Chooser:
    """A feed-forward algorithm: greedy picks the network's argmax, exploring draws from the rng."""

    def make_acting_network(self) -> nn.Module:
        return nn.Linear(2, 3)

    def act(self, network, obs, env_steps, rng, greedy=False):
        if greedy:
            return network(obs).argmax(-1).numpy()
        return rng.integers(0, 3, len(obs))


class Counter:
    """A recurrent algorithm whose state counts the steps of an episode; its action is the count."""

    actor_state = {"h": ((1,), np.dtype(np.float32))}

    def make_acting_network(self) -> nn.Module:
        return nn.Linear(1, 1)

    def act(self, network, obs, env_steps, rng, greedy=False, state=None):
        return state["h"][:, 0].long().numpy(), {"h": state["h"] + 1}


def test_greedy_acts_by_the_network_and_exploring_by_the_rng():
    obs = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    greedy = PolicyStep(Chooser(), 5, np.random.default_rng(1), greedy=True)
    acted = greedy.act(obs, np.arange(5), 0)
    np.testing.assert_array_equal(acted.actions, greedy.network(torch.from_numpy(obs)).argmax(-1).numpy())
    assert acted.extras == {} and acted.state == {} and acted.weight_version == 0
    exploring = PolicyStep(Chooser(), 5, np.random.default_rng(1))
    np.testing.assert_array_equal(exploring.act(obs, np.arange(5), 0).actions,
                                  np.random.default_rng(1).integers(0, 3, 5))


def test_recurrent_state_is_zeroed_where_an_episode_begins_and_carried_otherwise():
    step = PolicyStep(Counter(), 3, np.random.default_rng(0))
    obs, no = np.zeros((3, 1), np.float32), np.zeros(3, bool)
    ids = np.arange(3)
    for expected in ([0, 0, 0], [1, 1, 1]):
        acted = step.act(obs, ids, 0, no, no)
        np.testing.assert_array_equal(acted.actions, expected)
        np.testing.assert_array_equal(acted.state["h"][:, 0], expected)  # the state each action saw
    # env 1 terminates, env 2 is truncated: their next observations begin episodes
    step.act(obs, ids, 0, np.array([False, True, False]), np.array([False, False, True]))
    np.testing.assert_array_equal(step.act(obs, ids, 0, no, no).actions, [3, 0, 0])
    # envs in any subset and order: only env 0's ends here, env 2 carries on
    np.testing.assert_array_equal(step.act(obs[:2], np.array([2, 0]), 0, np.array([False, True]),
                                           np.zeros(2, bool)).actions, [1, 4])
    np.testing.assert_array_equal(step.act(obs, ids, 0, no, no).actions, [0, 1, 2])
    step.episodes_restart()
    np.testing.assert_array_equal(step.act(obs, ids, 0, no, no).actions, [0, 0, 0])


def test_weights_are_pulled_every_pull_every_batches_when_the_version_moved():
    learner = nn.Linear(2, 3)
    store = WeightStore.for_module(learner)
    step = PolicyStep(Chooser(), 2, np.random.default_rng(0), store=store, pull_every=3, greedy=True)
    obs = np.ones((2, 2), np.float32)
    versions = []
    for batch in range(7):
        with torch.no_grad():
            learner.weight.add_(1.0)
        store.publish(learner)  # a new version before every batch
        versions.append(step.act(obs, np.arange(2), 0).weight_version)
    assert versions == [1, 1, 1, 4, 4, 4, 7]  # pulled at batches 0, 3 and 6 only
    torch.testing.assert_close(step.network.weight, learner.weight)
    assert step.act(obs, np.arange(2), 0).weight_version == 7  # batch 7: not due


def test_weights_from_a_flat_tensor():
    source = nn.Linear(2, 3)
    step = PolicyStep(Chooser(), 2, np.random.default_rng(0), greedy=True)
    step.load_flat(torch.nn.utils.parameters_to_vector(source.parameters()).detach().clone(), 5)
    assert step.act(np.ones((2, 2), np.float32), np.arange(2), 0).weight_version == 5
    torch.testing.assert_close(step.network.weight, source.weight.detach())
    torch.testing.assert_close(step.network.bias, source.bias.detach())


def test_rng_state_round_trips_through_json_like_data():
    import json

    step = PolicyStep(Chooser(), 8, np.random.default_rng(3))
    obs = np.zeros((8, 2), np.float32)
    step.act(obs, np.arange(8), 0)
    saved = json.loads(json.dumps(step.rng_state()))
    first = [step.act(obs, np.arange(8), 0).actions for _ in range(3)]
    step.set_rng_state(saved)
    again = [step.act(obs, np.arange(8), 0).actions for _ in range(3)]
    np.testing.assert_array_equal(first, again)


def test_a_policy_of_an_algorithm_with_extras_gives_actions_only():
    """Policy acts through the same core: PPO's log-probs stay inside, one obs gives one action."""
    from asyncrl import registry
    from asyncrl.core import EnvSpec, acting_copy
    from asyncrl.policy import Policy

    spec = EnvSpec("CartPole-v1", (4,), np.dtype(np.float32), "discrete", 2, ())
    cls = registry.get("ppo")
    algo = cls(spec, registry.algo_config(cls, {}), torch.device("cpu"))
    policy = Policy(algo, acting_copy(algo), spec)
    obs = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    batch = policy(obs)
    assert isinstance(batch, np.ndarray) and batch.shape == (5,)
    np.testing.assert_array_equal([policy(row) for row in obs], batch)  # greedy: no draws
    assert np.ndim(policy(obs[0])) == 0
