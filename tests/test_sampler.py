"""Sampling transforms on hand-made logits."""
import math

import pytest
import torch

from trident.engine.sampler import _filter, apply_penalties, sample
from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence


def seq(prompt=(1,), outputs=(), **params) -> Sequence:
    s = Sequence(0, "r", 0, list(prompt), SamplingParams(**params), 100)
    s.token_ids.extend(outputs)
    return s


def test_top_k_top_p_min_p_masks():
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(_filter(row, 2, 1.0, 0.0)).tolist() == [False, False, True, True]
    # top_p=0.7: 0.5 alone covers less than 0.7, so 0.3 stays; 0.5+0.3 covers it, so 0.15 goes.
    assert torch.isinf(_filter(row, -1, 0.7, 0.0)).tolist() == [False, False, True, True]
    assert torch.isinf(_filter(row, -1, 0.01, 0.0)).tolist() == [False, True, True, True]
    # min_p=0.5: keep tokens with p >= 0.25.
    assert torch.isinf(_filter(row, -1, 1.0, 0.5)).tolist() == [False, False, True, True]


def test_penalties_follow_openai_formula():
    logits = torch.zeros(1, 5)
    apply_penalties(logits, [seq(outputs=[2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25)])
    assert logits[0].tolist() == [0.0, 0.0, -1.0, -0.75, 0.0]
    logits = torch.zeros(1, 5)
    apply_penalties(logits, [seq(prompt=[2, 2], presence_penalty=1.0)])   # prompt tokens do not count
    assert logits[0].tolist() == [0.0] * 5


def test_repetition_penalty_and_min_tokens():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    apply_penalties(logits, [seq(prompt=[0], outputs=[1], repetition_penalty=2.0)])   # prompt and output count
    assert logits[0].tolist() == [1.0, -4.0, 2.0, -2.0, 1.0]
    s = seq(outputs=[4], min_tokens=3, stop_token_ids=[2])
    s.min_tokens_banned = [2, 3]                      # stop ids + EOS, set by the engine
    logits = torch.zeros(1, 5)
    apply_penalties(logits, [s])
    assert torch.isinf(logits[0]).tolist() == [False, False, True, True, False]
    s.token_ids.extend([4, 4])                        # three outputs: the mask lifts
    logits = torch.zeros(1, 5)
    apply_penalties(logits, [s])
    assert not torch.isinf(logits).any()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_vanishing_repetition_penalty_samples_instead_of_failing(temperature):
    """5e-324 is a valid penalty (in (0, 2]); dividing a positive logit by it overflows to +inf, and
    softmax over +inf is NaN, which made the draw raise and stopped the engine (found by the fuzz run)."""
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    s = seq(prompt=(0, 1), repetition_penalty=5e-324, temperature=temperature, seed=0)
    tokens, _ = sample(logits, [s])
    assert tokens[0] in (0, 1)               # the boosted tokens of the prompt: the largest finite logit
    assert torch.isfinite(logits[0, :2]).all()


def test_logprobs_of_a_row_do_not_depend_on_the_others():
    # Row 0 asks for 1 alternative and its chosen token is the top one: it gets exactly that,
    # whatever k another row asks for.
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    alone = sample(logits[:1].clone(), [seq(temperature=0, logprobs=1)])[1][0]
    _, together = sample(logits.clone(), [seq(temperature=0, logprobs=1), seq(temperature=0, logprobs=3)])
    assert list(alone) == list(together[0]) == [0] and list(together[1]) == [3, 2, 1]


@pytest.mark.parametrize("field, value, message", [
    ("stop_token_ids", None, None), ("stop", None, None),
    ("top_k", 2.5, "top_k must be an integer"), ("n", 2.0, "n must be an integer"),
    ("max_tokens", 2.5, "max_tokens must be an integer"), ("logprobs", True, "logprobs must be an integer"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("top_p", "0.5", "top_p must be a finite number"), ("stop", [1], "stop must be a string or a list"),
    ("stop_token_ids", ["2"], "stop_token_ids must be a list of token ids"),
    ("repetition_penalty", 0.0, "repetition_penalty must be in"),
    ("min_tokens", 20, "min_tokens must be in"), ("min_tokens", -1, "min_tokens must be in"),
])
def test_sampling_params_reject_wrong_kinds(field, value, message):
    if message is None:                               # None means "none of these": an empty list
        assert getattr(SamplingParams(**{field: value}), field) == []
        return
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_greedy_seeded_and_logprobs():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    ids, lps = sample(logits.clone(), [seq(temperature=0), seq(temperature=0, logprobs=1)])
    assert ids == [1, 0] and lps[0] is None
    expected = torch.log_softmax(logits[1], -1)
    assert list(lps[1]) == [0] and math.isclose(lps[1][0], expected[0].item(), rel_tol=1e-6)
    flat = torch.zeros(1, 1000)
    first = sample(flat.clone(), [seq(seed=3)])[0][0]
    assert sample(flat.clone(), [seq(seed=3)])[0][0] == first      # same seed, same draw
    draws = {sample(flat.clone(), [seq(seed=i)])[0][0] for i in range(20)}
    assert len(draws) > 10
