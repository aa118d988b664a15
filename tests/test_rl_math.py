"""PPO's pure pieces against values computed by hand: KL penalty, GAE, whitening, clipped losses, KL control,
response masks and prompt batching."""

import math

import pytest
import torch

from align.data import Record
from align.rl import advantages as adv
from align.rl import kl, losses, rollout
from align.rl.roles import last_non_pad_index

T = torch.tensor


def close(got, want, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), torch.as_tensor(want, dtype=torch.float32),
                               atol=tol, rtol=0)


def test_per_token_rewards_put_the_score_on_the_last_response_token():
    scores = T([1.0, 2.0])
    kl_t = T([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])  # 9.9 sits on padding
    mask = T([[1.0, 1, 1], [1, 1, 0]])
    # r_t = -0.5 * kl_t; the score is added at the last token (index 2 in row 0, index 1 in row 1)
    close(adv.per_token_rewards(scores, adv.per_token_kl(kl_t, torch.zeros_like(kl_t), mask), mask, 0.5),
          [[-0.05, -0.10, -0.15 + 1.0], [-0.20, -0.25 + 2.0, 0.0]])


def test_gae_by_hand():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.4, 0.3]]), T([[1.0, 1, 1]])
    # gamma 1, lam 0.5: delta = [-0.1, -0.1, 0.7]; A2 = 0.7, A1 = -0.1 + 0.5 * 0.7, A0 = -0.1 + 0.5 * 0.25
    a, r = adv.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    close(a, [[0.025, 0.25, 0.7]])
    close(r, [[0.525, 0.65, 1.0]])
    # gamma 0.9, lam 1: returns are the discounted reward sums 0.81, 0.9, 1.0
    a, r = adv.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    close(a, [[0.31, 0.5, 0.7]])
    close(r, [[0.81, 0.9, 1.0]])


def test_gae_ignores_padding_after_the_response():
    # the padded position's value (5) and reward must not leak into the real tokens
    a, r = adv.gae(T([[0.0, 2.0, 7.0]]), T([[1.0, 1.0, 5.0]]), T([[1.0, 1, 0]]), gamma=1.0, lam=1.0)
    close(a, [[1.0, 1.0, 0.0]])
    close(r, [[2.0, 2.0, 0.0]])


def test_masked_whitening():
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1, 1, 0]])
    assert adv.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert adv.masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / (3 - 1)
    assert adv.masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    close(adv.masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(adv.masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    close(adv.masked_mean(T([[1.0, 3.0], [5.0, 0.0]]), T([[1.0, 1], [1, 0]]), dim=1), [2.0, 5.0])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    new = T([[math.log(1.5), math.log(0.5), math.log(1.1), 3.0]])  # the 4th token is padding
    a = T([[1.0, -1.0, 2.0, 50.0]])
    mask = T([[1.0, 1, 1, 0]])
    loss, clip_frac, approx_kl = losses.policy_loss(new, old, a, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped), max(0.5, 0.8) = 0.8 (clipped),
    # max(-2.2, -2.2) = -2.2 (inside the range)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)
    # (r - 1) - log r per token
    want_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)) + (0.1 - math.log(1.1))) / 3
    assert approx_kl.item() == pytest.approx(want_kl, abs=1e-6)


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage():
    a, mask = T([[0.3, -1.0, 2.0]]), torch.ones(1, 3)
    loss, clip_frac, approx_kl = losses.policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), a, mask, 0.2)
    assert loss.item() == pytest.approx(-a.mean().item())
    assert clip_frac.item() == 0 and approx_kl.item() == 0


def test_clipped_value_loss_by_hand():
    values, old, returns, mask = T([[0.5, -0.1, 9.0]]), T([[0.0, 0.0, 0.0]]), T([[1.0, 0.2, 0.0]]), T([[1.0, 1, 0]])
    loss, clip_frac = losses.value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 1: clipped value 0.2 -> errors 0.25 (unclipped) and 0.64 (clipped): 0.64; token 2: inside, 0.09
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.09) / 2, abs=1e-6)
    assert clip_frac.item() == pytest.approx(0.5)


