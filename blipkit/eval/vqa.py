"""VQA v2 accuracy: the official answer normalisation and the leave-one-out consensus score."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from blipkit.errors import DataError

__all__ = ["normalize_answer", "vqa_accuracy", "vqa_scores"]

# The official contraction table, less its entries with capital letters ("Im", "Ive", "Id've", "I'dve"):
# the official code lowercases before the lookup, so those never apply. "somebody'd" -> "somebodyd" is
# backwards, but it is what the official evaluation does, so it stays.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"
)
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern reads "(?!<=\d)(\.)(?!\d)": its first group is a lookahead, not a lookbehind, so in
# effect it drops every period that is not followed by a digit ("3.5" keeps its point, "1." loses it).
_PERIOD = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE where re.sub expects its count, so at most 32 periods are dropped.
_PERIOD_LIMIT = 32


def _strip_punctuation(text: str) -> str:
    """The official ``processPunctuation``: each mark is deleted or turned into a space, then periods go."""
    out = text
    glued_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        # Decided on the input, not on the running output, as the official code does.
        if mark + " " in text or " " + mark in text or glued_number:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def _digits_articles_contractions(text: str) -> str:
    """The official ``processDigitArticle``: lowercase, number words to digits, no articles, contractions."""
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer normalised as the official VQA v2 evaluation normalises predictions.

    Newlines and tabs become spaces; punctuation is removed or spaced out (a mark is deleted when it touches a
    space or when the text holds a digit-comma-digit group, so "1,000" becomes "1000", and turned into a space
    otherwise, so "black/white" becomes "black white"); periods not followed by a digit are dropped; then the
    text is lowercased, "none", "zero" ... "ten" become digits, "a", "an", "the" are dropped, the official
    contraction table applies ("dont" -> "don't") and whitespace collapses to single spaces.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def _consensus(prediction: str, answers: Sequence[str]) -> float:
    """The mean, over leaving each answer out in turn (by position), of min(1, matches among the rest / 3)."""
    scores = []
    for left_out in range(len(answers)):
        matches = sum(1 for i, answer in enumerate(answers) if i != left_out and answer == prediction)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize_references: bool = False) -> float:
    """The VQA v2 accuracy of one predicted answer against the human answers, in [0, 1], exactly as the
    official evaluation (``vqaEval.py``) computes it.

    The prediction is normalised with :func:`normalize_answer`. The answers get the official punctuation
    processing only (no lowercasing, no number words, articles or contractions), and only when they are not
    all the same: ten identical "Two" never match a prediction "two" (it normalises to "2"). With n answers
    (10 in VQA v2) the score is the mean, over the n ways of leaving one answer out, of min(1, matches among
    the rest / 3): with 10 answers, 1 match scores 0.3, 2 score 0.6, 3 score 0.9 and 4 or more 1.0.
    A single answer (not VQA v2 data; the official code would score every prediction 0) scores exact match.

    ``normalize_references=True`` is a lenient variant, not the official score: the answers are normalised
    like the prediction, so "2" against ["two"] x 2 + ["3"] x 8 scores 0.6 instead of 0.0.
    """
    if isinstance(answers, str):
        raise DataError("vqa_accuracy: answers must be a list of strings, not a single string; wrap it in a list")
    if not answers:
        raise DataError("vqa_accuracy: a question has no reference answers; every question needs at least one")
    predicted = normalize_answer(prediction)
    if normalize_references:
        references = [normalize_answer(answer) for answer in answers]
    elif len(set(answers)) > 1:
        references = [_strip_punctuation(answer) for answer in answers]
    else:
        references = list(answers)
    if len(references) == 1:
        return float(predicted == references[0])
    return _consensus(predicted, references)


def _aligned(name: str, values: Sequence[Any] | Mapping[Any, Any], keys: list[Any] | None) -> list[Any]:
    if keys is None:
        return list(values)
    if not isinstance(values, Mapping):
        raise DataError(f"vqa_scores: predictions are keyed by question id, so {name} must be a dict as well")
    missing = [key for key in keys if key not in values]
    if missing:
        raise DataError(f"vqa_scores: {len(missing)} question ids have no {name} (first: {missing[0]!r})")
    return [values[key] for key in keys]


def vqa_scores(
    predictions: Sequence[str] | Mapping[Any, str],
    answers_list: Sequence[Sequence[str]] | Mapping[Any, Sequence[str]],
    answer_types: Sequence[str] | Mapping[Any, str] | None = None,
    normalize_references: bool = False,
) -> dict[str, Any]:
    """VQA v2 accuracy over a set of questions, overall and per answer type, as fractions in [0, 1]
    (:func:`vqa_accuracy`: the official score unless ``normalize_references``).

    The arguments are parallel lists, or dicts keyed by question id (then ``answers_list`` and
    ``answer_types`` need every id of ``predictions``). Returns ``{"accuracy", "count", "per_type"}``, where
    ``per_type`` maps each answer type ("yes/no", "number", "other" in VQA v2) to its accuracy and is empty
    when no types are given.
    """
    keys = list(predictions) if isinstance(predictions, Mapping) else None
    preds = _aligned("predictions", predictions, keys)
    answers = _aligned("answers", answers_list, keys)
    types = None if answer_types is None else _aligned("answer types", answer_types, keys)
    if len(answers) != len(preds) or (types is not None and len(types) != len(preds)):
        raise DataError(
            f"vqa_scores: {len(preds)} predictions but {len(answers)} answer lists"
            + ("" if types is None else f" and {len(types)} answer types")
            + "; pass one of each per question"
        )
    if not preds:
        raise DataError("vqa_scores: no predictions to score; pass at least one question")
    scores = [vqa_accuracy(p, a, normalize_references) for p, a in zip(preds, answers)]
    by_type: dict[str, list[float]] = defaultdict(list)
    for kind, score in zip(types or [], scores):
        by_type[kind].append(score)
    return {
        "accuracy": sum(scores) / len(scores),
        "count": len(scores),
        "per_type": {kind: sum(values) / len(values) for kind, values in by_type.items()},
    }
