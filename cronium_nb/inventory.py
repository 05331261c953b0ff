"""The set of servers a user can target, and its YAML file format.

.. code-block:: yaml

    defaults: {user: root, key_path: ~/.ssh/id_ed25519, known_hosts: ~/.ssh/known_hosts}
    servers:
      - {name: web1, host: 10.0.0.5}
      - {name: web2, host: 10.0.0.6, port: 2222}
    groups:
      web: [web1, web2]

Every error in such a file names the file and the line.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import pandas as pd
import yaml

from cronium_nb.errors import CroniumError
from cronium_nb.model import SERVER_FIELDS, Server

ALL = "all"
TOP_LEVEL_KEYS = ("defaults", "servers", "groups")
DEFAULTABLE_FIELDS = tuple(f for f in SERVER_FIELDS if f not in ("name", "host"))


class InventoryError(CroniumError, ValueError):
    """An inventory that cannot be used, with where the problem is when it came from a file."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        self.message, self.source, self.line = message, source, line
        where = f"{source}:{line}: " if source and line else f"{source}: " if source else ""
        super().__init__(where + message)


class UnknownServerError(InventoryError):
    """A selection named something that is neither a server nor a group."""


# --- YAML that remembers line numbers ------------------------------------------------------


class _LocatedDict(dict):
    line: int
    key_lines: dict[Any, int]


