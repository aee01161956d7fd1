"""Name -> factory registries, filled by plugins through the ``register`` callback.

A name that ends in ``:`` registers a prefix: ``hf:`` makes ``hf:org/model`` resolve to that factory,
called with the text after the prefix as its first argument (``factory("org/model", **kwargs)``).
A prefix entry may also claim bare strings it recognises (a local directory, a ``.gguf`` file) through
its ``matches`` predicate.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from blipkit.errors import ConfigError, DuplicateNameError, UnknownNameError

__all__ = ["Entry", "Registry"]


@dataclass
class Entry:
    """One registered name."""

    name: str
    factory: Callable[..., Any]
    registry: str
    plugin: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    kind: str = ""
    available: Callable[[], bool] | bool | None = None
    matches: Callable[[str], bool] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_prefix(self) -> bool:
        """Whether this entry is an open-ended ``prefix:`` family."""
        return self.name.endswith(":")

    def usable_offline(self) -> bool | None:
        """True/False when the entry can say whether it loads here without a hub, None if unknown."""
        if callable(self.available):
            try:
                return bool(self.available())
            except Exception:  # an availability probe must never take a listing down
                return False
        return self.available

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description for ``--json`` listings."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "description": self.description,
            "kind": self.kind,
            "plugin": self.plugin,
            "offline": self.usable_offline(),
            **self.extra,
        }


@dataclass
class Resolved:
    """A name resolved to its entry plus, for prefixes, the argument after the prefix."""

    entry: Entry
    argument: str | None = None

    def create(self, **kwargs: Any) -> Any:
        """Call the factory."""
        if self.argument is None:
            return self.entry.factory(**kwargs)
        return self.entry.factory(self.argument, **kwargs)


class Registry:
    """The names of one kind of thing (encoder, bridge, llm, dataset, recipe)."""

    def __init__(self, kind: str, hint: str = "") -> None:
        self.kind = kind
        self.hint = hint
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self,
        name: str,
        factory: Callable[..., Any],
        *,
        aliases: list[str] | tuple[str, ...] = (),
        description: str = "",
        kind: str = "",
        available: Callable[[], bool] | bool | None = None,
        matches: Callable[[str], bool] | None = None,
        plugin: str = "unknown",
        **extra: Any,
    ) -> None:
        """Add ``name`` (and its aliases); a name taken by another plugin raises DuplicateNameError."""
        for key in (name, *aliases):
            owner = self._owner(key)
            if owner is not None:
                raise DuplicateNameError(
                    f"{self.kind} name '{key}' is registered by both plugin '{owner.plugin}' and plugin "
                    f"'{plugin}'; uninstall or disable one of them (BLIPKIT_DISABLE_PLUGINS={plugin})"
                )
        entry = Entry(
            name=name,
            factory=factory,
            registry=self.kind,
            plugin=plugin,
            aliases=tuple(aliases),
            description=description,
            kind=kind,
            available=available,
            matches=matches,
            extra=extra,
        )
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name

    def _owner(self, key: str) -> Entry | None:
        if key in self._entries:
            return self._entries[key]
        if key in self._aliases:
            return self._entries[self._aliases[key]]
        return None

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
        except UnknownNameError:
            return False
        return True

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        """Every name and alias, prefixes included (with their trailing colon)."""
        return sorted([*self._entries, *self._aliases])

    def resolve(self, name: str) -> Resolved:
        """Find the entry for ``name``: exact name, alias, ``prefix:argument``, or a prefix's ``matches``."""
        if not isinstance(name, str) or not name:
            raise UnknownNameError(self.kind, str(name), self.names(), self.hint)
        entry = self._owner(name)
        if entry is not None and not entry.is_prefix:
            return Resolved(entry)
        head, sep, rest = name.partition(":")
        if sep:
            prefix = self._owner(head + ":")
            if prefix is not None and rest:
                return Resolved(prefix, rest)
        for candidate in self._entries.values():
            if candidate.is_prefix and candidate.matches is not None and candidate.matches(name):
                return Resolved(candidate, name)
        raise UnknownNameError(self.kind, name, self.names(), self.hint)

    def create(self, name: str, **kwargs: Any) -> Any:
        """Resolve ``name`` and build the object with ``kwargs``."""
        return self.resolve(name).create(**kwargs)

    def check_kwargs(self, name: str, kwargs: dict[str, Any], where: str = "") -> None:
        """Raise ConfigError naming the first key that the factory for ``name`` does not accept."""
        resolved = self.resolve(name)
        signature = inspect.signature(resolved.entry.factory)
        params = list(signature.parameters.values())
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return
        if resolved.argument is not None:
            params = params[1:]
        accepted = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for key in kwargs:
            if key not in accepted:
                label = f"{where}.{key}" if where else key
                raise ConfigError(
                    f"{label}: {self.kind} '{name}' takes no option '{key}'; it takes: "
                    f"{', '.join(sorted(accepted)) or 'none'}"
                )
