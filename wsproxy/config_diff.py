"""What a reload changes: the old and the new config (and their TLS files' digests) in, a list of
changes out, for the one log line and the ``reload`` event each successful reload writes.

``diff`` is pure. The config objects say which files are named; whether a file's content
changed under the same name only its digest can say, so the caller reads those with
``read_digests`` when it loads each generation and passes both sets in.

Granularity, in the order reported: the ``proxy`` and ``admin`` sections (changed keys); each
listener and target group (added, removed, or changed with its changed keys as dotted paths,
``tls.policy``, ``health_check.interval_seconds``; a list such as ``rules`` counts as one key);
each target of a group present in both (added, removed, weight changed); and each TLS file
(certificate, key, CA, CRL) newly named, no longer named, or whose content changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from wsproxy.config import Config, TargetGroupConfig

Digests = Mapping[str, bytes | None]  # file path -> SHA-256 of its content, None: unreadable
SUMMARY_LIMIT = 20  # changes spelled out in the log line; the JSON event carries them all


class Kind(StrEnum):
    SETTINGS = "settings"  # the [proxy] or [admin] section
    LISTENER = "listener"
    TARGET_GROUP = "target_group"
    API = "api"  # an [apis.NAME] section: routes and limits
    TARGET = "target"
    CERTIFICATE = "certificate"  # any TLS file: certificate, key, CA bundle, CRL


class Action(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class Change:
    """One thing a reload added, removed or changed.

    ``name`` is the section, listener or group name, the target's address or the file's path;
    ``fields`` the changed keys (dotted, relative to the thing); ``target_group`` the group of a
    target; ``used_by`` the config keys that name a file.
    """

    kind: Kind
    action: Action
    name: str
    fields: tuple[str, ...] = ()
    target_group: str | None = None
    used_by: tuple[str, ...] = ()

    def describe(self) -> str:
        """One phrase for the log line, e.g. ``listener 'edge' changed (address, tls.policy)``."""
        fields = f" ({', '.join(self.fields)})" if self.fields else ""
        if self.kind is Kind.SETTINGS:
            later = " (applies at the next restart)" if self.name == "admin" else ""
            return f"[{self.name}] changed{fields}{later}"
        if self.kind is Kind.LISTENER:
            return f"listener '{self.name}' {self.action}{fields}"
        if self.kind is Kind.TARGET_GROUP:
            return f"target group '{self.name}' {self.action}{fields}"
        if self.kind is Kind.API:
            return f"API '{self.name}' {self.action}{fields}"
        if self.kind is Kind.TARGET:
            return f"target {self.name} of target group '{self.target_group}' {self.action}{fields}"
        return f"{_file_noun(self.used_by)} {self.name} {self.action} ({', '.join(self.used_by)})"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form in the ``reload`` event's ``changes`` (empty parts left out)."""
        entry: dict[str, Any] = {"kind": str(self.kind), "action": str(self.action)}
        entry["name"] = self.name
        if self.target_group is not None:
            entry["target_group"] = self.target_group
        if self.fields:
            entry["fields"] = list(self.fields)
        if self.used_by:
            entry["used_by"] = list(self.used_by)
        return entry


# The last part of the key naming a file -> what to call the file (default: certificate file).
_FILE_NOUNS = {
    "key": "key file",
    "client_key": "key file",
    "ca": "CA file",
    "client_ca": "CA file",
    "crl": "CRL file",
}


def _file_noun(used_by: tuple[str, ...]) -> str:
    last = used_by[0].rsplit(".", 1)[-1] if used_by else ""
    return _FILE_NOUNS.get(last, "certificate file")


def tls_files(config: Config) -> dict[str, tuple[str, ...]]:
    """Every TLS file the config names -> the keys that name it (a file may serve several)."""
    named: dict[str, list[str]] = {}

    def add(path: str | None, key: str) -> None:
        if path is not None:
            named.setdefault(path, []).append(key)

    for name, listener in config.listeners.items():
        if listener.tls is None:
            continue
        base = f"listeners.{name}.tls"
        for index, pair in enumerate(listener.tls.certificates):
            add(pair.cert, f"{base}.certificates[{index}].cert")
            add(pair.key, f"{base}.certificates[{index}].key")
        add(listener.tls.client_ca, f"{base}.client_ca")
        add(listener.tls.crl, f"{base}.crl")
    for name, group in config.target_groups.items():
        if group.tls is None:
            continue
        base = f"target_groups.{name}.tls"
        add(group.tls.ca, f"{base}.ca")
        add(group.tls.client_cert, f"{base}.client_cert")
        add(group.tls.client_key, f"{base}.client_key")
    return {path: tuple(keys) for path, keys in named.items()}


