"""finetune/metrics.py against scores worked out by hand (the arithmetic is in the comments)."""

import math

import numpy as np
import pytest

from finetune import metrics as M

OPTS = {"A": "Chest X-ray", "B": "Fundus photograph", "C": "X-ray"}


# ---- exact (unchanged semantics) ---------------------------------------------------------------
@pytest.mark.parametrize("pred, ref, want", [
    ("The chest X-ray.", "chest x-ray", 1.0),             # article, case, final stop
    ("Fundus photograph. Vessels are visible.", "fundus photograph", 1.0),  # first sentence
    ("Chest X-ray shows a nodule", "chest x-ray", 0.0),  # more words in the first sentence
    ("x ray", "x-ray", 0.0),                             # the inner hyphen is kept
    ("anything", "", 0.0),                               # an empty reference matches nothing
])
def test_exact(pred, ref, want):
    assert M.exact(pred, ref) == want


# ---- yes / no ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, ref, want", [
    ("Yes.", "yes", 1.0),
    ("yes, there is a nodule", "Yes", 1.0),
    ("No - the lungs are clear", "no", 1.0),
    ("**No**", "no", 1.0),
    ("Answer: yes", "yes", 1.0),
    ("no", "yes", 0.0),
    ("There is no lesion", "no", 0.0),      # no leading yes/no: wrong even though it means no
    ("Nope", "no", 0.0),                    # 'nope' is not the word 'no'
    ("Not really", "no", 0.0),
    ("", "yes", 0.0),
    ("Yes", "Yes, in the right upper lobe", 1.0),  # the reference's leading word counts
])
def test_yesno(pred, ref, want):
    assert M.yesno(pred, ref) == want


def test_yesno_needs_a_yes_no_reference():
    with pytest.raises(ValueError, match="does not start with yes or no"):
        M.yesno("yes", "maybe")


def test_auto_metric():
    assert M.auto_metric("yes", has_options=False) == "yesno"
    assert M.auto_metric("No.", has_options=False) == "yesno"
    assert M.auto_metric("No evidence of pneumonia", has_options=False) == "exact"  # an open answer
    assert M.auto_metric("yes", has_options=True) == "choice"
    assert M.auto_metric("chest x-ray", has_options=False) == "exact"


# ---- multiple choice ---------------------------------------------------------------------------
@pytest.mark.parametrize("pred, want", [
    ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("B) fundus", 1.0), ("Answer: B", 1.0), ("The answer is B", 1.0),
    ("b", 1.0), ("[B]", 1.0), ("Option B", 1.0),
    ("Fundus photograph", 1.0), ("It is a fundus photograph.", 1.0),   # by the option's text
    ("A", 0.0), ("C.", 0.0), ("E", 0.0),                               # another letter, or none of them
    ("A chest X-ray", 0.0),       # 'A' here is an article: read by text, it picks A (Chest X-ray)
    ("X-ray", 0.0),               # option C's text
    ("I think it is B", 0.0),     # no letter at the start and no option text: no choice
    ("", 0.0),
])
def test_choice_reference_by_letter(pred, want):
    assert M.choice(pred, "B", OPTS) == want


@pytest.mark.parametrize("pred, want", [
    ("A.", 1.0), ("chest x-ray", 1.0),
    ("It is a chest X-ray", 1.0),   # 'x-ray' (C) also occurs, but inside 'chest x-ray' (A): A
    ("x-ray", 0.0),                 # C
    ("A chest X-ray or a fundus photograph", 0.0),  # two options named: no choice
])
def test_choice_reference_by_text(pred, want):
    assert M.choice(pred, "Chest X-ray", OPTS) == want


def test_choice_options_as_a_list_are_lettered_in_order():
    opts = ["Chest X-ray", "Fundus photograph"]
    assert M.parse_options(opts) == {"A": "Chest X-ray", "B": "Fundus photograph"}
    assert M.choice("B", "Fundus photograph", opts) == 1.0
    assert M.choice("A", "Fundus photograph", opts) == 0.0
    assert M.parse_options({"a": "x", " b ": "y"}) == {"A": "x", "B": "y"}


