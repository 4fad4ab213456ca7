"""The scores of the public multimodal benchmarks, as their papers and reference scripts define them.

- option_letter: the option a free-form answer picks ("B", "(B)", "B. 42", "The answer is B", or the
  text of exactly one option), for multiple-choice sets (AI2D, MMMU multiple-choice).
- relaxed_accuracy: ChartQA's metric (Methani et al. / pix2struct's implementation): a numeric answer
  within 5% of a numeric target counts, otherwise a case-insensitive exact match.
- anls: DocVQA's Average Normalized Levenshtein Similarity per question: the best over the reference
  answers of 1 - NL, and 0 where NL >= 0.5 (NL = edit distance / longer length, on lower-cased,
  whitespace-trimmed strings).
- open_answer_match: MMMU's open questions (its eval_open, simplified): numbers compare as numbers
  at 2 decimals, text references as lower-cased sub-strings of the answer.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase


def option_letter(response: str, options: Sequence[str]) -> str | None:
    """The letter of the option `response` picks among len(options) lettered A, B, ...; None when it
    names none or several (scored as wrong: no random guess, so results repeat)."""
    valid = LETTERS[:len(options)]
    text = response.strip()
    if not text or not valid:
        return None
    # A bare letter, possibly with brackets or a trailing period/colon: "B", "(B)", "B.", "B:".
    m = re.fullmatch(rf"[\(\[]?([{valid}])[\)\].:]?", text, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    # The answer starts with a letter followed by a separator: "B. 42", "(C) the cat".
    m = re.match(rf"^[\(\[]?([{valid}])[\)\].:]\s", text + " ")
    if m:
        return m.group(1)
    # "The answer is B", "answer: (C)".
    m = re.search(rf"answer(?:\s+is)?\s*[:：]?\s*[\(\[]?([{valid}])\b", text, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    # A single letter standing alone among words: "I think (B)".
    found = set(re.findall(rf"(?:^|[\s\(\[])([{valid}])(?=$|[\s\)\].,:])", text))
    if len(found) == 1:
        return found.pop()
    # The text of exactly one option.
    lowered = text.lower()
    hits = [LETTERS[i] for i, opt in enumerate(options) if opt and opt.strip().lower() in lowered]
    if len(hits) == 1:
        return hits[0]
    return None


def _to_float(text: str) -> float | None:
    text = text.strip().replace(",", "")
    if text.endswith("%"):
        text = text[:-1]
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA: |prediction - target| / |target| <= 5% when both are numbers (and target != 0),
    else prediction == target ignoring case and surrounding whitespace."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t is not None:
        if t == 0:
            return p == 0
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.strip().lower() == target.strip().lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's per-question ANLS: max over answers of 1 - NL(prediction, answer), 0 where NL >= threshold."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        ans = " ".join(str(answer).strip().lower().split())
        longest = max(len(pred), len(ans))
        nl = levenshtein(pred, ans) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _numbers(text: str) -> list[float]:
    found = (_to_float(n) for n in re.findall(r"-?\d[\d,]*\.?\d*%?", text))
    return [n for n in found if n is not None]


def open_answer_match(prediction: str, answers: Sequence[str]) -> bool:
    """MMMU open questions (its eval_open, simplified): a numeric reference is hit by a number in the
    prediction equal to it at 2 decimals; a text reference by its lower-cased form appearing in the
    lower-cased prediction (MMMU matches sub-strings too)."""
    text = prediction.strip().lower()
    numbers = [round(n, 2) for n in _numbers(text)]
    for answer in answers:
        ref = str(answer).strip()
        value = _to_float(ref)
        if value is not None:
            if round(value, 2) in numbers:
                return True
        elif ref and ref.lower().rstrip(".") in text:
            return True
    return False
