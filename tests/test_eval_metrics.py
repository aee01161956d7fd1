"""Evaluation metrics: VQA accuracy, caption metrics, retrieval recall@K and re-ranking, shapes caption scoring."""

from __future__ import annotations

import random

import pytest
import torch

from blipkit.errors import BlipkitError, DataError
from blipkit.eval import (
    caption_scores,
    normalize_answer,
    rerank_topk,
    retrieval_recall,
    tokenize_caption,
    vqa_accuracy,
    vqa_scores,
)
from blipkit.plugins.datasets.shapes_scoring import COLOR_WORDS, SHAPE_WORDS, shapes_caption_accuracy, shapes_caption_correct

# ----------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("Two", "2"),
        ("yes.", "yes"),
        ("Yes!", "yes"),
        ("a dog", "dog"),
        ("The dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("none", "0"),
        ("three", "3"),
        ("  on   the table\n", "on table"),
    ],
)
def test_vqa_normalisation_makes_equivalent_answers_match(prediction: str, answer: str) -> None:
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0
    assert vqa_accuracy("something else", [answer] * 10) == 0.0


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("black/white", "black white"),  # no space next to the mark: it becomes a space
        ("black / white", "black white"),  # a space next to it: deleted
        ("1,000", "1000"),  # a digit-comma-digit group: every mark is deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("Mr. Smith", "mr smith"),
        ("left-hand", "left hand"),
        ("it's", "it's"),  # apostrophes are not punctuation here
        ("Three Dogs", "3 dogs"),
        ("the one", "1"),
    ],
)
def test_normalize_answer_follows_the_official_rules(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def _leave_one_out(matches: int, total: int = 10) -> float:
    """The official score written per answer kind: a matching answer left out leaves matches - 1 behind."""
    return (matches * min(1.0, (matches - 1) / 3) + (total - matches) * min(1.0, matches / 3)) / total


@pytest.mark.parametrize(
    ("matches", "hand_worked"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]
)
def test_vqa_partial_agreement_is_leave_one_out(matches: int, hand_worked: float) -> None:
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    random.Random(matches).shuffle(answers)
    assert vqa_accuracy("cat", answers) == pytest.approx(hand_worked)
    assert vqa_accuracy("Cat.", answers) == pytest.approx(_leave_one_out(matches))


def test_vqa_fewer_answers_and_single_answer() -> None:
    # 5 answers, 2 match: the two subsets without a match keep 1 (1/3), the three others keep 2 (2/3).
    assert vqa_accuracy("red", ["red", "red", "blue", "blue", "green"]) == pytest.approx((2 / 3 + 3 * 2 / 3) / 5)
    assert vqa_accuracy("Red.", ["red"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0


def test_vqa_accuracy_rejects_bad_answers() -> None:
    with pytest.raises(DataError, match="no reference answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(DataError, match="list of strings"):
        vqa_accuracy("yes", "yes")  # type: ignore[arg-type]


# Worked by hand from the official vqaEval.py: the prediction is normalised in full; the references get
# punctuation processing only, and only when they are not all the same; each of the 10 leave-one-out
# subsets scores min(1, matches / 3).
@pytest.mark.parametrize(
    ("prediction", "answers", "official", "lenient"),
    [
        # "2" never meets "two": references keep their words. Lenient: 2 matches -> (2 x 1/3 + 8 x 2/3) / 10.
        ("2", ["two"] * 2 + ["3"] * 8, 0.0, 0.6),
        # Identical references are not processed at all: "Two" stays "Two", the prediction becomes "2".
        ("two", ["Two"] * 10, 0.0, 1.0),
        ("a cat", ["a cat"] * 10, 0.0, 1.0),
        # Mixed references get punctuation processing: "black/white" -> "black white", 3 matches ->
        # leaving one of them out keeps 2 (2/3), leaving a "gray" out keeps 3 (1): (3 x 2/3 + 7) / 10.
        ("black white", ["black/white"] * 3 + ["gray"] * 7, 0.9, 0.9),
        # ... but not case folding or articles: only the 6 "red" match, and all 10 subsets keep >= 5.
        ("RED", ["Red"] * 4 + ["red"] * 6, 1.0, 1.0),
        ("the cat", ["the cat"] * 5 + ["cat"] * 5, 1.0, 1.0),
        # "Red" x 2 never matches "red": 1 match -> (1 x 0 + 9 x 1/3) / 10. Lenient: 3 -> (3 x 2/3 + 7) / 10.
        ("red", ["Red"] * 2 + ["red"] + ["blue"] * 7, 0.3, 0.9),
        ("yes", ["yes"] * 10, 1.0, 1.0),
    ],
)
def test_vqa_accuracy_is_the_official_score(prediction: str, answers: list[str], official: float, lenient: float) -> None:
    assert vqa_accuracy(prediction, answers) == pytest.approx(official)
    assert vqa_accuracy(prediction, answers, normalize_references=True) == pytest.approx(lenient)


def test_vqa_scores_overall_and_per_type() -> None:
    predictions = ["yes", "2", "red", "no"]
    answers = [["yes"] * 10, ["two"] * 2 + ["3"] * 8, ["blue"] * 10, ["no"] * 10]
    types = ["yes/no", "number", "other", "yes/no"]
    expected = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    assert expected == [1.0, 0.0, 0.0, 1.0]
    result = vqa_scores(predictions, answers, types)
    assert result["count"] == 4
    assert result["accuracy"] == pytest.approx(sum(expected) / 4)
    assert result["per_type"] == {"yes/no": 1.0, "number": 0.0, "other": 0.0}
    lenient = vqa_scores(predictions, answers, types, normalize_references=True)
    assert lenient["per_type"]["number"] == pytest.approx(0.6)
    keyed = vqa_scores(dict(enumerate(predictions)), dict(enumerate(answers)))
    assert keyed["accuracy"] == pytest.approx(result["accuracy"]) and keyed["per_type"] == {}
    with pytest.raises(DataError, match="3 predictions but 4 answer lists"):
        vqa_scores(predictions[:3], answers)
    with pytest.raises(DataError, match="question ids have no answers"):
        vqa_scores({1: "yes"}, {2: ["yes"]})


# -------------------------------------------------------------------------------------------- caption metrics

REFERENCES = {
    "img1": [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a big wave.",
    ],
    "img2": [
        "Two dogs playing with a red frisbee in the park.",
        "A pair of dogs chase a frisbee on the grass.",
        "Dogs are running after a frisbee in a green field.",
    ],
    "img3": [
        "A plate of food with broccoli, carrots and rice.",
        "A white plate topped with rice and vegetables.",
        "Some rice, broccoli and carrots on a dinner plate.",
    ],
}


TOKENIZE_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("The cat's toy isn't \"new\"; it's OLD!", "the cat 's toy is n't new it 's old"),
    ("An old man (wearing a hat) sits...", "an old man -lrb- wearing a hat -rrb- sits"),
    ("1,000 birds at 12:30 -- in the U.S., Mr. Smith said", "1,000 birds at 12:30 in the u.s. mr. smith said"),
    ("A black-and-white photo, 50% off: $5", "a black-and-white photo 50 % off $ 5"),
    ("I cannot say the kids' toys", "i can not say the kids toys"),
]


@pytest.mark.parametrize(("caption", "tokens"), TOKENIZE_CASES)
def test_tokenize_caption_mimics_ptb(caption: str, tokens: str) -> None:
    # Expected tokens are what pycocoevalcap's Java PTBTokenizer plus punctuation filter produce.
    assert tokenize_caption(caption) == tokens


def _direct_scores(predictions: dict[str, str]) -> tuple[list[float], float, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {key: [tokenize_caption(ref) for ref in REFERENCES[key]] for key in predictions}
    res = {key: [tokenize_caption(predictions[key])] for key in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return bleu, float(Rouge().compute_score(gts, res)[0]), float(Cider().compute_score(gts, res)[0])


def test_caption_scores_equal_pycocoevalcap_scorers() -> None:
    predictions = {
        "img1": "a man is surfing a big wave on his surfboard",
        "img2": "two dogs run after a frisbee on the grass",
        "img3": "a plate of rice and broccoli",
    }
    scores = caption_scores(predictions, REFERENCES)
    bleu, rouge, cider = _direct_scores(predictions)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert [scores[f"Bleu_{n}"] for n in range(1, 5)] == pytest.approx(bleu, abs=1e-12)
    assert scores["ROUGE_L"] == pytest.approx(rouge, abs=1e-12)
    assert scores["CIDEr"] == pytest.approx(cider, abs=1e-12)
    assert 0.0 < scores["Bleu_4"] < scores["Bleu_1"] < 1.0


def test_perfect_caption_scores_one_and_wrong_caption_scores_lower() -> None:
    perfect = caption_scores({key: refs[0] for key, refs in REFERENCES.items()}, REFERENCES)
    for n in range(1, 5):
        assert perfect[f"Bleu_{n}"] == pytest.approx(1.0)
    assert perfect["ROUGE_L"] == pytest.approx(1.0)
    wrong_captions = {"img1": "a cat sleeping on a sofa", "img2": "a train at a station", "img3": "a bus"}
    wrong = caption_scores(wrong_captions, REFERENCES)
    for key in perfect:
        assert wrong[key] < perfect[key]
    assert perfect["CIDEr"] > 1.0 > wrong["CIDEr"]


def test_caption_scores_input_errors() -> None:
    with pytest.raises(DataError, match="have no references"):
        caption_scores({"missing": "a dog"}, REFERENCES)
    with pytest.raises(DataError, match="non-empty list"):
        caption_scores({"img1": "a dog"}, {"img1": "a dog"})  # type: ignore[dict-item]


def test_official_caption_scores_without_java_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    with pytest.raises(BlipkitError) as raised:
        caption_scores({"img1": "a surfer"}, REFERENCES, official=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "Java" in message and "METEOR" in message and "apt-get install default-jre" in message
    assert "official=False" in message


@pytest.mark.java
def test_tokenize_caption_equals_java_ptb_tokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [ref for refs in REFERENCES.values() for ref in refs] + [caption for caption, _ in TOKENIZE_CASES] + [
        "There are 1,000 birds on the wire -- at 12:30 p.m.",
        "Mr. Smith walks his dog on St. Mark's Place.",
        "A stop sign with graffiti on it's side , and a 3.5 inch disk",
    ]
    java = PTBTokenizer().tokenize({index: [{"caption": text}] for index, text in enumerate(captions)})
    assert [tokenize_caption(text) for text in captions] == [java[index][0] for index in range(len(captions))]


# ------------------------------------------------------------------------------------------------- retrieval

# 3 images, 5 texts: texts 0 and 1 describe image 0, text 2 image 1, texts 3 and 4 image 2.
OWNERS = [0, 0, 1, 2, 2]
SIMILARITY = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3],  # image 0: its text 0 is first             -> rank 0
        [0.7, 0.6, 0.5, 0.4, 0.3],  # image 1: its text 2 is third              -> rank 2
        [0.1, 0.2, 0.3, 0.9, 0.0],  # image 2: its text 3 is first             -> rank 0
    ]
)
# Text to image, by columns: text 0 rank 0, text 1 rank 2, text 2 rank 1, text 3 rank 0, text 4 rank 2.


def test_retrieval_recall_on_a_hand_made_matrix() -> None:
    result = retrieval_recall(SIMILARITY, OWNERS, ks=(1, 2, 3))
    assert result["i2t_r1"] == pytest.approx(2 / 3)
    assert result["i2t_r2"] == pytest.approx(2 / 3)
    assert result["i2t_r3"] == pytest.approx(1.0)
    assert result["t2i_r1"] == pytest.approx(2 / 5)
    assert result["t2i_r2"] == pytest.approx(3 / 5)
    assert result["t2i_r3"] == pytest.approx(1.0)
    assert result["i2t_mean"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert result["mean"] == pytest.approx((result["i2t_mean"] + result["t2i_mean"]) / 2)


def _reference_recall(sim: torch.Tensor, owners: list[int], k: int) -> tuple[float, float]:
    """Recall@k by sorting each row, as LAVIS's retrieval report does (random scores have no ties)."""
    hits_i2t = 0
    for image in range(sim.shape[0]):
        order = sim[image].argsort(descending=True).tolist()
        rank = min(order.index(text) for text, owner in enumerate(owners) if owner == image)
        hits_i2t += rank < k
    hits_t2i = 0
    for text, owner in enumerate(owners):
        hits_t2i += sim[:, text].argsort(descending=True).tolist().index(owner) < k
    return hits_i2t / sim.shape[0], hits_t2i / len(owners)


def test_retrieval_recall_equals_sorting_reference_on_random_scores() -> None:
    generator = torch.Generator().manual_seed(3)
    owners = [image for image in range(12) for _ in range(3)]
    sim = torch.randn(12, 36, generator=generator, dtype=torch.float64)
    sim[torch.tensor(owners), torch.arange(36)] += 1.0  # better than chance, still imperfect
    result = retrieval_recall(sim, owners, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert (result[f"i2t_r{k}"], result[f"t2i_r{k}"]) == pytest.approx(_reference_recall(sim, owners, k))
    assert result["i2t_r1"] < 1.0 and result["t2i_r1"] < 1.0


def test_retrieval_ties_count_against_the_query_and_inputs_are_checked() -> None:
    constant = retrieval_recall(torch.zeros(3, 5), OWNERS, ks=(1, 4))
    assert constant["i2t_r1"] == 0.0 and constant["t2i_r1"] == 0.0
    with pytest.raises(DataError, match="5 texts in the similarity matrix but 4"):
        retrieval_recall(SIMILARITY, OWNERS[:4])
    with pytest.raises(DataError, match="images have no text"):
        retrieval_recall(SIMILARITY, [0, 0, 0, 2, 2])


def test_rerank_moves_the_right_candidate_up() -> None:
    # Image 1's own text (2) is third by ITC; an ITM that recognises the true pairs moves it to the top.
    def itm(row: int, candidates: torch.Tensor) -> torch.Tensor:
        return torch.tensor([1.0 if OWNERS[c] == row else 0.0 for c in candidates.tolist()])

    reranked = rerank_topk(SIMILARITY, itm, k=3)
    for row in range(3):
        top = SIMILARITY[row].topk(3).indices
        expected = torch.full((5,), float("-inf"))
        expected[top] = SIMILARITY[row, top] + itm(row, top)
        assert torch.equal(reranked[row], expected)
    assert retrieval_recall(SIMILARITY, OWNERS, ks=(1,))["i2t_r1"] < 1.0
    assert retrieval_recall(reranked, OWNERS, ks=(1,))["i2t_r1"] == 1.0
    assert reranked[1].argmax().item() == 2

    itm_only = rerank_topk(SIMILARITY, itm, k=99, add_similarity=False)  # k is capped at 5 candidates
    assert torch.equal(itm_only, torch.tensor([[float(o == r) for o in OWNERS] for r in range(3)]))
    def itm_t2i(row: int, candidates: torch.Tensor) -> torch.Tensor:
        return torch.tensor([float(OWNERS[row] == c) for c in candidates.tolist()])

    t2i = rerank_topk(SIMILARITY.T, itm_t2i, k=2)
    both = retrieval_recall(reranked, OWNERS, ks=(1,), similarity_t2i=t2i)
    assert both["t2i_r1"] == pytest.approx(3 / 5)  # texts 1 and 4 have their image outside their ITC top 2


def test_rerank_checks_the_score_count() -> None:
    with pytest.raises(DataError, match="returned 1 scores for 2 candidates"):
        rerank_topk(SIMILARITY, lambda row, cands: torch.zeros(1), k=2)


# ---------------------------------------------------------------------------------------------------- shapes

RED_CIRCLE = [{"color": "red", "shape": "circle", "bbox": [0, 0, 10, 10]}]
RED_CIRCLE_BLUE_SQUARE = RED_CIRCLE + [{"color": "blue", "shape": "square", "bbox": [20, 0, 30, 10]}]


@pytest.mark.parametrize(
    ("caption", "correct"),
    [
        ("a red circle", True),
        ("A Red Circle.", True),
        ("a circle, red", True),
        ("a blue circle", False),
        ("a red square", False),
        ("a red", False),
        ("a red circle and a blue square", False),
        ("a red circle on a black background", False),
        ("a red rectangle circle", False),
    ],
)
def test_single_shape_captions(caption: str, correct: bool) -> None:
    assert shapes_caption_correct(caption, RED_CIRCLE) is correct


@pytest.mark.parametrize(
    ("caption", "correct"),
    [
        ("a red circle left of a blue square", True),
        ("a blue square above a red circle", True),
        ("a blue circle left of a red square", False),  # colours bound to the wrong shapes
        ("a red circle", False),
        ("a red circle left of a blue square and a green triangle", False),
        ("a red and blue circle and square", False),
    ],
)
def test_two_shape_captions(caption: str, correct: bool) -> None:
    assert shapes_caption_correct(caption, RED_CIRCLE_BLUE_SQUARE) is correct


def test_shapes_dataset_captions_are_correct_and_swaps_are_not() -> None:
    from blipkit.plugins.datasets.shapes import COLORS, SHAPES, make_specs

    assert set(COLORS) == COLOR_WORDS and set(SHAPES) == SHAPE_WORDS, "the scorer knows the generator's words"

    specs = make_specs("validation", 40, seed=1)
    objects = [[{"color": s.color, "shape": s.shape} for s in spec.shapes] for spec in specs]
    captions = [spec.caption() for spec in specs]
    result = shapes_caption_accuracy(captions, objects)
    assert result["accuracy"] == 1.0 and result["count"] == 40
    assert result["single_count"] + result["two_count"] == 40 and result["two_count"] > 0
    shuffled = captions[1:] + captions[:1]
    assert shapes_caption_accuracy(shuffled, objects)["accuracy"] < 0.5


def test_shapes_caption_accuracy_groups() -> None:
    result = shapes_caption_accuracy(
        ["a red circle", "a blue circle", "a red circle", "a red circle left of a blue square", "a red circle"],
        [RED_CIRCLE, RED_CIRCLE, RED_CIRCLE, RED_CIRCLE_BLUE_SQUARE, RED_CIRCLE_BLUE_SQUARE],
    )
    assert result == {
        "accuracy": pytest.approx(3 / 5),
        "count": 5,
        "single_shape": pytest.approx(2 / 3),
        "single_count": 3,
        "two_shapes": 0.5,
        "two_count": 2,
    }
    assert shapes_caption_accuracy(["a red circle"], [RED_CIRCLE])["two_shapes"] is None
    with pytest.raises(DataError, match="2 captions but 1 object lists"):
        shapes_caption_accuracy(["a", "b"], [RED_CIRCLE])
