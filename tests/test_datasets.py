"""Data layer: image loading, ImageTextDataset bookkeeping, and the built-in file formats (offline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blipkit.data.dataset import ImageTextDataset
from blipkit.data.images import iter_image_paths, load_image, load_image_bytes
from blipkit.data.sample import Record, Sample, most_frequent_answer
from blipkit.errors import DataError
from blipkit.plugin_manager import registries


def _pixels(seed: int, size: tuple[int, int] = (12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _write_png(path: Path, seed: int) -> np.ndarray:
    array = _pixels(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
    return array


def _write_truncated_jpeg(path: Path) -> None:
    Image.fromarray(_pixels(99, (64, 64))).save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _one_line_error(excinfo: pytest.ExceptionInfo[DataError], *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


# --------------------------------------------------------------------------- load_image


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16", "CMYK", "RGB"])
def test_load_image_keeps_every_mode_and_pixel(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(1)
    if mode == "I;16":
        original = Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16))
    elif mode == "CMYK":
        original = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), mode="CMYK")
    else:
        original = Image.fromarray(_pixels(2, (7, 9))).convert(mode)
    suffix = ".tiff" if mode == "CMYK" else ".png"
    path = tmp_path / f"image{suffix}"
    original.save(path)
    loaded = load_image(path)
    assert loaded.mode == original.mode
    assert np.array_equal(np.asarray(loaded), np.asarray(original))
    assert loaded.convert("RGB").size == (7, 9)


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1), (3, 2), (1, 0)])
def test_load_image_applies_exif_orientation(tmp_path: Path, orientation: int, turns: int) -> None:
    array = _pixels(3, (8, 5))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.png"
    Image.fromarray(array).save(path, exif=exif)
    loaded = load_image(path)
    assert np.array_equal(np.asarray(loaded), np.rot90(array, k=turns))


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_image(tmp_path / "nope.jpg")
    _one_line_error(excinfo, "nope.jpg", "no such")
    with pytest.raises(DataError) as excinfo:
        load_image(tmp_path)
    _one_line_error(excinfo, str(tmp_path), "directory")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    with pytest.raises(DataError) as excinfo:
        load_image(text)
    _one_line_error(excinfo, "notes.jpg", "not an image")
    truncated = tmp_path / "cut.jpg"
    _write_truncated_jpeg(truncated)
    with pytest.raises(DataError) as excinfo:
        load_image(truncated)
    _one_line_error(excinfo, "cut.jpg", "truncated")
    with pytest.raises(DataError) as excinfo:
        load_image_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "row 3")
    _one_line_error(excinfo, "row 3")


def test_iter_image_paths_expands_dirs_and_globs(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "c.JPG"):
        _write_png(tmp_path / "imgs" / name, 0)
    (tmp_path / "imgs" / "readme.txt").write_text("x")
    single = tmp_path / "one.png"
    _write_png(single, 1)
    found = list(iter_image_paths([tmp_path / "imgs", str(single), str(tmp_path / "imgs" / "[ab].png")]))
    names = [p.name for p in found]
    assert names == ["a.png", "b.png", "c.JPG", "one.png", "a.png", "b.png"]
    with pytest.raises(DataError, match="no such file"):
        list(iter_image_paths([tmp_path / "missing.png"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        list(iter_image_paths([tmp_path / "empty"]))
    with pytest.raises(DataError, match="matches no image"):
        list(iter_image_paths([str(tmp_path / "*.gif")]))


# --------------------------------------------------------------------------- ImageTextDataset


def test_most_frequent_answer() -> None:
    assert most_frequent_answer(["yes", "no", "no", "yes", "no"]) == "no"
    assert most_frequent_answer(["2", "two", "two", "2"]) == "2"
    assert most_frequent_answer(["2", "two", "two", "2"], preferred="two") == "two"
    assert most_frequent_answer([], preferred="red") == "red"


def test_dataset_skips_counts_and_reports(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    pixels = _write_png(good, 4)
    bad_jpeg = tmp_path / "bad.jpg"
    _write_truncated_jpeg(bad_jpeg)
    memory = Image.fromarray(_pixels(5))
    records = [
        Record(good, "a photo", image_id="g"),
        Record(memory, "in memory", image_id="m"),
        Record(lambda: Image.fromarray(_pixels(6)), "made", image_id="c"),
        Record(good, "blue", "what colour?", ["blue", "navy", "blue"], "g", "vqa"),
        Record(bad_jpeg, "broken", image_id="b"),
        Record(tmp_path / "gone.png", "missing", image_id="x"),
        Record(good, "   ", image_id="g"),
        Record(good, "no question", None, ["x"], "g", "vqa"),
    ]
    dataset = ImageTextDataset(records, name="mixed", split="validation", skipped={"malformed row": 1})
    assert len(dataset) == 5
    assert dataset.tasks == {"caption", "vqa"}
    assert dataset.report() == "skipped 4 of 9 samples: 1 malformed row, 1 missing image, 1 empty text, 1 empty question"
    first = dataset[0]
    assert isinstance(first, Sample)
    assert np.array_equal(np.asarray(first.image), pixels)
    assert (first.text, first.question, first.task, first.image_id) == ("a photo", None, "caption", "g")
    assert dataset[1].image is memory
    assert np.array_equal(np.asarray(dataset[2].image), _pixels(6))
    vqa = dataset[3]
    assert (vqa.question, vqa.answers, vqa.task) == ("what colour?", ["blue", "navy", "blue"], "vqa")
    assert dataset[4] is None
    assert dataset[4] is None
    assert dataset.skipped["corrupt image"] == 1
    assert dataset.report().startswith("skipped 5 of 9 samples: ")
    assert "1 corrupt image" in dataset.report()


def test_dataset_mostly_bad_or_empty_raises_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    _write_png(good, 0)
    records = [Record(good, "ok")] + [Record(tmp_path / f"m{i}.png", "gone") for i in range(2)]
    with pytest.raises(DataError) as excinfo:
        ImageTextDataset(records, name="broken")
    _one_line_error(excinfo, "broken", "2 of 3", "missing image")
    with pytest.raises(DataError) as excinfo:
        ImageTextDataset([], name="nothing")
    _one_line_error(excinfo, "nothing", "no usable samples")
    assert len(ImageTextDataset(records[:2], name="half")) == 1


# --------------------------------------------------------------------------- imagefolder


def _imagefolder(root: Path) -> dict[str, np.ndarray]:
    pixels = {name: _write_png(root / name, i) for i, name in enumerate(["a.png", "sub/b.png", "c.png"])}
    _write_truncated_jpeg(root / "cut.jpg")
    (root / "fake.jpg").write_text("not an image")
    rows = [
        {"file_name": "a.png", "text": "a red apple"},
        {"file_name": "sub/b.png", "caption": ["a cat", "a small cat"]},
        {"file_name": "c.png", "question": "how many?", "answers": ["2", "3", "2"]},
        {"file_name": "cut.jpg", "text": "truncated"},
        {"file_name": "fake.jpg", "text": "text file"},
        {"file_name": "missing.png", "text": "no file"},
        {"file_name": "a.png", "text": ""},
        {"text": "no file name"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return pixels


def test_imagefolder_jsonl(tmp_path: Path) -> None:
    pixels = _imagefolder(tmp_path)
    dataset = registries().datasets.create(str(tmp_path))
    assert dataset.report() == "skipped 4 of 10 samples: 2 malformed row, 1 missing image, 1 empty text"
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s.text if s else None for s in samples] == ["a red apple", "a cat", "a small cat", "2", None, None]
    assert samples[1].image_id == samples[2].image_id == "sub/b.png"
    assert np.array_equal(np.asarray(samples[1].image), pixels["sub/b.png"])
    assert (samples[3].task, samples[3].question, samples[3].answers) == ("vqa", "how many?", ["2", "3", "2"])
    assert dataset.skipped["corrupt image"] == 2
    assert dataset.report().startswith("skipped 6 of 10 samples")
    same = registries().datasets.create(f"imagefolder:{tmp_path}", split="train")
    assert len(same) == len(dataset)


def test_imagefolder_csv_and_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i, name in enumerate(["x.png", "y.png", "z.png"]):
        _write_png(root / "validation" / name, i)
    with (root / "validation" / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([["x.png", "first"], ["y.png", ""], ["z.png", "third"], ["w.png"]])
    dataset = registries().datasets.create(str(root / "validation" / ".."), split="validation")
    assert [dataset[i].text for i in range(len(dataset))] == ["first", "third"]
    assert dataset.report() == "skipped 2 of 4 samples: 2 empty text"
    (root / "validation" / "metadata.csv").write_text("path,text\nx.png,hi\n")
    with pytest.raises(DataError) as excinfo:
        registries().datasets.create(f"imagefolder:{root}", split="validation")
    _one_line_error(excinfo, "metadata.csv", "file_name")


def test_imagefolder_mostly_bad_raises(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", 0)
    rows = [{"file_name": "a.png", "text": "ok"}] + [{"file_name": f"m{i}.png", "text": "gone"} for i in range(3)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as excinfo:
        registries().datasets.create(str(tmp_path))
    _one_line_error(excinfo, "3 of 4", "missing image")


# --------------------------------------------------------------------------- COCO


def _coco(root: Path) -> Path:
    for i in (1, 2):
        _write_png(root / "images" / f"{i:012d}.png", i)
    data = {
        "info": {},
        "images": [{"id": 1, "file_name": f"{1:012d}.png"}, {"id": 2, "file_name": f"{2:012d}.png"}, {"id": 3, "file_name": "gone.png"}, {"id": 4}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A dog runs. "},
            {"id": 11, "image_id": 1, "caption": "a dog on grass"},
            {"id": 12, "image_id": 2, "caption": "a boat"},
            {"id": 13, "image_id": 3, "caption": "lost"},
            {"id": 14, "image_id": 99, "caption": "orphan"},
        ],
    }
    path = root / "annotations" / "captions_val2014.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_coco_captions(tmp_path: Path) -> None:
    path = _coco(tmp_path)
    dataset = registries().datasets.create(str(path), image_dir=str(tmp_path / "images"), split="validation")
    assert [(s.text, s.image_id) for s in (dataset[i] for i in range(len(dataset)))] == [
        ("A dog runs.", "1"),
        ("a dog on grass", "1"),
        ("a boat", "2"),
    ]
    assert np.array_equal(np.asarray(dataset[2].image), _pixels(2))
    assert dataset.report() == "skipped 3 of 6 samples: 2 malformed row, 1 missing image"
    assert registries().datasets.resolve(str(path)).entry.name == "coco:"


def test_coco_malformed_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [}')
    with pytest.raises(DataError) as excinfo:
        registries().datasets.create(f"coco:{bad}")
    _one_line_error(excinfo, "broken.json", "not valid JSON")
    keys = tmp_path / "nokeys.json"
    keys.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError) as excinfo:
        registries().datasets.create(f"coco:{keys}")
    _one_line_error(excinfo, "nokeys.json", "annotations")


# --------------------------------------------------------------------------- VQA v2


def test_vqav2_official_files(tmp_path: Path) -> None:
    for image_id in (42, 7):
        _write_png(tmp_path / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", image_id)
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"question_id": 420, "image_id": 42, "question": "What color is the bus?"},
            {"question_id": 421, "image_id": 42, "question": "Is it raining?"},
            {"question_id": 70, "image_id": 7, "question": "How many dogs?"},
            {"question_id": 71, "image_id": 5, "question": "Where is the file?"},
            {"question_id": 72, "image_id": 7},
        ],
    }
    answers = {
        "annotations": [
            {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red", "answer_type": "other",
             "answers": [{"answer": a} for a in ["red", "red", "orange", "red", "maroon"]]},
            {"question_id": 421, "image_id": 42, "multiple_choice_answer": "no",
             "answers": [{"answer": a} for a in ["yes", "no", "no", "yes"]]},
            {"question_id": 70, "image_id": 7, "multiple_choice_answer": "2",
             "answers": [{"answer": a} for a in ["2", "3", "3", "3"]]},
            {"question_id": 71, "image_id": 5, "answers": [{"answer": "here"}]},
        ]
    }
    qpath = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    qpath.write_text(json.dumps(questions))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(answers))
    dataset = registries().datasets.create(str(qpath), split="validation")
    assert registries().datasets.resolve(str(qpath)).entry.name == "vqav2:"
    got = [(s.question, s.text, s.image_id, s.task) for s in (dataset[i] for i in range(len(dataset)))]
    assert got == [
        ("What color is the bus?", "red", "42", "vqa"),
        ("Is it raining?", "no", "42", "vqa"),
        ("How many dogs?", "3", "7", "vqa"),
    ]
    assert dataset[0].answers == ["red", "red", "orange", "red", "maroon"]
    assert dataset[0].meta == {"question_id": 420, "answer_type": "other"}
    assert np.array_equal(np.asarray(dataset[2].image), _pixels(7))
    assert dataset.report() == "skipped 2 of 5 samples: 1 malformed row, 1 missing image"
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(DataError) as excinfo:
        registries().datasets.create(f"vqav2:{qpath}")
    _one_line_error(excinfo, qpath.name, "annotations=")


# --------------------------------------------------------------------------- hf:


def test_hf_save_to_disk_and_local_imagefolder(tmp_path: Path) -> None:
    import datasets

    arrays = [_pixels(i) for i in range(4)]
    table = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(a) for a in arrays],
            "text": ["zero", "one", "", "three"],
            "image_id": [100, 101, 102, 103],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string"), "image_id": datasets.Value("int64")}
        ),
    )
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": table, "test": table.select([0, 1])}).save_to_disk(str(saved))
    dataset = registries().datasets.create(str(saved))
    assert dataset.name == f"hf:{saved}"
    assert [dataset[i].text for i in range(len(dataset))] == ["zero", "one", "three"]
    assert [dataset[i].image_id for i in range(len(dataset))] == ["100", "101", "103"]
    assert np.array_equal(np.asarray(dataset[2].image.convert("RGB")), arrays[3])
    assert dataset.report() == "skipped 1 of 4 samples: 1 empty text"
    assert len(registries().datasets.create(f"hf:{saved}", split="test")) == 2
    with pytest.raises(DataError, match="no split 'validation'"):
        registries().datasets.create(f"hf:{saved}", split="validation")

    folder = tmp_path / "folder"
    for i in range(3):
        _write_png(folder / f"{i}.png", 10 + i)
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "question": f"q{i}?", "answers": ["x", "y", "y"]}) for i in range(3))
    )
    vqa = registries().datasets.create(f"hf:{folder}")
    sample = vqa[1]
    assert (sample.task, sample.question, sample.text, sample.answers) == ("vqa", "q1?", "y", ["x", "y", "y"])
    assert np.array_equal(np.asarray(sample.image.convert("RGB")), _pixels(11))


def test_hf_offline_without_cache_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    with pytest.raises(DataError) as excinfo:
        registries().datasets.create("hf:nobody/no-such-dataset")
    _one_line_error(excinfo, "nobody/no-such-dataset", "save_to_disk")


def test_hf_missing_column_names_the_columns(tmp_path: Path) -> None:
    import datasets

    saved = tmp_path / "plain"
    datasets.Dataset.from_dict({"picture": ["a.png"], "caption": ["hi"]}).save_to_disk(str(saved))
    with pytest.raises(DataError) as excinfo:
        registries().datasets.create(f"hf:{saved}")
    _one_line_error(excinfo, "image_column", "picture, caption")