@pytest.mark.parametrize("opts, msg", [
    ({"AB": "x", "C": "y"}, "single letters"),
    (["only one"], "at least two"),
    ({"A": "x", "B": ""}, "option B must be a non-empty text"),
    ("A or B", "an object"),
    ({"A": "x", "a": "y"}, "same letter"),
])
def test_choice_rejects_bad_options(opts, msg):
    with pytest.raises(ValueError, match=msg):
        M.parse_options(opts)


def test_choice_reference_must_name_an_option():
    with pytest.raises(ValueError, match="neither an option letter"):
        M.choice("A", "D", OPTS)
    with pytest.raises(ValueError, match="neither an option letter"):
        M.choice("A", "MRI", OPTS)


# ---- open answers ------------------------------------------------------------------------------
def test_token_f1_by_hand():
    # pred tokens [left, upper, lobe, nodule]; ref [nodule, in, right, upper, lobe] (articles dropped)
    # shared: nodule, upper, lobe = 3 -> P = 3/4, R = 3/5, F1 = 2PR/(P+R) = 0.9/1.35 = 2/3
    assert M.token_f1("the left upper lobe nodule", "nodule in the right upper lobe") == pytest.approx(2 / 3)
    # shared tokens are counted with multiplicity: min(3, 1) = 1 -> P = 1/3, R = 1, F1 = 0.5
    assert M.token_f1("yes yes yes", "yes") == pytest.approx(0.5)
    assert M.token_f1("clear lungs", "nodule") == 0.0
    assert M.token_f1("the", "a") == 1.0      # both empty after dropping articles
    assert M.token_f1("", "nodule") == 0.0


def test_rouge_l_by_hand():
    # LCS of [left, upper, lobe, nodule] and [nodule, in, right, upper, lobe] is 'upper lobe' (2):
    # P = 2/4, R = 2/5, F = 2PR/(P+R) = 0.4/0.9 = 4/9 (token F1 on the same pair is 2/3: order matters here)
    assert M.rouge_l("the left upper lobe nodule", "nodule in the right upper lobe") == pytest.approx(4 / 9)
    # [nodule, upper, lobe] vs [nodule, in, upper, lobe]: LCS 3, P = 1, R = 3/4, F = 1.5/1.75 = 6/7
    assert M.rouge_l("nodule upper lobe", "nodule in the upper lobe") == pytest.approx(6 / 7)
    # non-ASCII words are whole tokens: [läsion, links] vs [läsion, rechts], LCS 1 -> F = 1/2
    # (rouge-score's own tokenizer would split 'läsion' into 'l', 'sion' and give 2/3)
    assert M.rouge_l("Läsion links", "Läsion rechts") == pytest.approx(0.5)
    assert M.rouge_l("clear", "nodule") == 0.0


def test_open_answer_and_score_one():
    o = M.open_answer("the left upper lobe nodule", "nodule in the right upper lobe")
    assert o == {"f1": pytest.approx(2 / 3), "rouge_l": pytest.approx(4 / 9)}
    r = M.score_one("open", "the left upper lobe nodule", "nodule in the right upper lobe")
    assert r["score"] == pytest.approx(2 / 3) and r["rouge_l"] == pytest.approx(4 / 9)
    assert M.score_one("choice", "(C)", "X-ray", OPTS) == {"score": 1.0, "chosen": "C"}
    assert M.score_one("yesno", "No.", "yes") == {"score": 0.0, "said": "no"}
    with pytest.raises(ValueError, match="unknown metric"):
        M.score_one("bleu", "a", "b")


# ---- bootstrap interval ------------------------------------------------------------------------
def test_bootstrap_all_equal_values_give_a_zero_width_interval():
    assert M.bootstrap_ci([0.7] * 25, n_resamples=500) == (pytest.approx(0.7), pytest.approx(0.7))
    assert M.bootstrap_ci([1.0]) == (1.0, 1.0)


