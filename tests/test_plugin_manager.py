"""The plugin manager: built-ins, entry-point discovery, allow/deny lists, duplicates, broken plugins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest

from blipkit import plugin_manager
from blipkit.errors import DuplicateNameError

ENCODER_PLUGIN = dedent(
    """
    from blipkit import hookimpl

    def make(size=4):
        return ("{name}", size)

    @hookimpl
    def register_encoders(register):
        register("{name}", make, aliases=["{name}-alias"], description="test encoder", kind="test")
    """
)


def install_fake_plugin(root: Path, dist: str, module: str, source: str, version: str = "1.2.3") -> None:
    """Write a module and a dist-info with a ``blipkit`` entry point, as pip would install it."""
    sys.modules.pop(module, None)  # an earlier test may have imported a module of the same name
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[blipkit]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_builtin_plugins_all_load() -> None:
    assert plugin_manager.failed_plugins() == {}
    report = {item["name"]: item for item in plugin_manager.plugin_report()}
    for module in plugin_manager.DEFAULT_PLUGINS:
        assert report[module]["builtin"]
        assert report[module]["hooks"], f"{module} implements no hook"


def test_entry_point_plugin_is_discovered(site: Path) -> None:
    install_fake_plugin(site, "blipkit-fake", "blipkit_fake", ENCODER_PLUGIN.format(name="fake-enc"))
    regs = plugin_manager.registries()
    assert regs.encoders.create("fake-enc", size=7) == ("fake-enc", 7)
    assert regs.encoders.resolve("fake-enc-alias").entry.name == "fake-enc"
    item = next(i for i in plugin_manager.plugin_report() if i["name"] == "blipkit_fake")
    assert item["version"] == "1.2.3"
    assert item["registered"] == {"encoders": ["fake-enc"]}
    assert item["hooks"] == ["register_encoders"]
    assert not item["builtin"]


@pytest.mark.parametrize(
    ("load", "disable", "loaded"),
    [
        (None, None, True),
        ("", None, False),
        ("something-else", None, False),
        ("blipkit-fake", None, True),
        ("blipkit_fake", None, True),
        (None, "blipkit_fake", False),
        ("blipkit-fake", "blipkit-fake", False),
    ],
)
def test_allow_and_deny_lists(
    site: Path, monkeypatch: pytest.MonkeyPatch, load: str | None, disable: str | None, loaded: bool
) -> None:
    install_fake_plugin(site, "blipkit-fake", "blipkit_fake", ENCODER_PLUGIN.format(name="fake-enc"))
    if load is not None:
        monkeypatch.setenv("BLIPKIT_LOAD_PLUGINS", load)
    if disable is not None:
        monkeypatch.setenv("BLIPKIT_DISABLE_PLUGINS", disable)
    assert ("fake-enc" in plugin_manager.registries().encoders) is loaded


def test_load_list_does_not_drop_builtins(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_plugin(site, "blipkit-fake", "blipkit_fake", ENCODER_PLUGIN.format(name="fake-enc"))
    monkeypatch.setenv("BLIPKIT_LOAD_PLUGINS", "")
    assert "tiny-vit" in plugin_manager.registries().encoders


def test_disable_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPKIT_DISABLE_PLUGINS", "tiny_vit")
    assert "tiny-vit" not in plugin_manager.registries().encoders
    assert "siglip" in plugin_manager.registries().encoders


def test_duplicate_names_name_both_plugins(site: Path) -> None:
    install_fake_plugin(site, "blipkit-one", "blipkit_one", ENCODER_PLUGIN.format(name="same"))
    install_fake_plugin(site, "blipkit-two", "blipkit_two", ENCODER_PLUGIN.format(name="same"))
    with pytest.raises(DuplicateNameError) as info:
        plugin_manager.registries()
    message = str(info.value)
    assert "blipkit_one" in message and "blipkit_two" in message and "'same'" in message


def test_duplicate_of_a_builtin_alias(site: Path) -> None:
    install_fake_plugin(site, "blipkit-one", "blipkit_one", ENCODER_PLUGIN.format(name="tiny-vit"))
    with pytest.raises(DuplicateNameError, match="blipkit.plugins.encoders.tiny_vit"):
        plugin_manager.registries()


def test_broken_plugin_is_reported_and_others_work(site: Path) -> None:
    install_fake_plugin(site, "blipkit-broken", "blipkit_broken", "raise RuntimeError('boom at import')\n")
    install_fake_plugin(site, "blipkit-fake", "blipkit_fake", ENCODER_PLUGIN.format(name="fake-enc"))
    assert "fake-enc" in plugin_manager.registries().encoders
    failed = plugin_manager.failed_plugins()
    assert failed["blipkit_broken"] == "RuntimeError: boom at import"
    assert "blipkit_fake" not in failed
    item = next(i for i in plugin_manager.plugin_report() if i["name"] == "blipkit_broken")
    assert item["error"] == "RuntimeError: boom at import"


def test_plugin_that_raises_while_registering(site: Path) -> None:
    source = dedent(
        """
        from blipkit import hookimpl

        @hookimpl
        def register_encoders(register):
            raise ValueError("bad registration")
        """
    )
    install_fake_plugin(site, "blipkit-bad", "blipkit_bad", source)
    assert "tiny-vit" in plugin_manager.registries().encoders
    assert "bad registration" in plugin_manager.failed_plugins()["blipkit_bad"]


@pytest.mark.slow
def test_example_plugin_installs_and_is_listed(tmp_path: Path) -> None:
    """The example encoder under examples/ installs with pip, shows up through its real entry point, gives a
    real transformers tower's penultimate-block tokens, and trains."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    example = Path(__file__).resolve().parents[1] / "examples" / "blipkit-example-encoder"
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(example)],
        check=True,
        capture_output=True,
    )
    tower = tmp_path / "tower"
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=48)
    ViTModel(config).save_pretrained(tower)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tower)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "BLIPKIT_CACHE": str(tmp_path / "cache")}
    listed = subprocess.run(
        [sys.executable, "-m", "blipkit", "plugins", "--json"], env=env, capture_output=True, text=True, check=True
    )
    report = {item["name"]: item for item in json.loads(listed.stdout)}
    assert report["example_encoder"]["version"] == "0.1.0"
    assert report["example_encoder"]["registered"] == {"encoders": ["hf-tower"]}
    parity = (
        "import torch; from transformers import ViTModel; from blipkit.plugin_manager import registries\n"
        f"encoder = registries().encoders.create('hf-tower', model={str(tower)!r})\n"
        "pixels = torch.randn(2, 3, 32, 32)\n"
        f"reference = ViTModel.from_pretrained({str(tower)!r})(pixel_values=pixels, output_hidden_states=True).hidden_states[2]\n"
        "assert torch.equal(encoder(pixels), reference), 'penultimate block'\n"
        "print(encoder.num_tokens, encoder.feature_dim, encoder.token_layout)"
    )
    checked = subprocess.run([sys.executable, "-c", parity], env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert checked.stdout.split()[:2] == ["17", "24"] and "1 CLS + 16 patches (4x4)" in checked.stdout
    trained = subprocess.run(
        [sys.executable, "-m", "blipkit", "train", "tiny", "encoder=hf-tower", f"encoder.options={{model: {tower}}}",
         "stage1.steps=1", "stage2.steps=1", "-o", str(tmp_path / "run"), "-q"],
        env=env, capture_output=True, text=True,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "Model saved in" in trained.stdout


@pytest.mark.slow
def test_example_objective_plugin_trains_a_stage(tmp_path: Path) -> None:
    """The example objective under examples/ installs with pip, registers through its entry point, and a
    recipe's stage trains with it; nothing in blipkit's source names it."""
    example = Path(__file__).resolve().parents[1] / "examples" / "blipkit-example-objective"
    target = tmp_path / "target"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(example)],
        check=True, capture_output=True,
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "BLIPKIT_CACHE": str(tmp_path / "cache")}
    stages = ("stages=[{objective: prefix-contrastive, name: align, steps: 3, lr: 1.0e-3, options: {temperature: 0.1}},"
              " {objective: lm, name: captions, steps: 2, lr: 1.0e-3}]")
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "blipkit", "train", "tiny", "~stage1", "~stage2", stages, "log_every=1", "-o", str(run), "-q"],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "align: loss" in done.stdout and "captions: loss" in done.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("align", 1), ("align", 2), ("align", 3), ("captions", 1), ("captions", 2)]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["contrastive"] == r["loss"] for r in rows[:3])
    source = Path(__file__).resolve().parents[1]
    assert not any("prefix-contrastive" in path.read_text() for folder in ("blipkit", "plugins") for path in (source / folder).rglob("*.py"))


