"""The bad-input sweep (scripts/bad_input_sweep.py), one test per case, run in-process through the CLI."""

from __future__ import annotations

import os
import resource
import sys
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

from blipkit import plugin_manager
from blipkit.cli import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bad_input_sweep as sweep  # noqa: E402

_OPENED: list[str] | None = None
"""Every path opened while a test collects them (see ``_record_opens``)."""


def _record_opens(event: str, args: tuple[object, ...]) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLIPKIT_CACHE", str(root / "cache"))
        return sweep.train_model(root)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))


def _in_process(invocation: sweep.Invocation, monkeypatch: pytest.MonkeyPatch) -> sweep.Result:
    if invocation.site is not None:
        monkeypatch.syspath_prepend(str(invocation.site))
        plugin_manager.reset()
    if invocation.load:
        return sweep.run_load_in_process(invocation.args[0])
    result = CliRunner().invoke(cli, invocation.args, env=invocation.env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return sweep.Result(result.exit_code, result.stdout, stderr)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in sweep.CASES])
def test_bad_input(case: sweep.Case, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workspace = sweep.Workspace(tmp_path / "case", model)
    workspace.root.mkdir()
    invocation = case.build(workspace)
    if case.isolate:
        result = sweep.run_in_subprocess(invocation, tmp_path / "cache", timeout=120)
    else:
        result = _in_process(invocation, monkeypatch)
    assert sweep.check(case, invocation, result) == [], f"stdout: {result.stdout[-800:]}\nstderr: {result.stderr[-2000:]}"


def test_every_case_has_a_distinct_name_and_an_outcome() -> None:
    names = [case.name for case in sweep.CASES]
    assert len(names) == len(set(names))
    assert {case.expect.outcome for case in sweep.CASES} == {sweep.HANDLED, sweep.SKIPPED, sweep.ERROR}
    assert all(case.expect.exit_code in (1, 2) for case in sweep.CASES if case.expect.outcome == sweep.ERROR)


def test_the_check_catches_what_it_should() -> None:
    case = sweep.Case("x", lambda ws: sweep.Invocation([]), sweep.Expect(sweep.ERROR, 1, stderr="photo.png"))
    invocation = sweep.Invocation([])
    assert sweep.check(case, invocation, sweep.Result(1, "", "Error: photo.png: not an image\n")) == []
    assert sweep.check(case, invocation, sweep.Result(1, "", "Traceback (most recent call last):\nValueError: x\n"))
    assert sweep.check(case, invocation, sweep.Result(1, "", "Error: unexpected KeyError: 'a'\n"))
    assert sweep.check(case, invocation, sweep.Result(2, "", "Error: photo.png: not an image\n"))
    assert sweep.check(case, invocation, sweep.Result(1, "", "Error: another.png\n"))
    assert sweep.check(case, invocation, sweep.Result(1, "", "Error: photo.png\nError: photo.png\n"))
    assert sweep.check(case, invocation, sweep.Result(0, "", "", timed_out=True)) == ["it hung (timed out)"]


def test_planted_pickles_are_never_opened(model: Path, tmp_path: Path) -> None:
    global _OPENED
    import blipkit

    workspace = sweep.Workspace(tmp_path, model)
    run, checkpoint = workspace.run_copy()
    marker = sweep._plant_pickles(workspace, run, checkpoint)
    planted = [str(path) for path in run.rglob("*") if path.suffix in (".bin", ".pt")]
    assert len(planted) == 5
    _OPENED = []
    try:
        blipkit.load(run)
        result = CliRunner().invoke(cli, ["caption", str(sweep._image(tmp_path / "good.png")), "-m", str(run), "--beams", "1"])
        opened = list(_OPENED)
    finally:
        _OPENED = None
    assert result.exit_code == 0, result.output
    assert any(path.endswith("bridge/config.json") for path in opened), "the hook sees the run's files being read"
    assert not set(planted) & set(opened) and not marker.exists()


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    from blipkit.data.images import load_image
    from blipkit.errors import DataError

    bomb = sweep._png_header(tmp_path / "bomb.png", 100_000, 100_000)
    assert bomb.stat().st_size < 200
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="bomb.png: image too large to decode safely"):
        load_image(bomb)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50 * 1024, f"refusing it cost {grown_kib} KiB"


def test_caption_help_documents_the_exit_status() -> None:
    result = CliRunner().invoke(cli, ["caption", "--help"])
    assert result.exit_code == 0
    assert "Exit status:" in result.stdout and "1  some input was skipped" in result.stdout
