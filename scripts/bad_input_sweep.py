"""The bad-input sweep: odd and broken inputs fed to blipkit end to end, through its CLI and ``blipkit.load``.

Every case writes its input into a fresh folder, names the command to run on it and says what must come of
it: ``handled`` (an odd but valid input works: exit 0), ``skipped`` (a bad sample or image among good ones
is named or counted on stderr, every good one still gives its result) or ``error`` (exactly one line on
stderr, ``Error: ...``, that names the file, row or key, with exit code 1 or 2). Never a traceback, a
Python exception's name, a hang, or a good input lost.

Run it against the CLI (a process per case)::

    python scripts/bad_input_sweep.py            # prints one line per case, then "N/M cases handled"
    python scripts/bad_input_sweep.py -k image   # only the cases whose name contains "image"

tests/test_bad_inputs.py imports ``CASES`` and ``check`` from here and runs the same cases in-process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from textwrap import dedent

HANDLED, SKIPPED, ERROR = "handled", "skipped", "error"

# A Python exception's name in what a user reads means an exception escaped blipkit's own messages.
_EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]+(Error|Exception)\b")

_LOAD_SNIPPET = dedent(
    """
    import sys
    import blipkit
    from blipkit.errors import BlipkitError
    try:
        model = blipkit.load(sys.argv[1])
    except BlipkitError as err:
        print("Error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(err.exit_code)
    print(f"loaded {type(model).__name__}")
    """
)


@dataclass(frozen=True)
class Expect:
    """What must come of a case: its outcome, exit code, and fragments that stderr and stdout must contain."""

    outcome: str
    exit_code: int = 0
    stderr: str = ""
    stdout: str = ""


@dataclass
class Invocation:
    """What a case runs: ``blipkit ARGS`` (or ``blipkit.load(ARGS[0])`` with ``load``), with extra
    environment, a folder of plugins to import from, and files that must not exist afterwards."""

    args: list[str]
    load: bool = False
    env: dict[str, str] = field(default_factory=dict)
    site: Path | None = None
    must_not_exist: list[Path] = field(default_factory=list)


@dataclass
class Workspace:
    """A case's empty folder, and a trained tiny run that cases read (and copy before damaging)."""

    root: Path
    model: Path

    def run_copy(self) -> tuple[Path, Path]:
        """A copy of the trained run, and its current checkpoint folder in that copy."""
        run = self.root / "run"
        shutil.copytree(self.model, run)
        return run, run / json.loads((run / "blipkit.json").read_text())["checkpoint"]


@dataclass(frozen=True)
class Case:
    """One bad input: ``build`` writes it into a Workspace and says what to run; ``expect`` what must happen.

    ``isolate``: run it in a process of its own even in the tests (a hang guard, or plugin state that one
    process keeps).
    """

    name: str
    build: Callable[[Workspace], Invocation]
    expect: Expect
    isolate: bool = False


@dataclass
class Result:
    """What a case did."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False


def check(case: Case, invocation: Invocation, result: Result) -> list[str]:
    """What is wrong with ``result`` for ``case`` (an empty list: handled as expected)."""
    expect = case.expect
    if result.timed_out:
        return ["it hung (timed out)"]
    problems: list[str] = []
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    if "Traceback" in result.stderr:
        problems.append("a traceback on stderr")
    elif _EXCEPTION_NAME.search(result.stderr):
        problems.append(f"a Python exception's name on stderr: {_EXCEPTION_NAME.search(result.stderr).group(0)}")
    if result.exit_code != expect.exit_code:
        problems.append(f"exit code {result.exit_code}, expected {expect.exit_code}")
    if expect.outcome == ERROR:
        if len(errors) != 1 or not errors[0].startswith("Error: "):
            problems.append(f"expected one 'Error: ' line on stderr, got {len(errors)}")
        elif expect.stderr not in errors[0]:
            problems.append(f"the error does not mention {expect.stderr!r}")
    elif len(errors) > (1 if expect.outcome == SKIPPED else 0):
        problems.append(f"{len(errors)} 'Error' lines on stderr")
    if expect.outcome != ERROR and expect.stderr not in result.stderr:
        problems.append(f"stderr does not mention {expect.stderr!r}")
    if expect.stdout not in result.stdout:
        problems.append(f"stdout does not show {expect.stdout!r}")
    problems += [f"{path.name} was created (something was unpickled or executed)" for path in invocation.must_not_exist if path.exists()]
    return problems


# --------------------------------------------------------------------------- writing the inputs


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8), color: object = (200, 40, 40), **save: object) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb, without the bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 25)) + chunk(b"IEND", b""))
    return path


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG whose header is whole but whose pixel data stops half way."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG", quality=95)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 3 // 5])
    return path


def _animated_gif(path: Path) -> Path:
    from PIL import Image

    frames = [Image.new("P", (8, 8), index) for index in (10, 20, 30)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return path


def _rotated_jpeg(path: Path) -> Path:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 270 degrees to view
    Image.new("RGB", (12, 6), (10, 120, 200)).save(path, exif=exif)
    return path


def _caption(ws: Workspace, *inputs: Path | str) -> Invocation:
    args = ["caption", *map(str, inputs), "--model", str(ws.model), "--beams", "1", "--max-new-tokens", "3", "--quiet"]
    return Invocation(args)


def _odd_image(write: Callable[[Path], object], name: str) -> Callable[[Workspace], Invocation]:
    """Caption one odd but valid image alone."""

    def build(ws: Workspace) -> Invocation:
        write(ws.root / name)
        return _caption(ws, ws.root / name)

    return build


def _bad_beside_good(write: Callable[[Path], object], name: str) -> Callable[[Workspace], Invocation]:
    """Caption a folder holding one good image and one bad one."""

    def build(ws: Workspace) -> Invocation:
        folder = ws.root / "photos"
        _image(folder / "good.png")
        write(folder / name)
        return _caption(ws, folder)

    return build


def _bad_alone(write: Callable[[Path], object], name: str) -> Callable[[Workspace], Invocation]:
    """Caption one bad image, the command's only input."""

    def build(ws: Workspace) -> Invocation:
        write(ws.root / name)
        return _caption(ws, ws.root / name)

    return build


def _symlink_loop(path: Path) -> None:
    partner = path.with_name("partner.lnk")
    path.symlink_to(partner.name)
    partner.symlink_to(path.name)


def _image_cases() -> list[Case]:
    handled = [
        ("rgba", "rgba.png", lambda p: _image(p, "RGBA", color=(200, 40, 40, 90))),
        ("la", "la.png", lambda p: _image(p, "LA", color=(90, 128))),
        ("16-bit grayscale", "gray16.png", lambda p: _image(p, "I;16", color=40000)),
        ("palette with transparency", "palette.png", lambda p: _image(p, "P", color=3, transparency=3)),
        ("cmyk jpeg", "cmyk.jpg", lambda p: _image(p, "CMYK", color=(0, 90, 200, 10))),
        ("1x1 pixel", "dot.png", lambda p: _image(p, size=(1, 1))),
        ("8 x 2560", "strip.png", lambda p: _image(p, size=(8, 2560))),
        ("animated gif", "anim.gif", _animated_gif),
        ("exif rotation", "rotated.jpg", _rotated_jpeg),
        ("webp", "photo.webp", lambda p: _image(p, format="WEBP")),
        ("png bytes named .jpg", "really-png.jpg", lambda p: _image(p, format="PNG")),
    ]
    cases = [Case(f"image: {label}", _odd_image(write, name), Expect(HANDLED, 0, stdout=f"{name}: ")) for label, name, write in handled]

    def upper_case_extension(ws: Workspace) -> Invocation:
        _image(ws.root / "photos" / "HOLIDAY.JPG", format="JPEG")
        return _caption(ws, ws.root / "photos")

    cases.append(Case("image: upper-case extension in a folder", upper_case_extension, Expect(HANDLED, 0, stdout="HOLIDAY.JPG: ")))
    skipped = [
        ("empty file", "empty.png", lambda p: p.write_bytes(b"")),
        ("truncated jpeg", "cut.jpg", _truncated_jpeg),
        ("random bytes", "noise.png", lambda p: p.write_bytes(os.urandom(512))),
        ("symlink loop", "loop.png", _symlink_loop),
        ("text named .png", "notes.png", lambda p: p.write_text("not a picture\n")),
    ]
    cases += [
        Case(f"image: {label} beside a good one", _bad_beside_good(write, name), Expect(SKIPPED, 1, stderr=name, stdout="good.png: "))
        for label, name, write in skipped
    ]
    alone = [
        ("text named .png", "notes.png", lambda p: p.write_text("not a picture\n"), "not an image"),
        ("truncated jpeg", "cut.jpg", _truncated_jpeg, "cut.jpg"),
        ("decompression bomb 100000 x 100000", "bomb.png", lambda p: _png_header(p, 100_000, 100_000), "too large"),
        ("decompression bomb 15000 x 15000 (PIL only warns)", "bomb.png", lambda p: _png_header(p, 15_000, 15_000), "too large"),
        ("symlink loop", "loop.png", _symlink_loop, "loop.png"),
    ]
    cases += [
        Case(f"image: {label} alone", _bad_alone(write, name), Expect(ERROR, 1, stderr=fragment))
        for label, name, write, fragment in alone
    ]

    def directory_named_jpg(ws: Workspace) -> Invocation:
        (ws.root / "x.jpg").mkdir()
        return _caption(ws, _image(ws.root / "good.png"), ws.root / "x.jpg")

    def missing_path(ws: Workspace) -> Invocation:
        return _caption(ws, _image(ws.root / "good.png"), ws.root / "nowhere.png")

    def missing_alone(ws: Workspace) -> Invocation:
        return _caption(ws, ws.root / "nowhere.png")

    def named_pipe(ws: Workspace) -> Invocation:
        os.mkfifo(ws.root / "pipe.png")
        return _caption(ws, ws.root / "pipe.png", _image(ws.root / "good.png"))

    def retrieve_among_bad(ws: Workspace) -> Invocation:
        folder = ws.root / "photos"
        for name in ("a.png", "b.png"):
            _image(folder / name)
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
        return Invocation(["retrieve", "--model", str(ws.model), "--images", str(folder), "--text", "a red square", "--json"])

    def ask_bad(ws: Workspace) -> Invocation:
        (ws.root / "noise.jpg").write_bytes(os.urandom(300))
        return Invocation(["ask", str(ws.root / "noise.jpg"), "what colour?", "--model", str(ws.model)])

    def attention_truncated(ws: Workspace) -> Invocation:
        image = _truncated_jpeg(ws.root / "cut.jpg")
        return Invocation(["attention", str(image), "--model", str(ws.model), "--out", str(ws.root / "heat.png")])

    def ask_long_question(ws: Workspace) -> Invocation:
        return Invocation(["ask", str(_image(ws.root / "good.png")), "why " * 25_000, "--model", str(ws.model), "--json"])

    return cases + [
        Case("image: a directory named x.jpg beside a good image", directory_named_jpg, Expect(SKIPPED, 1, stderr="x.jpg", stdout="good.png: ")),
        Case("image: a missing path beside a good image", missing_path, Expect(SKIPPED, 1, stderr="nowhere.png", stdout="good.png: ")),
        Case("image: a missing path alone", missing_alone, Expect(ERROR, 1, stderr="nowhere.png")),
        Case("image: a named pipe called pipe.png (never read: no hang)", named_pipe, Expect(SKIPPED, 1, stderr="pipe.png", stdout="good.png: "), isolate=True),
        Case("image: retrieve over a folder with a corrupt image", retrieve_among_bad, Expect(SKIPPED, 1, stderr="broken.png", stdout='"score"')),
        Case("image: ask about random bytes", ask_bad, Expect(ERROR, 1, stderr="noise.jpg")),
        Case("image: attention over a truncated jpeg", attention_truncated, Expect(ERROR, 1, stderr="cut.jpg")),
        Case("text: ask a 100,000-character question", ask_long_question, Expect(HANDLED, 0, stdout='"answer"')),
        Case("text: ask an empty question", lambda ws: Invocation(["ask", str(_image(ws.root / "good.png")), "", "--model", str(ws.model), "--json"]),
             Expect(HANDLED, 0, stdout='"answer"')),
    ]


# --------------------------------------------------------------------------- caption and VQA files


def _rows(count: int = 6) -> list[dict[str, object]]:
    return [{"file_name": f"{index}.png", "text": f"a red square number {index}"} for index in range(count)]


def _folder(ws: Workspace, rows: list[dict[str, object]], extra: bytes = b"", name: str = "metadata.jsonl") -> Path:
    """An image folder: 6 images, ``rows`` as JSON lines, then ``extra`` bytes as they are."""
    folder = ws.root / "data"
    for index in range(6):
        _image(folder / f"{index}.png", color=(40 * index, 30, 30))
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    (folder / name).write_bytes(lines + extra)
    return folder


def _eval(ws: Workspace, data: str, task: str = "caption") -> Invocation:
    args = ["eval", "--model", str(ws.model), "--task", task, "--data", data, "--beams", "1", "-o", str(ws.root / "eval"), "-q"]
    return Invocation(args)


def _train(ws: Workspace, data: str, *overrides: str) -> Invocation:
    args = ["train", "tiny", f"data.train.name={data}", "~data.train.options", "data.batch_size=4", "stage1.steps=1",
            "stage2.steps=1", *overrides, "-o", str(ws.root / "trained"), "-q"]
    return Invocation(args)


def _eval_rows(rows: list[dict[str, object]], extra: bytes = b"") -> Callable[[Workspace], Invocation]:
    return lambda ws: _eval(ws, str(_folder(ws, rows, extra)))


def _coco(ws: Workspace, annotations: list[dict[str, object]]) -> Path:
    folder = ws.root / "coco"
    for index in range(4):
        _image(folder / f"{index}.png", color=(50 * index, 30, 30))
    data = {"images": [{"id": index, "file_name": f"{index}.png"} for index in range(4)], "annotations": annotations}
    (folder / "captions.json").write_text(json.dumps(data))
    return folder / "captions.json"


def _vqa(ws: Workspace, orphan: bool = False, unanswered: bool = False) -> Path:
    """VQA v2 files: 4 answered questions, plus an answer whose question is missing, or a question without answers."""
    folder = ws.root / "vqa"
    for index in range(4):
        _image(folder / f"COCO_val2014_{index:012d}.jpg", color=(50 * index, 30, 30), format="JPEG")
    questions = [{"question_id": index, "image_id": index, "question": f"what colour is shape {index}?"} for index in range(4)]
    answers = [{"question_id": index, "image_id": index, "multiple_choice_answer": "red",
                "answers": [{"answer": "red"}] * 10} for index in range(4)]
    if orphan:
        answers.append({"question_id": 99, "image_id": 1, "multiple_choice_answer": "blue", "answers": [{"answer": "blue"}]})
    if unanswered:
        questions.append({"question_id": 50, "image_id": 2, "question": "how many?"})
    (folder / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"data_subtype": "val2014", "questions": questions}))
    (folder / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": answers}))
    return folder / "v2_OpenEnded_mscoco_val2014_questions.json"


def _data_cases() -> list[Case]:
    good = _rows(5)
    cases = [
        Case("data: a row without its text field", _eval_rows([*good, {"file_name": "5.png"}]), Expect(SKIPPED, 0, stderr="1 empty text", stdout="CIDEr")),
        Case("data: a row without file_name", _eval_rows([*good, {"text": "a caption"}]), Expect(SKIPPED, 0, stderr="1 malformed row", stdout="CIDEr")),
        Case("data: an invalid JSON line", _eval_rows(good, b'{"file_name": "5.png", "text": "cut\n'), Expect(SKIPPED, 0, stderr="1 malformed row", stdout="CIDEr")),
        Case("data: a line that is not UTF-8", _eval_rows(good, b'{"file_name": "5.png", "text": "caf\xe9"}\n'), Expect(SKIPPED, 0, stderr="1 row not UTF-8", stdout="CIDEr")),
        Case("data: empty text", _eval_rows([*good, {"file_name": "5.png", "text": "   "}]), Expect(SKIPPED, 0, stderr="1 empty text", stdout="CIDEr")),
        Case("data: a missing image", _eval_rows([*good, {"file_name": "gone.png", "text": "lost"}]), Expect(SKIPPED, 0, stderr="1 missing image", stdout="CIDEr")),
    ]

    def corrupt_image(ws: Workspace) -> Invocation:
        folder = _folder(ws, _rows(6))
        (folder / "5.png").write_bytes(b"not a png")
        return _eval(ws, str(folder))

    def all_bad(ws: Workspace) -> Invocation:
        return _eval(ws, str(_folder(ws, [{"file_name": f"gone{index}.png", "text": "x"} for index in range(4)])))

    def mostly_bad(ws: Workspace) -> Invocation:
        rows = _rows(2) + [{"file_name": f"gone{index}.png", "text": "x"} for index in range(4)]
        return _eval(ws, str(_folder(ws, rows)))

    def csv_not_utf8(ws: Workspace) -> Invocation:
        text = "file_name,text\n" + "".join(f"{index}.png,a red square {index}\n" for index in range(5))
        folder = _folder(ws, [], text.encode() + "5.png,caf\u00e9 au lait\n".encode("latin-1"), name="metadata.csv")
        return _eval(ws, str(folder))

    def coco_unknown_image(ws: Workspace) -> Invocation:
        annotations = [{"image_id": index, "caption": f"shape {index}"} for index in range(4)] + [{"image_id": 77, "caption": "ghost"}]
        return _eval(ws, f"coco:{_coco(ws, annotations)}")

    def coco_truncated(ws: Workspace) -> Invocation:
        path = _coco(ws, [{"image_id": index, "caption": f"shape {index}"} for index in range(4)])
        path.write_text(path.read_text()[:60])
        return _eval(ws, f"coco:{path}")

    def coco_truncated_bare(ws: Workspace) -> Invocation:
        path = _coco(ws, [{"image_id": index, "caption": f"shape {index}"} for index in range(4)])
        path.write_text(path.read_text()[:60])
        return _eval(ws, str(path))

    def cache_bad_rows(ws: Workspace) -> Invocation:
        folder = _folder(ws, _rows(6), b"{broken\n")
        (folder / "5.png").write_bytes(b"not a png")
        return Invocation(["cache", "tiny", f"data.train.name={folder}", "~data.train.options", "-q"])

    def cache_all_bad(ws: Workspace) -> Invocation:
        folder = _folder(ws, [{"file_name": f"gone{index}.png", "text": "x"} for index in range(4)])
        return Invocation(["cache", "tiny", f"data.train.name={folder}", "~data.train.options", "-q"])

    def long_caption_train(ws: Workspace) -> Invocation:
        rows = _rows(6)
        rows[0]["text"] = "word " * 20_000
        return _train(ws, str(_folder(ws, rows)))

    def bad_rows_train(ws: Workspace) -> Invocation:
        return _train(ws, str(_folder(ws, _rows(5), b"{broken\n")))

    return cases + [
        Case("data: a corrupt image", corrupt_image, Expect(SKIPPED, 0, stderr="1 corrupt image", stdout="CIDEr")),
        Case("data: a file that is all bad", all_bad, Expect(ERROR, 1, stderr="no usable samples (4 missing image)")),
        Case("data: a file that is mostly bad", mostly_bad, Expect(ERROR, 1, stderr="4 of 6 samples are unusable")),
        Case("data: a CSV row that is not UTF-8", csv_not_utf8, Expect(SKIPPED, 0, stderr="1 row not UTF-8", stdout="CIDEr")),
        Case("data: COCO annotations pointing at an unknown image", coco_unknown_image, Expect(SKIPPED, 0, stderr="1 malformed row", stdout="CIDEr")),
        Case("data: truncated COCO JSON", coco_truncated, Expect(ERROR, 1, stderr="captions.json is not valid JSON")),
        Case("data: truncated COCO JSON given as a bare path", coco_truncated_bare, Expect(ERROR, 1, stderr="no dataset format recognises it")),
        Case("data: VQA annotations without the question they answer", lambda ws: _eval(ws, f"vqav2:{_vqa(ws, orphan=True)}", "vqa"),
             Expect(SKIPPED, 0, stderr="1 answers to a question not in the questions file", stdout="accuracy")),
        Case("data: a VQA question without annotations", lambda ws: _eval(ws, f"vqav2:{_vqa(ws, unanswered=True)}", "vqa"),
             Expect(SKIPPED, 0, stderr="1 no answers", stdout="accuracy")),
        Case("data: cache skips and counts bad rows and images", cache_bad_rows, Expect(SKIPPED, 0, stderr="1 malformed row")),
        Case("data: cache over a file that is all bad", cache_all_bad, Expect(ERROR, 1, stderr="no usable samples")),
        Case("data: a 100,000-character caption (training truncates it)", long_caption_train, Expect(HANDLED, 0, stdout="Model saved")),
        Case("data: training skips and counts a malformed row", bad_rows_train, Expect(SKIPPED, 0, stdout="skipped samples: 1 malformed row")),
    ]


# --------------------------------------------------------------------------- recipes


def _recipe(text: str | bytes, command: str = "validate") -> Callable[[Workspace], Invocation]:
    """Validate (or train with) a recipe file holding ``text``."""

    def build(ws: Workspace) -> Invocation:
        path = ws.root / "recipe.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        if command == "train":
            return Invocation(["train", str(path), "-o", str(ws.root / "trained"), "-q"])
        return Invocation(["recipes", "validate", str(path)])

    return build


def _tiny(*overrides: str) -> Callable[[Workspace], Invocation]:
    """Validate the shipped tiny recipe with ``overrides``."""
    return lambda ws: Invocation(["recipes", "validate", "tiny", *overrides])


def _recipe_cases() -> list[Case]:
    error = [
        ("invalid YAML", _recipe("name: x\nstage1: [unclosed\n"), "recipe.yaml is not valid YAML"),
        ("YAML that is a list", _recipe("- a\n- b\n"), "a recipe is a YAML mapping"),
        ("an unknown top-level key", _tiny("bogus=1"), "bogus: unknown key"),
        ("an unknown key in a stage", _tiny("stage1.bogus=1"), "stage1.bogus: unknown key"),
        ("an unknown key in data.train", _tiny("data.train.bogus=1"), "data.train.bogus: unknown key"),
        ("an unknown encoder option", _tiny("encoder.options.bogus=1"), "encoder.options.bogus"),
        ("an unknown dataset option", _tiny("data.train.options.bogus=1"), "data.train.options.bogus"),
        ("an unknown objective option", _tiny("stage2.options.bogus=1"), "stage2.options.bogus"),
        ("steps of the wrong type", _tiny("stage1.steps=abc"), "stage1.steps: expected int"),
        ("a batch size of the wrong type", _tiny("data.batch_size=[1]"), "data.batch_size: expected int"),
        ("a stage that is a number", _tiny("stage1=5"), "stage1: expected a mapping"),
        ("lr zero", _tiny("stage1.lr=0"), "lr > 0"),
        ("lr negative", _tiny("stage1.lr=-1"), "lr > 0"),
        ("steps zero", _tiny("stage1.steps=0"), "stage1.steps: must be at least 1"),
        ("steps negative", _tiny("stage2.steps=-3"), "stage2.steps: must be at least 1"),
        ("steps NaN", _tiny("stage1.steps=.nan"), "stage1.steps: expected int"),
        ("batch size zero", _tiny("data.batch_size=0"), "data.batch_size: must be at least 1"),
        ("batch size negative", _tiny("data.batch_size=-4"), "data.batch_size: must be at least 1"),
        ("batch size NaN", _tiny("data.batch_size=.nan"), "data.batch_size: expected int"),
    ]
    error += [
        ("lr NaN", _tiny("stage1.lr=.nan"), "stage1: need 0 <= min_lr <= lr and lr > 0, both finite"),
        ("lr infinite", _tiny("stage1.lr=.inf"), "stage1: need 0 <= min_lr <= lr and lr > 0, both finite"),
        ("warmup longer than the stage", _tiny("stage1.warmup_steps=100"), "stage1.warmup_steps: must be at most the stage's"),
        ("warmup negative", _tiny("stage1.warmup_steps=-1"), "stage1.warmup_steps: must be at least 0"),
        ("a stage's batch size zero", _tiny("stage1.batch_size=0"), "stage1.batch_size: must be at least 1"),
        ("a recipe file that is not UTF-8", _recipe(b"name: caf\xe9\n"), "recipe.yaml is not UTF-8"),
    ]
    cases = [Case(f"recipe: {label}", build, Expect(ERROR, 2, stderr=fragment)) for label, build, fragment in error]
    return cases + [
        Case("recipe: train with invalid YAML", _recipe("name: [x\n", command="train"), Expect(ERROR, 2, stderr="recipe.yaml is not valid YAML")),
    ]


# --------------------------------------------------------------------------- run directories


def _damaged_run(damage: Callable[[Path, Path], object], load: bool = False) -> Callable[[Workspace], Invocation]:
    """Caption a good image with (or ``blipkit.load``) a copy of the trained run that ``damage(run, checkpoint)`` broke."""

    def build(ws: Workspace) -> Invocation:
        run, checkpoint = ws.run_copy()
        damage(run, checkpoint)
        if load:
            return Invocation([str(run)], load=True)
        return Invocation(["caption", str(_image(ws.root / "good.png")), "--model", str(run), "--beams", "1", "--quiet"])

    return build


def _edit_json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


class _Planted:
    """Unpickling this creates the file it names: proof that a pickle was opened."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _plant_pickles(ws: Workspace, run: Path, checkpoint: Path) -> Path:
    marker = ws.root / "UNPICKLED"
    payload = pickle.dumps(_Planted(marker))
    for name in ("bridge/pytorch_model.bin", "projection/pytorch_model.bin", "pytorch_model.bin", "trainer_state/optimizer.pt"):
        (checkpoint / name).write_bytes(payload)
    (run / "training_args.bin").write_bytes(payload)
    return marker


def _run_cases() -> list[Case]:
    def noise(path: Path) -> None:
        path.write_bytes(os.urandom(300))

    damages: list[tuple[str, Callable[[Path, Path], object], int, str]] = [
        ("corrupt bridge safetensors", lambda run, ck: noise(ck / "bridge" / "model.safetensors"), 1, "not a readable safetensors"),
        ("truncated projection safetensors", lambda run, ck: _truncate(ck / "projection" / "model.safetensors", 100), 1, "projection/model.safetensors"),
        ("bridge config.json shapes that do not match the weights",
         lambda run, ck: _edit_json(ck / "bridge" / "config.json", lambda c: c.update(num_queries=5)), 1, "do not fit together"),
        ("projection config.json shapes that do not match the weights",
         lambda run, ck: _edit_json(ck / "projection" / "config.json", lambda c: c.update(output_dim=48)), 1, "do not fit together"),
        ("a bridge config.json that is not JSON", lambda run, ck: (ck / "bridge" / "config.json").write_text("{oops"), 1, "bridge/config.json"),
        ("a missing bridge model.safetensors", lambda run, ck: (ck / "bridge" / "model.safetensors").unlink(), 1, "model.safetensors does not exist"),
        ("a missing blipkit.json", lambda run, ck: (run / "blipkit.json").unlink(), 1, "not a blipkit run directory"),
        ("a missing checkpoint folder", lambda run, ck: shutil.rmtree(ck), 1, "is missing from the run directory"),
        ("a blipkit.json that is not JSON", lambda run, ck: (run / "blipkit.json").write_text("{"), 1, "blipkit.json is not valid JSON"),
        ("a blipkit.json without a recipe", lambda run, ck: (run / "blipkit.json").write_text("{}"), 1, "blipkit.json does not describe a run"),
        ("a blipkit.json with an unknown recipe key",
         lambda run, ck: _edit_json(run / "blipkit.json", lambda m: m["recipe"].update(bogus=1)), 2, "blipkit.json: bogus: unknown key"),
        ("a blipkit.json whose checkpoint is an absolute path elsewhere",
         lambda run, ck: _edit_json(run / "blipkit.json", lambda m: m.update(checkpoint=str(ck))), 1, "points outside the run directory"),
        ("a blipkit.json whose checkpoint climbs out with ..",
         lambda run, ck: _edit_json(run / "blipkit.json", lambda m: m.update(checkpoint="../elsewhere/" + m["checkpoint"])), 1,
         "points outside the run directory"),
    ]
    cases = [Case(f"run: {label}", _damaged_run(damage), Expect(ERROR, code, stderr=fragment)) for label, damage, code, fragment in damages]
    cases += [
        Case(f"run: blipkit.load with {label}", _damaged_run(damage, load=True), Expect(ERROR, code, stderr=fragment))
        for label, damage, code, fragment in damages[::4]
    ]

    def pickles_beside_weights(ws: Workspace) -> Invocation:
        run, checkpoint = ws.run_copy()
        marker = _plant_pickles(ws, run, checkpoint)
        invocation = Invocation(["caption", str(_image(ws.root / "good.png")), "--model", str(run), "--beams", "1", "--quiet"])
        invocation.must_not_exist.append(marker)
        return invocation

    def pickles_instead_of_weights(ws: Workspace) -> Invocation:
        run, checkpoint = ws.run_copy()
        marker = _plant_pickles(ws, run, checkpoint)
        for part in ("bridge", "projection"):
            (checkpoint / part / "model.safetensors").unlink()
        return Invocation([str(run)], load=True, must_not_exist=[marker])

    def resume_outside(ws: Workspace) -> Invocation:
        run, checkpoint = ws.run_copy()
        _edit_json(run / "blipkit.json", lambda m: m.update(checkpoint=str(ws.model / m["checkpoint"])))
        return Invocation(["train", "--resume", str(run), "-q"])

    return cases + [
        Case("run: pickles planted beside the weights are never opened", pickles_beside_weights, Expect(HANDLED, 0, stdout="good.png: ")),
        Case("run: pickles planted instead of the weights are never opened", pickles_instead_of_weights,
             Expect(ERROR, 1, stderr="model.safetensors does not exist")),
        Case("run: --resume of a run whose checkpoint points outside it", resume_outside,
             Expect(ERROR, 1, stderr="points outside the run directory")),
    ]


# --------------------------------------------------------------------------- plugins and remote code


def _plugin(site: Path, module: str, source: str) -> None:
    """Install ``module`` into ``site`` as pip would, announced in the ``blipkit`` entry-point group."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(dedent(source))
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[blipkit]\n{module} = {module}\n")


_FAILS_AT_IMPORT = "raise RuntimeError('this plugin is broken')\n"
_FAILS_IN_HOOK = """
    from blipkit import hookimpl

    @hookimpl
    def register_encoders(register):
        raise ValueError('cannot register')
    """
_FAILS_WITH_A_BLIPKIT_ERROR = """
    from blipkit import hookimpl
    from blipkit.errors import ModelUnavailableError

    @hookimpl
    def register_datasets(register):
        raise ModelUnavailableError('needs the package foo')
    """
_WRONG_TYPES = """
    from blipkit import hookimpl

    @hookimpl
    def register_encoders(register):
        register('wrong-encoder', lambda **options: 'not an encoder')

    @hookimpl
    def register_language_models(register):
        register('wrong-llm', lambda **options: None)
    """
_FAILS_ADDING_COMMANDS = """
    from blipkit import hookimpl

    @hookimpl
    def register_commands(cli):
        raise KeyError('no commands today')
    """


def _with_plugin(module: str, source: str, args: Callable[[Workspace], list[str]]) -> Callable[[Workspace], Invocation]:
    def build(ws: Workspace) -> Invocation:
        _plugin(ws.root / "site", module, source)
        return Invocation(args(ws), site=ws.root / "site")

    return build


def _remote_code_model(folder: Path, marker: Path) -> Path:
    """A model folder whose config asks for its own Python code, which would create ``marker`` if run."""
    folder.mkdir(parents=True)
    auto_map = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "custom_xyz", "auto_map": auto_map, "vocab_size": 10,
                                                    "architectures": ["CustomForCausalLM"]}))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder


