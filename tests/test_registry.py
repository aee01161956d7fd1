"""Registry: names, aliases, prefixes, path matching, did-you-mean, option checks."""

from __future__ import annotations

import pytest

from blipkit.errors import ConfigError, DuplicateNameError, UnknownNameError
from blipkit.registry import Registry


def build(size: int = 1, *, depth: int = 2) -> tuple[int, int]:
    return size, depth


def from_repo(repo: str, revision: str = "main") -> tuple[str, str]:
    return repo, revision


@pytest.fixture
def registry() -> Registry:
    reg = Registry("encoder", hint="List them with: blipkit encoders")
    reg.register("siglip", build, aliases=["sig"], description="d", kind="k", plugin="p1", available=True)
    reg.register("hf:", from_repo, matches=lambda s: s.startswith("/models/"), plugin="p2")
    return reg


def test_name_alias_and_prefix(registry: Registry) -> None:
    assert registry.create("siglip", size=3) == (3, 2)
    assert registry.create("sig", depth=5) == (1, 5)
    assert registry.create("hf:org/model", revision="v1") == ("org/model", "v1")
    assert registry.create("hf:org/model:with:colons") == ("org/model:with:colons", "main")
    assert registry.create("/models/local") == ("/models/local", "main")
    assert "sig" in registry and "hf:x" in registry and "nothing" not in registry


def test_unknown_name_suggests_close_ones(registry: Registry) -> None:
    with pytest.raises(UnknownNameError) as info:
        registry.resolve("siglp")
    message = str(info.value)
    assert message.startswith("unknown encoder 'siglp'; did you mean 'siglip'")
    assert message.endswith("? List them with: blipkit encoders")
    assert "\n" not in message
    with pytest.raises(UnknownNameError, match=r"unknown encoder 'zzz'\. List"):
        registry.resolve("zzz")
    with pytest.raises(UnknownNameError):
        registry.resolve("hf:")


def test_duplicates_name_both_plugins(registry: Registry) -> None:
    with pytest.raises(DuplicateNameError, match="'p1' and plugin 'p3'"):
        registry.register("sig", build, plugin="p3")
    with pytest.raises(DuplicateNameError, match="'p1' and plugin 'p3'"):
        registry.register("other", build, aliases=["siglip"], plugin="p3")


def test_check_kwargs_names_the_bad_key(registry: Registry) -> None:
    registry.check_kwargs("siglip", {"size": 2, "depth": 3})
    registry.check_kwargs("hf:org/m", {"revision": "x"})
    with pytest.raises(ConfigError, match=r"^encoder\.sise: encoder 'siglip' takes no option 'sise'; it takes: depth, size$"):
        registry.check_kwargs("siglip", {"sise": 2}, where="encoder")
    with pytest.raises(ConfigError, match="takes: revision"):
        registry.check_kwargs("hf:org/m", {"repo": "x"})


def test_listing_and_offline_flag(registry: Registry) -> None:
    entries = {e.name: e.to_dict() for e in registry}
    assert entries["siglip"]["offline"] is True
    assert entries["siglip"]["aliases"] == ["sig"]
    assert entries["hf:"]["offline"] is None
    registry.register("broken-probe", build, available=lambda: 1 / 0, plugin="p4")
    assert registry.resolve("broken-probe").entry.usable_offline() is False
