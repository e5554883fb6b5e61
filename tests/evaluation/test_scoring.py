"""Hand-computed cases for the MC1/MC2/HHH scorers and the Dromedary-style variants."""

from __future__ import annotations

import math

import pytest

from selfalign.evaluation import scoring


def test_mc1_true_answer_must_be_strictly_best():
    assert scoring.mc1([-1.0, -2.0, -3.0], [1, 0, 0]) == 1.0
    assert scoring.mc1([-2.0, -1.0, -3.0], [1, 0, 0]) == 0.0
    # the true answer in another position is found from the labels
    assert scoring.mc1([-5.0, -1.0, -3.0], [0, 1, 0]) == 1.0


def test_mc1_ties_do_not_favour_the_first_listed_answer():
    # the true answer is listed first and ties with one distractor: argmax would give it full credit
    assert scoring.mc1([-1.0, -1.0, -3.0], [1, 0, 0]) == pytest.approx(0.5)
    # a three-way tie: expected credit 1/3 wherever the true answer is listed
    assert scoring.mc1([-1.0, -1.0, -1.0], [1, 0, 0]) == pytest.approx(1 / 3)
    assert scoring.mc1([-1.0, -1.0, -1.0], [0, 0, 1]) == pytest.approx(1 / 3)


def test_mc1_rejects_missing_scores():
    # the reference bug scored only the first ceil(n/2) candidates: refuse partial score lists
    with pytest.raises(ValueError):
        scoring.mc1([-1.0, -2.0], [1, 0, 0, 0])


def test_mc2_hand_computed():
    lls = [math.log(0.2), math.log(0.1), math.log(0.1)]
    # true mass 0.2 + 0.1 over total 0.4
    assert scoring.mc2(lls, [1, 1, 0]) == pytest.approx(0.75)
    assert scoring.mc2(lls, [0, 0, 1]) == pytest.approx(0.25)


def test_mc2_is_stable_for_very_negative_logliks():
    # exp(-2000) underflows to 0 in float64; the max shift keeps the ratio exact
    assert scoring.mc2([-2000.0, -2000.0 - math.log(3)], [1, 0]) == pytest.approx(0.75)


def test_hhh_acc_and_tie():
    assert scoring.hhh_acc([-3.0, -4.0], 0) == 1.0
    assert scoring.hhh_acc([-3.0, -4.0], 1) == 0.0
    assert scoring.hhh_acc([-3.0, -3.0], 0) == 0.5


def test_acc_norm_divides_by_choice_length_like_lm_eval():
    # per character: -5/len("abcde") = -1.0 vs -1/len("a") = -1.0 -> tie; raw acc would pick the short one
    assert scoring.acc_norm_choice([-5.0, -1.0], ["abcde", "a"], 0) == 0.5
    assert scoring.acc_norm_choice([-4.0, -1.0], ["abcde", "a"], 0) == 1.0
    assert scoring.hhh_acc([-4.0, -1.0], 0) == 0.0


def test_paper_tf_mc1_scores_every_candidate():
    # score = logP(true) - logP(false); the last distractor is the best: the buggy ceil(n/2) loop
    # would never look at it and would mark this question correct
    lp_true = [-1.0, -2.0, -2.0, -0.1]
    lp_false = [-2.0, -1.0, -1.0, -3.0]
    assert scoring.paper_tf_scores(lp_true, lp_false) == [1.0, -1.0, -1.0, 2.9]
    assert scoring.paper_tf_mc1(lp_true, lp_false, [1, 0, 0, 0]) == 0.0
    assert scoring.paper_tf_mc1(lp_true[:3], lp_false[:3], [1, 0, 0]) == 1.0


def test_paper_hhh_both_orders_cancel_letter_bias():
    # the model always prefers " A" by 2 nats regardless of content: with both orders the two
    # choices get equal scores -> a tie (0.5), not a win for whatever sits in position A
    biased_first = (-0.1, -2.1)  # order 1: choice 0 is A
    biased_swap = (-0.1, -2.1)   # order 2: choice 1 is A
    assert scoring.paper_hhh_ab(biased_first, biased_swap, 0) == 0.5
    assert scoring.paper_hhh_ab(biased_first, biased_swap, 1) == 0.5


def test_paper_hhh_order_swap_changes_the_winner():
    # choice 1 is preferred in both orders: picked as B first, then as A after the swap
    order1 = (-2.0, -0.5)  # (logP A, logP B) with choice 0 as A
    order2 = (-0.5, -2.0)  # with choice 1 as A
    assert scoring.paper_hhh_ab(order1, order2, 1) == 1.0
    assert scoring.paper_hhh_ab(order1, order2, 0) == 0.0
    # swapping which order is which flips the decision
    assert scoring.paper_hhh_ab(order2, order1, 0) == 1.0