class _LocatedList(list):
    line: int
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader whose mappings and lists remember the line of each key and item."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LocatedDict:
    loader.flatten_mapping(node)
    result = _LocatedDict()
    result.line, result.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        key_line = key_node.start_mark.line + 1
        if key in result:
            raise InventoryError(f"duplicate key {key!r} (first at line {result.key_lines[key]})", line=key_line)
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_line
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _LocatedList:
    result = _LocatedList(loader.construct_object(item, deep=True) for item in node.value)
    result.line, result.item_lines = node.start_mark.line + 1, [item.start_mark.line + 1 for item in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _line_of(node: Any, key: Any = None) -> int | None:
    if key is not None and isinstance(node, _LocatedDict):
        return node.key_lines.get(key, node.line)
    return getattr(node, "line", None)


# --- the inventory --------------------------------------------------------------------------


class Inventory:
    """Named servers and named groups of them.

    ``Inventory([Server(...), ...], groups={"web": ["web1", "web2"]})`` or
    ``Inventory.load("servers.yaml")``. Selections (:meth:`select`) accept server names, group
    names and ``"all"``, as a list or a comma-separated string.
    """

    def __init__(self, servers: Iterable[Server] = (), groups: Mapping[str, Iterable[str]] | None = None):
        self._servers: dict[str, Server] = {}
        for server in servers:
            if not isinstance(server, Server):
                raise InventoryError(f"expected a Server, got {server!r}")
            if server.name in self._servers:
                raise InventoryError(f"duplicate server name {server.name!r}")
            self._servers[server.name] = server
        self._check_jumps()
        self._groups: dict[str, tuple[str, ...]] = {}
        for group, members in (groups or {}).items():
            self._add_group(group, [members] if isinstance(members, str) else list(members))

    def _add_group(self, group: str, members: list[str], lines: list[int] | None = None) -> None:
        if group == ALL:
            raise InventoryError(f"group name {ALL!r} is reserved: it selects every server")
        if group in self._servers:
            raise InventoryError(f"group {group!r} has the name of a server")
        for index, member in enumerate(members):
            if member not in self._servers:
                raise InventoryError(
                    f"group {group!r}: member {member!r} is not a server", line=lines[index] if lines else None
                )
        self._groups[group] = tuple(members)

    def _check_jumps(self, lines: Mapping[str, int | None] | None = None) -> None:
        """Every ``jump`` names a server of the inventory, and no chain of jumps comes back to
        where it started."""
        for server in self._servers.values():
            chain, current = [server.name], server
            while current.jump is not None:
                line = (lines or {}).get(current.name)
                if current.jump not in self._servers:
                    raise InventoryError(
                        f"server {current.name!r}: jump {current.jump!r} is not a server of the inventory "
                        f"(add it as a server, or use ProxyJump in the ssh config for a host outside it)",
                        line=line,
                    )
                if current.jump in chain:
                    cycle = " -> ".join([*chain[chain.index(current.jump) :], current.jump])
                    first_line = (lines or {}).get(server.name)
                    raise InventoryError(f"server {server.name!r}: jump hosts form a cycle: {cycle}", line=first_line)
                chain.append(current.jump)
                current = self._servers[current.jump]

    # -- loading

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Inventory:
        """Read an inventory YAML file; errors name the file and the line."""
        path = os.fspath(path)
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as stream:
                text = stream.read()
        except OSError as error:
            raise InventoryError(f"cannot read inventory: {error.strerror}", source=path) from error
        return cls.from_yaml(text, source=path)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "<inventory>") -> Inventory:
        try:
            return cls._from_document(yaml.load(text, Loader=_LineLoader))
        except InventoryError as error:
            raise InventoryError(error.message, source=source, line=error.line) from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
            problem = getattr(error, "problem", None) or str(error)
            raise InventoryError(
                f"invalid YAML: {problem}", source=source, line=mark.line + 1 if mark else None
            ) from None

    @classmethod
    def _from_document(cls, document: Any) -> Inventory:
        if not isinstance(document, dict):
            raise InventoryError("an inventory must be a mapping with a 'servers' list", line=_line_of(document))
        for key in document:
            if key not in TOP_LEVEL_KEYS:
                raise InventoryError(
                    f"unknown key {key!r}; expected one of {', '.join(TOP_LEVEL_KEYS)}", line=_line_of(document, key)
                )
        defaults = document.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise InventoryError("'defaults' must be a mapping", line=_line_of(document, "defaults"))
        for key in defaults:
            if key not in DEFAULTABLE_FIELDS:
                raise InventoryError(
                    f"unknown key {key!r} in defaults; expected one of {', '.join(DEFAULTABLE_FIELDS)}",
                    line=_line_of(defaults, key),
                )
        entries = document.get("servers")
        if not isinstance(entries, list) or not entries:
            raise InventoryError("'servers' must be a non-empty list", line=_line_of(document, "servers"))
        inventory = cls()
        jump_lines: dict[str, int | None] = {}
        for entry in entries:
            server = cls._server_from_entry(entry, defaults, seen=inventory._servers)
            inventory._servers[server.name] = server
            jump_lines[server.name] = _line_of(entry, "jump") if "jump" in entry else _line_of(defaults, "jump")
        inventory._check_jumps(jump_lines)
        groups = document.get("groups") or {}
        if not isinstance(groups, dict):
            raise InventoryError("'groups' must be a mapping of group name to server names", line=_line_of(groups))
        for group, members in groups.items():
            line = _line_of(groups, group)
            if isinstance(members, str):
                members = [name.strip() for name in members.split(",")]
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise InventoryError(f"group {group!r} must be a list of server names", line=line)
            try:
                inventory._add_group(str(group), members, getattr(members, "item_lines", None))
            except InventoryError as error:
                raise InventoryError(error.message, line=error.line or line) from None
        return inventory

    @staticmethod
    def _server_from_entry(entry: Any, defaults: dict, seen: Mapping[str, Server]) -> Server:
        if not isinstance(entry, dict):
            raise InventoryError("each server must be a mapping with at least name and host", line=_line_of(entry))
        for key in entry:
            if key not in SERVER_FIELDS:
                raise InventoryError(
                    f"unknown key {key!r} in server {entry.get('name', '?')!r}; "
                    f"expected one of {', '.join(SERVER_FIELDS)}",
                    line=_line_of(entry, key),
                )
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise InventoryError("server has no name", line=_line_of(entry))
        if name in seen:
            raise InventoryError(f"duplicate server name {name!r}", line=_line_of(entry, "name"))
        if entry.get("host") in (None, ""):
            raise InventoryError(f"server {name!r} has no host", line=_line_of(entry))
        try:
            return Server(**{**defaults, **entry})
        except ValueError as error:
            field = "port" if "port" in str(error) else None
            raise InventoryError(str(error), line=_line_of(entry, field)) from None

    # -- access

    @property
    def servers(self) -> dict[str, Server]:
        return dict(self._servers)

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return dict(self._groups)

    def __getitem__(self, name: str) -> Server:
        try:
            return self._servers[name]
        except KeyError:
            raise UnknownServerError(self._unknown_message(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._servers

    def __iter__(self) -> Iterator[Server]:
        return iter(self._servers.values())

    def __len__(self) -> int:
        return len(self._servers)

    def __repr__(self) -> str:
        return f"Inventory({len(self)} servers: {', '.join(self._servers)}; groups: {', '.join(self._groups) or '-'})"

    def _unknown_message(self, name: str) -> str:
        known = ", ".join([*self._servers, *self._groups, ALL])
        return f"unknown server or group {name!r}; known: {known}"

    def select(self, targets: str | Iterable[str] | None = ALL) -> list[Server]:
        """Servers named by ``targets`` (names, groups, ``all``), in inventory order, no repeats."""
        if targets is None:
            targets = ALL
        names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
        names = [n for n in names if n]
        if not names:
            raise UnknownServerError("no servers selected")
        chosen: set[str] = set()
        for name in names:
            if name == ALL:
                chosen.update(self._servers)
            elif name in self._groups:
                chosen.update(self._groups[name])
            elif name in self._servers:
                chosen.add(name)
            else:
                raise UnknownServerError(self._unknown_message(name))
        return [server for name, server in self._servers.items() if name in chosen]

    def merged(self, other: Inventory) -> Inventory:
        """A new inventory with the servers and groups of both; names must not clash."""
        return Inventory([*self, *other], {**self._groups, **other._groups})

    def without(self, names: Iterable[str]) -> Inventory:
        """A new inventory without the named servers (and without them in groups)."""
        drop = set(names)
        groups = {g: [m for m in members if m not in drop] for g, members in self._groups.items()}
        return Inventory([s for s in self if s.name not in drop], {g: m for g, m in groups.items() if m})

    def to_dataframe(self) -> pd.DataFrame:
        group_of = {name: [g for g, members in self._groups.items() if name in members] for name in self._servers}
        rows = [{**{f: getattr(s, f) for f in SERVER_FIELDS}, "groups": ",".join(group_of[s.name])} for s in self]
        return pd.DataFrame(rows, columns=[*SERVER_FIELDS, "groups"])

    def _repr_html_(self) -> str:
        # pandas-stubs omit DataFrame._repr_html_, so the attribute reads as a column (a Series).
        return self.to_dataframe()._repr_html_()  # type: ignore[operator]