def test_logprobs_and_entropy_from_logits():
    logits = T([[[0.0, 0.0], [0.0, math.log(3.0)]]])
    close(losses.logprobs_from_logits(logits, T([[0, 1]])), [[math.log(0.5), math.log(0.75)]])
    close(losses.entropy_from_logits(logits), [[math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])


def test_one_softmax_gives_logprobs_and_entropy_with_or_without_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 3))
    for entropy_grad in (True, False):
        logp, entropy = losses.logprobs_and_entropy(logits, tokens, entropy_grad=entropy_grad)
        torch.testing.assert_close(logp, losses.logprobs_from_logits(logits, tokens))
        torch.testing.assert_close(entropy, losses.entropy_from_logits(logits))
        assert entropy.requires_grad == entropy_grad  # a statistic only: no graph through the vocabulary
    # the gradient of an entropy bonus is the two-softmax formula's
    _, entropy = losses.logprobs_and_entropy(logits, tokens)
    (got,) = torch.autograd.grad(entropy.sum(), logits)
    (want,) = torch.autograd.grad(losses.entropy_from_logits(logits).sum(), logits)
    torch.testing.assert_close(got, want)


def test_adaptive_kl_controller_by_hand():
    ctl = kl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 is 50% over the target: the error is clipped to +0.2 -> x (1 + 0.2 * 100 / 10000)
    assert ctl.update(9.0, n_samples=100) == pytest.approx(0.1002)
    # KL 3 is 50% under: clipped to -0.2 -> x (1 - 0.2 * 1000 / 10000)
    assert ctl.update(3.0, n_samples=1000) == pytest.approx(0.1002 * 0.98)
    # inside the clip range the step is proportional: KL 6.6 -> error 0.1, over a whole horizon x 1.1
    ctl = kl.AdaptiveKLController(0.2, target=6.0, horizon=100)
    assert ctl.update(6.6, n_samples=100) == pytest.approx(0.22)
    state = ctl.state_dict()
    again = kl.AdaptiveKLController(1.0, target=6.0, horizon=100)
    again.load_state_dict(state)
    assert again.value == pytest.approx(0.22)
    fixed = kl.FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05
    with pytest.raises(ValueError):
        kl.AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_response_mask_stops_after_the_first_stop_token():
    ids = T([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert rollout.response_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_left_padding_and_positions():
    ids, mask = rollout.left_pad([[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    full = torch.cat([mask, T([[1, 0], [1, 1]])], dim=1)  # responses: row 0 stopped after one token
    assert rollout.position_ids(full).tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]


def test_last_non_pad_index_is_the_sequence_classification_rule():
    assert last_non_pad_index(T([[4, 5, 6, 0, 0], [4, 5, 6, 7, 8], [0, 4, 0, 5, 0]]), 0).tolist() == [2, 4, 3]


def test_batches_cover_every_prompt_once_per_pass_and_split_over_processes():
    prompts = list(range(10))
    one = [rollout.batch_for_step(prompts, s, 5, seed=1) for s in range(2)]
    assert sorted(one[0] + one[1]) == prompts  # steps 0-1 are one pass
    assert one == [rollout.batch_for_step(prompts, s, 5, seed=1) for s in range(2)]  # a resumed run gets the same
    split = [rollout.batch_for_step(prompts, 0, 2, seed=1, num_processes=2, process_index=i) for i in range(2)]
    assert split[0] + split[1] == rollout.batch_for_step(prompts, 0, 4, seed=1)
    assert rollout.batch_for_step(prompts, 2, 5, seed=1) != one[0]  # the next pass is shuffled anew
    assert sorted(rollout.batch_for_step(prompts, 2, 5, seed=1) + rollout.batch_for_step(prompts, 3, 5, seed=1)) == \
        prompts


@pytest.mark.parametrize("row, want", [
    ({"prompt": "Hi", "chosen": "A", "rejected": "B"}, [{"role": "user", "content": "Hi"}]),
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hi\n\nAssistant: B"},
     [{"role": "user", "content": "Hi"}]),
    ({"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                   {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]},
     [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]),
    ({"instruction": "Add", "input": "1 2", "output": "3"}, [{"role": "user", "content": "Add\n\n1 2"}]),
    ({"question": "2+2?", "answer": "4"}, [{"role": "user", "content": "2+2?"}]),
    ({"prompt": "Just a prompt"}, [{"role": "user", "content": "Just a prompt"}]),
])
def test_prompt_messages_from_every_row_format(row, want):
    assert rollout.prompt_messages(Record("f.jsonl", 1, row)) == want


def test_prompt_messages_adds_the_system_prompt():
    got = rollout.prompt_messages(Record("f.jsonl", 1, {"prompt": "Hi"}), system_prompt="Be brief.")
    assert got == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