def _plugin_cases() -> list[Case]:
    def caption_good(ws: Workspace) -> list[str]:
        return ["caption", str(_image(ws.root / "good.png")), "--model", str(ws.model), "--beams", "1", "--quiet"]

    def train_with(*overrides: str) -> Callable[[Workspace], list[str]]:
        return lambda ws: ["train", "tiny", *overrides, "stage2.steps=1", "-o", str(ws.root / "trained"), "-q"]

    def remote(kind: str) -> Callable[[Workspace], Invocation]:
        def build(ws: Workspace) -> Invocation:
            marker = ws.root / "REMOTE_CODE_RAN"
            folder = _remote_code_model(ws.root / "model", marker)
            return Invocation([kind, f"hf:{folder}", "--load"], must_not_exist=[marker])

        return build

    return [
        Case("plugin: raises at import; the CLI still works", _with_plugin("bk_import_fails", _FAILS_AT_IMPORT, caption_good),
             Expect(HANDLED, 0, stdout="good.png: ")),
        Case("plugin: raises at import; blipkit plugins reports it", _with_plugin("bk_import_fails", _FAILS_AT_IMPORT, lambda ws: ["plugins", "--json"]),
             Expect(HANDLED, 0, stdout="RuntimeError: this plugin is broken")),
        Case("plugin: raises at import; an unknown name points at it",
             _with_plugin("bk_import_fails", _FAILS_AT_IMPORT, lambda ws: ["encoders", "its-encoder", "--json"]),
             Expect(ERROR, 2, stderr="Plugins that failed to load (blipkit plugins tells why): bk_import_fails")),
        Case("plugin: raises in its register hook; the others register", _with_plugin("bk_hook_fails", _FAILS_IN_HOOK, lambda ws: ["encoders", "--json"]),
             Expect(HANDLED, 0, stdout='"tiny-vit"')),
        Case("plugin: raises a blipkit error in its register hook; the CLI still works",
             _with_plugin("bk_hook_blipkit_error", _FAILS_WITH_A_BLIPKIT_ERROR, caption_good), Expect(HANDLED, 0, stdout="good.png: ")),
        Case("plugin: an encoder factory that returns the wrong type",
             _with_plugin("bk_wrong_types", _WRONG_TYPES, train_with("encoder.name=wrong-encoder")),
             Expect(ERROR, 1, stderr="plugin 'bk_wrong_types' gave a str, not a blipkit Encoder")),
        Case("plugin: a language model factory that returns the wrong type",
             _with_plugin("bk_wrong_types", _WRONG_TYPES, train_with("llm.name=wrong-llm", "~stage1")),
             Expect(ERROR, 1, stderr="plugin 'bk_wrong_types' gave a NoneType, not a blipkit LanguageModel")),
        Case("plugin: raises while adding its commands", _with_plugin("bk_commands_fail", _FAILS_ADDING_COMMANDS, lambda ws: ["--help"]),
             Expect(HANDLED, 0, stderr="plugin 'bk_commands_fail' could not add its commands", stdout="caption"), isolate=True),
        Case("remote code: hf: LLM with custom code is refused, not run", remote("llms"), Expect(ERROR, 2, stderr="trust_remote_code")),
        Case("remote code: hf: encoder with custom code is refused, not run", remote("encoders"), Expect(ERROR, 2, stderr="its own Python code")),
    ]


