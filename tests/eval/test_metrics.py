"""The benchmark metrics on cases whose scores are known from the sets' definitions."""

import pytest

from mmfuse.eval.metrics import anls, levenshtein, open_answer_match, option_letter, relaxed_accuracy

OPTIONS = ["a cat", "a dog", "a bird", "a fish"]


@pytest.mark.parametrize("response, letter", [
    ("B", "B"), ("(C)", "C"), ("d", "D"), ("D.", "D"), ("B. a dog", "B"), ("(A) a cat", "A"),
    ("The answer is D.", "D"), ("answer: (A)", "A"), ("I think (B) is right", "B"),
    ("It is a bird.", "C"),                    # the text of exactly one option
    ("A or B", None), ("E", None), ("", None), ("none of them", None),
])
def test_option_letter(response, letter):
    assert option_letter(response, OPTIONS) == letter


@pytest.mark.parametrize("prediction, target, hit", [
    ("10.4", "10", True), ("10.6", "10", False), ("9.5", "10", True), ("45%", "45", True),
    ("1,000", "1000", True), ("Yes", "yes", True), (" No ", "no", True), ("No", "Yes", False),
    ("0", "0", True), ("0.01", "0", False), ("12 million", "12", False),
])
def test_relaxed_accuracy(prediction, target, hit):
    assert relaxed_accuracy(prediction, target) is hit


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0


def test_anls():
    assert anls("The Cat", ["the cat"]) == 1.0
    assert anls("thecat", ["the cat"]) == pytest.approx(1 - 1 / 7)       # NL 1/7 < 0.5
    assert anls("dog", ["cat"]) == 0.0                                    # NL 1 >= 0.5: no credit
    assert anls("abcd", ["abxy"]) == 0.0                                  # NL exactly 0.5: no credit
    assert anls("cat", ["dog", "cats", "cat"]) == 1.0                     # the best reference counts
    assert anls("  new   york ", ["New York"]) == 1.0                    # whitespace collapsed


@pytest.mark.parametrize("prediction, answers, hit", [
    ("The answer is 3.14", ["3.14"], True), ("3.1400001", ["3.14"], True), ("42", ["43"], False),
    ("Paris", ["paris"], True), ("It is Paris, France", ["Paris"], True), ("London", ["Paris"], False),
    ("1,200 people", ["1200"], True), ("about 7", ["6", "7"], True),
])
def test_open_answer_match(prediction, answers, hit):
    assert open_answer_match(prediction, answers) is hit
