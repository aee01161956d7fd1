"""COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D; METEOR and SPICE with Java) through pycocoevalcap."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from blipkit.errors import BlipkitError, DataError

__all__ = ["caption_scores", "tokenize_caption"]

# The tokens pycocoevalcap drops after PTB tokenisation. Brackets come out of the lowercasing tokenizer as
# "-lrb-", "-rrb-" and so on, which this list (upper case) does not catch, so they stay as words there too.
_DROPPED = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_WORDS = frozenset(word.strip() for word in _BRACKETS.values())
_ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "prof", "mt", "ave", "inc", "ltd", "co", "corp"}
)
_SPLIT_WORDS = {
    "cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na", "'tis": "'t is", "'twas": "'t was"
}
_SPACED = [
    (re.compile(r"\.{3,}"), " ... "),
    (re.compile(r"-{2,}"), " -- "),
    (re.compile(r"[?!]+"), r" \g<0> "),
    (re.compile(r"\"|''|``"), " "),
    (re.compile(r";"), " ; "),
    (re.compile(r"(?<!\d)[,:]|[,:](?!\d)"), r" \g<0> "),
    (re.compile(r"\$(?=\d)"), " $ "),
    (re.compile(r"(?<=\d)%"), " % "),
    (re.compile(r"(?<=\w)=(?=\w)"), " = "),
]
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC = re.compile(r"^(.+?)(" + "|".join(_CLITICS) + r")$")
_INITIALS = re.compile(r"^(?:[a-z]\.)+$")


def _split_word(word: str) -> list[str]:
    """PTB-style pieces of one whitespace-separated chunk (already lowercased, brackets and marks spaced)."""
    if word in _BRACKET_WORDS or word in _DROPPED or word in _CLITICS:
        return [word]
    if word in _SPLIT_WORDS:
        return _SPLIT_WORDS[word].split()
    lead: list[str] = []
    tail: list[str] = []
    while len(word) > 1 and word[0] in "'`-":
        lead.append(word[0])
        word = word[1:]
    while len(word) > 1 and word[-1] == "-":
        tail.insert(0, "-")
        word = word[:-1]
    if word.endswith(".") and len(word) > 1 and not _INITIALS.match(word) and word[:-1] not in _ABBREVIATIONS:
        tail.insert(0, ".")
        word = word[:-1]
    if len(word) > 1 and word.endswith("'") and not word.endswith("''"):
        tail.insert(0, "'")
        word = word[:-1]
    clitics: list[str] = []
    while (clitic := _CLITIC.match(word)) and clitic.group(1) not in ("'", "`"):
        clitics.insert(0, clitic.group(2))
        word = clitic.group(1)
    return lead + [word] + clitics + tail


def tokenize_caption(text: str) -> str:
    """A caption tokenised the way pycocoevalcap's Java PTBTokenizer and punctuation filter leave it.

    Lowercased; clitics split ("isn't" -> "is n't", "dog's" -> "dog 's"); sentence punctuation, quotes,
    hyphen runs and ellipses removed; brackets kept as "-lrb-" style words (as the official pipeline does);
    commas and colons inside numbers kept ("1,000", "12:30"); abbreviations and initials keep their period
    ("mr.", "u.s."). Tokens are joined by single spaces. It approximates the Java tokenizer, which knows more
    rare cases; ``caption_scores(..., official=True)`` uses the Java one.
    """
    text = text.replace("\n", " ").lower()
    for bracket, word in _BRACKETS.items():
        text = text.replace(bracket, word)
    for pattern, replacement in _SPACED:
        text = pattern.sub(replacement, text)
    tokens = [piece for word in text.split() for piece in _split_word(word)]
    return " ".join(token for token in tokens if token not in _DROPPED)


def _check_inputs(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> list[Hashable]:
    if not predictions:
        raise DataError("caption_scores: no predictions to score; pass at least one {id: caption}")
    missing = [key for key in predictions if key not in references]
    if missing:
        raise DataError(
            f"caption_scores: {len(missing)} predicted ids have no references (first: {missing[0]!r})"
        )
    for key in predictions:
        refs = references[key]
        if isinstance(refs, str) or not refs:
            raise DataError(f"caption_scores: references for id {key!r} must be a non-empty list of captions")
        if not isinstance(predictions[key], str):
            kind = type(predictions[key]).__name__
            raise DataError(f"caption_scores: the prediction for id {key!r} must be one string, not {kind}")
    return list(predictions)


def _require_java(spice: bool) -> None:
    if shutil.which("java") is None:
        raise BlipkitError(
            "Java is needed for the official caption metrics (PTB tokenizer, METEOR, SPICE) and 'java' is not on "
            "PATH; install a Java runtime (e.g. apt-get install default-jre) or use official=False for BLEU, "
            "ROUGE-L and CIDEr without it"
        )
    if spice:
        from pycocoevalcap.spice import spice as spice_module

        lib = os.path.join(os.path.dirname(os.path.abspath(spice_module.__file__)), "lib")
        if not os.path.exists(os.path.join(lib, "stanford-corenlp-3.6.0.jar")):
            raise BlipkitError(
                "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use and is not "
                "installed; run 'python -m pycocoevalcap.spice.get_stanford_models' once with network access, "
                "or pass spice=False"
            )


def _tokenized(
    keys: list[Hashable],
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    official: bool,
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    if not official:
        gts = {key: [tokenize_caption(ref) for ref in references[key]] for key in keys}
        res = {key: [tokenize_caption(predictions[key])] for key in keys}
        return gts, res
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({key: [{"caption": ref} for ref in references[key]] for key in keys})
    res = tokenizer.tokenize({key: [{"caption": predictions[key]}] for key in keys})
    return gts, res


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    official: bool = False,
    spice: bool = True,
) -> dict[str, float]:
    """COCO caption metrics of one predicted caption per id against that id's reference captions.

    Returns ``Bleu_1`` .. ``Bleu_4``, ``ROUGE_L`` and ``CIDEr`` (pycocoevalcap's CIDEr-D, whose document
    frequencies come from the references passed here), computed by pycocoevalcap's Python scorers on
    :func:`tokenize_caption` tokens. With ``official=True`` the captions go through pycocoevalcap's Java PTB
    tokenizer instead and ``METEOR`` (and ``SPICE`` unless ``spice=False``) are added, as the COCO caption
    evaluation reports them; this needs ``java`` on PATH and raises a BlipkitError when it is missing.
    Every predicted id needs references; references without a prediction are ignored.
    """
    keys = _check_inputs(predictions, references)
    if official:
        _require_java(spice)
    gts, res = _tokenized(keys, predictions, references, official)

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: dict[str, float] = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if official:
        scores.update(_java_scores(gts, res, spice))
    return scores


def _java_scores(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]], spice: bool) -> dict[str, Any]:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    scores = {"METEOR": float(meteor.compute_score(gts, res)[0])}
    del meteor  # its destructor stops the Java process
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return scores