def read_digests(config: Config) -> dict[str, bytes | None]:
    """SHA-256 of every TLS file the config names (None: unreadable). Reads files: call it
    when a generation is loaded, and hand the result to ``diff``."""
    digests: dict[str, bytes | None] = {}
    for path in tls_files(config):
        try:
            with open(path, "rb") as file:
                digests[path] = hashlib.sha256(file.read()).digest()
        except OSError:
            digests[path] = None
    return digests


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two ``model_dump(mode="json")`` values differ; lists count whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for key in sorted(set(old) | set(new)):
            keys += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def _dump(model: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude=exclude)


def _sections(
    kind: Kind, old: Mapping[str, BaseModel], new: Mapping[str, BaseModel]
) -> list[Change]:
    """Added, removed and changed entries of a named table (listeners, target groups); a target
    group's ``targets`` are left to ``_targets``."""
    exclude = {"targets"} if kind is Kind.TARGET_GROUP else None
    changes = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            changes.append(Change(kind, Action.ADDED, name))
        elif name not in new:
            changes.append(Change(kind, Action.REMOVED, name))
        else:
            keys = _changed_keys(_dump(old[name], exclude), _dump(new[name], exclude))
            if keys:
                changes.append(Change(kind, Action.CHANGED, name, tuple(keys)))
    return changes


def _targets(name: str, old: TargetGroupConfig, new: TargetGroupConfig) -> list[Change]:
    before = {str(t.address): t for t in old.targets}
    after = {str(t.address): t for t in new.targets}
    changes = []
    for address in sorted(set(before) | set(after)):
        if address not in before:
            changes.append(Change(Kind.TARGET, Action.ADDED, address, target_group=name))
        elif address not in after:
            changes.append(Change(Kind.TARGET, Action.REMOVED, address, target_group=name))
        else:
            keys = _changed_keys(_dump(before[address]), _dump(after[address]))
            if keys:
                changes.append(
                    Change(Kind.TARGET, Action.CHANGED, address, tuple(keys), target_group=name)
                )
    return changes


def _files(old: Config, new: Config, old_digests: Digests, new_digests: Digests) -> list[Change]:
    before, after = tls_files(old), tls_files(new)
    changes = []
    for path in sorted(set(before) | set(after)):
        if path not in before:
            changes.append(Change(Kind.CERTIFICATE, Action.ADDED, path, used_by=after[path]))
        elif path not in after:
            changes.append(Change(Kind.CERTIFICATE, Action.REMOVED, path, used_by=before[path]))
        elif old_digests.get(path) != new_digests.get(path):
            changes.append(Change(Kind.CERTIFICATE, Action.CHANGED, path, used_by=after[path]))
    return changes


def diff(old: Config, new: Config, old_digests: Digests, new_digests: Digests) -> list[Change]:
    """Everything ``new`` changes relative to ``old``; ``[]`` when nothing does. The digests are
    ``read_digests`` of each generation (a file missing from both reads as unchanged)."""
    changes = []
    for section in ("proxy", "admin"):
        keys = _changed_keys(_dump(getattr(old, section)), _dump(getattr(new, section)))
        if keys:
            changes.append(Change(Kind.SETTINGS, Action.CHANGED, section, tuple(keys)))
    changes += _sections(Kind.LISTENER, old.listeners, new.listeners)
    changes += _sections(Kind.TARGET_GROUP, old.target_groups, new.target_groups)
    changes += _sections(Kind.API, old.apis, new.apis)
    for name in sorted(set(old.target_groups) & set(new.target_groups)):
        changes += _targets(name, old.target_groups[name], new.target_groups[name])
    changes += _files(old, new, old_digests, new_digests)
    return changes


def summary(changes: list[Change], limit: int = SUMMARY_LIMIT) -> str:
    """The log line's tail: ``no changes``, or the count and each change, the first ``limit``."""
    if not changes:
        return "no changes"
    parts = [change.describe() for change in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more (the JSON event lists them all)")
    return f"{len(changes)} change{'s' if len(changes) != 1 else ''}: " + "; ".join(parts)
