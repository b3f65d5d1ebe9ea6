"""Name -> object registries with loud failures for unknown or duplicate names."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A small registry: ``@REG.register("name")`` and ``REG.get("name")``."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def deco(obj: T) -> T:
      if name in self._items:
        raise ValueError(f"duplicate {self.kind} name {name!r}")
      self._items[name] = obj
      return obj
    return deco

  def unregister(self, name: str) -> None:
    """Remove ``name`` (it must be registered)."""
    self.get(name)
    del self._items[name]

  def get(self, name: str) -> T:
    try:
      return self._items[name]
    except KeyError:
      close = difflib.get_close_matches(name, self._items, n=3)
      hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
      raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}.{hint}") from None

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._items))

  def names(self) -> list[str]:
    return sorted(self._items)
