"""Name-keyed registries: the one place each dispatch algorithm, placement policy, recorder
mode and transport states what it is and what it promises (a leaf module).

Code asks an entry for its facts (``DISPATCHES.get(name).graph_safe``) instead of comparing
names, so adding one is one registration where it is defined.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from eplb_plugin.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries keyed by their ``name`` attribute, in registration order.

    what: how an unknown name's error names the choice (a flag such as
    ``--ep-dispatch-algorithm``, or words such as ``recorder mode``).
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry`` under ``entry.name`` and return it (usable as a class decorator)."""
        name: Any = getattr(entry, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.what} entry needs a non-empty string name (got {name!r})")
        if name in self._entries:
            raise ConfigError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry named ``name``; ConfigError listing the known names when it is unknown."""
        if name not in self._entries:
            raise ConfigError(f"{self.what} {name!r} is unknown; choose one of {list(self._entries)}")
        return self._entries[name]

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> tuple[T, ...]:
        return tuple(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"