TASK_PLUGIN = dedent(
    '''
    from PIL import Image

    from blipkit import hookimpl
    from blipkit.data.collate import Collator, LanguageModelText
    from blipkit.data.dataset import ImageTextDataset
    from blipkit.data.sample import Record
    from blipkit.interfaces import Objective


    def counting(source="counting", split="train", num_images=16):
        records = []
        for i in range(num_images):
            image = Image.new("RGB", (32, 32), (20 * (i % 3), 0, 0))
            records.append(Record(image, str(i % 3 + 1), image_id=f"count-{i}", task="count"))
        return ImageTextDataset(records, name="counting", split=split)


    class CountLM(Objective):
        tasks = frozenset({"count"})

        def collator(self, model, recipe):
            return Collator(model.encoder.preprocess, LanguageModelText(model.llm.tokenize, caption_prompt="How many?"))

        def loss(self, model, batch):
            prefix, _ = model.prefix(model.batch_tokens(batch))
            loss = model.llm.loss(prefix, batch["lm"].to(model.device))
            return {"loss": loss}

        def items(self, batch):
            return batch["lm"].num_targets()


    @hookimpl
    def register_datasets(register):
        register("counting", counting, description="test: images with a count task")


    @hookimpl
    def register_objectives(register):
        register("count-lm", CountLM, description="test: trains on the count task")
    '''
)


def test_a_dataset_plugin_task_trains_with_an_objective_plugin(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task set is open: a dataset plugin yields a task of its own, an objective plugin trains on it."""
    from blipkit.config import load_recipe
    from blipkit.errors import ConfigError
    from blipkit.train.runner import train

    install_fake_plugin(site, "blipkit-counting", "blipkit_counting", TASK_PLUGIN)
    monkeypatch.setenv("BLIPKIT_CACHE", str(tmp_path / "cache"))
    stages = ["~stage1", "~stage2", "data.train={name: counting, options: {num_images: 16}}", "log_every=1",
              "stages=[{objective: count-lm, name: counts, tasks: [count], steps: 2, lr: 1.0e-3}]"]
    result = train(load_recipe("tiny", stages), output=tmp_path / "run", quiet=True)
    assert result.completed and list(result.final) == ["counts"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [("counts", 1), ("counts", 2)]
    with pytest.raises(ConfigError, match="objective 'lm' trains on caption, vqa, not count"):
        load_recipe("tiny", ["stage2.tasks=[count]"])
