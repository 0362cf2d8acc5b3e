import numpy as np

from treg_data.rewards import contrastive_rewards


def test_reward_is_centred_sigmoid_of_the_log_ratio():
    rng = np.random.default_rng(0)
    better, worse = rng.normal(-3, 2, 100), rng.normal(-3, 2, 100)
    expected = 1 / (1 + np.exp(-(better - worse))) - 0.5
    np.testing.assert_allclose(contrastive_rewards(better, worse), expected, atol=1e-7)


def test_reward_is_bounded_signed_and_dtype_float32():
    rewards = contrastive_rewards(np.array([0.0, -1.0, -50.0, -1e4]), np.array([-1.0, 0.0, -1e4, -50.0]))
    assert rewards.dtype == np.float32
    assert rewards[0] > 0 > rewards[1]
    assert np.all(np.abs(rewards) <= 0.5) and np.isfinite(rewards).all()
    np.testing.assert_allclose(rewards[2:], [0.5, -0.5])
    assert contrastive_rewards(np.array([-2.0]), np.array([-2.0]))[0] == 0.0