CASES: list[Case] = [*_image_cases(), *_data_cases(), *_recipe_cases(), *_run_cases(), *_plugin_cases()]


# --------------------------------------------------------------------------- running the cases


def base_env(cache: Path) -> dict[str, str]:
    """The environment of a case's process: offline hubs, a private blipkit cache, no tracebacks on request."""
    env = {k: v for k, v in os.environ.items() if k not in ("BLIPKIT_DEBUG", "BLIPKIT_LOAD_PLUGINS", "BLIPKIT_DISABLE_PLUGINS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               BLIPKIT_CACHE=str(cache))
    return env


def run_in_subprocess(invocation: Invocation, cache: Path, timeout: float = 180.0) -> Result:
    """Run ``invocation`` as a new process: ``python -m blipkit ...``, or a script calling ``blipkit.load``."""
    env = base_env(cache)
    env.update(invocation.env)
    if invocation.site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(invocation.site), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-c", _LOAD_SNIPPET, *invocation.args] if invocation.load else [sys.executable, "-m", "blipkit", *invocation.args]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        return Result(-1, str(err.stdout or ""), str(err.stderr or ""), timed_out=True)
    return Result(done.returncode, done.stdout, done.stderr)


def run_load_in_process(path: str) -> Result:
    """``blipkit.load(path)`` here: a BlipkitError becomes the CLI's one line, anything else a traceback."""
    import blipkit
    from blipkit.errors import BlipkitError

    try:
        model = blipkit.load(path)
    except BlipkitError as err:
        return Result(err.exit_code, "", "Error: " + " ".join(str(err).split()) + "\n")
    except Exception:
        return Result(1, "", traceback.format_exc())
    return Result(0, f"loaded {type(model).__name__}\n", "")


def train_model(directory: Path) -> Path:
    """Train the tiny recipe into ``directory`` (a few seconds) and return the run."""
    from blipkit.config import load_recipe
    from blipkit.train.runner import train

    run = directory / "model"
    train(load_recipe("tiny", ["stage1.steps=2", "stage2.steps=2"]), output=run, quiet=True)
    return run


def main(argv: list[str] | None = None) -> int:
    """Run the sweep against the CLI; exit status 0 only when every case was handled as expected."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", "--keyword", default="", help="Only the cases whose name contains this text.")
    parser.add_argument("--timeout", type=float, default=180.0, help="Seconds a case may take before it counts as a hang.")
    options = parser.parse_args(argv)
    cases = [case for case in CASES if options.keyword.lower() in case.name.lower()]
    with tempfile.TemporaryDirectory(prefix="blipkit-sweep-") as tmp:
        root = Path(tmp)
        cache = root / "cache"
        os.environ.update(base_env(cache))
        print(f"training the tiny model the cases use in {root} ...", flush=True)
        model = train_model(root)
        handled = 0
        for number, case in enumerate(cases):
            workspace = Workspace(root / f"case-{number:03d}", model)
            workspace.root.mkdir()
            started = time.monotonic()
            invocation = case.build(workspace)
            problems = check(case, invocation, run_in_subprocess(invocation, cache, options.timeout))
            took = f"{time.monotonic() - started:5.1f}s"
            if not problems:
                handled += 1
                print(f"handled  {took}  {case.name}", flush=True)
            else:
                print(f"FAILED   {took}  {case.name}: {'; '.join(problems)}", flush=True)
    print(f"{handled}/{len(cases)} cases handled")
    return 0 if handled == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