def test_bootstrap_of_a_proportion_matches_the_normal_approximation():
    # 60 right of 200: mean 0.3, standard error sqrt(0.3 * 0.7 / 200) = 0.03240; the 95% normal
    # interval is 0.3 +- 1.96 * 0.03240, width 0.1270. A 90% interval (width 0.1066), resampling
    # without replacement (width 0) or the spread of the values themselves (width ~1.8) all fail.
    v = [1.0] * 60 + [0.0] * 140
    lo, hi = M.bootstrap_ci(v, n_resamples=4000, seed=1)
    se = math.sqrt(0.3 * 0.7 / 200)
    assert lo < 0.3 < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.06)
    assert (lo + hi) / 2 == pytest.approx(0.3, abs=0.01)
    lo90, hi90 = M.bootstrap_ci(v, n_resamples=4000, seed=1, alpha=0.10)
    assert (hi90 - lo90) == pytest.approx(2 * 1.645 * se, rel=0.06)


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    v = rng.random(50).tolist()
    assert M.bootstrap_ci(v, seed=3) == M.bootstrap_ci(v, seed=3)
    assert M.bootstrap_ci(v, seed=3) != M.bootstrap_ci(v, seed=4)
    with pytest.raises(ValueError):
        M.bootstrap_ci([])


# ---- paired test -------------------------------------------------------------------------------
def test_paired_test_on_right_wrong_scores_is_the_exact_mcnemar_test():
    # nothing changed: no evidence at all
    assert M.paired_test([1, 0, 1], [1, 0, 1]) == 1.0
    # 8 fixed, 0 broken: two-sided P(8 or 0 of 8 fair coin flips) = 2 / 2^8
    assert M.paired_test([0] * 10, [1] * 8 + [0] * 2) == pytest.approx(2 / 256)
    # 5 fixed, 1 broken (m = 6): outcomes at least as far from 3: j = 0, 1, 5, 6 positives
    # -> (1 + 6 + 6 + 1) / 64 = 14/64
    base = [0] * 5 + [1] + [1, 1, 0, 0]
    tuned = [1] * 5 + [0] + [1, 1, 0, 0]
    assert M.paired_test(base, tuned) == pytest.approx(14 / 64)
    assert M.paired_test(tuned, base) == pytest.approx(14 / 64)  # two-sided


def test_paired_test_with_graded_scores():
    # d = 0.5, 1.0, 0.25: of the 8 sign patterns only +++ and --- reach |sum| = 1.75 -> 2/8
    assert M.paired_test([0, 0, 0], [0.5, 1.0, 0.25]) == pytest.approx(0.25)
    # 40 positive differences of different sizes: only all-plus / all-minus reach the observed sum
    # (probability 2^-39), so the Monte Carlo estimate is its floor 1 / (1 + resamples)
    d = [0.1 * (i % 5 + 1) for i in range(40)]
    assert M.paired_test([0.0] * 40, d, n_resamples=2000) == pytest.approx(1 / 2001)
    with pytest.raises(ValueError, match="same samples"):
        M.paired_test([0, 1], [1])


def test_paired_test_monte_carlo_agrees_with_full_enumeration():
    rng = np.random.default_rng(0)
    d = np.round(rng.normal(0.15, 0.5, size=17), 2)
    # the exact p by brute force over all 2^17 sign patterns, written out independently here
    signs = np.array([[1 if (k >> j) & 1 else -1 for j in range(17)] for k in range(2 ** 17)])
    exact = float((np.abs(signs @ np.abs(d)) >= abs(d.sum()) - 1e-9).mean())
    p = M.paired_test(np.zeros(17), d, n_resamples=20000, seed=2)
    se = math.sqrt(exact * (1 - exact) / 20000)
    assert abs(p - exact) < 4 * se + 1e-4
