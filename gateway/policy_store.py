"""Policy versions: bundles of operator-edited files, validated whole, numbered, reversible.

A bundle is the text of every file in `policies/` and `fallbacks/`. Files stay the source
of truth (GitOps); an apply through the admin API or a change on disk becomes a new bundle,
checked exactly as start-up checks files, and only a bundle that passes every check is
applied. Each applied bundle is kept in the history with a number, its content hash, its
author and its time, so any earlier version can be applied again (a rollback).
"""

from __future__ import annotations

import difflib
import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from gateway.problems import FaultsError
from gateway.runtime import Configuration, load_configuration
from gateway.settings import Settings

BUNDLE_SECTIONS = ("policies", "fallbacks")
MAX_FILE_BYTES = 1024 * 1024
_FILE_NAME = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class BundleError(FaultsError):
    """A bundle that cannot be applied; `faults` are `section/file: field: message` lines."""


@dataclass(frozen=True)
class Bundle:
    """The text of every policy and fallback file, by section and file name."""

    policies: Mapping[str, str]
    fallbacks: Mapping[str, str]

    @property
    def content_hash(self) -> str:
        canonical = orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical).hexdigest()

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"policies": dict(self.policies), "fallbacks": dict(self.fallbacks)}

    @classmethod
    def from_dict(cls, data: object) -> Bundle:
        """A bundle from untrusted JSON, or BundleError naming what is malformed."""
        faults = bundle_shape_faults(data)
        if faults:
            raise BundleError(faults)
        assert isinstance(data, dict)
        return cls(policies=dict(data["policies"]), fallbacks=dict(data["fallbacks"]))


def bundle_shape_faults(data: object) -> list[str]:
    """Why `data` is not `{"policies": {name: text}, "fallbacks": {name: text}}`."""
    if not isinstance(data, dict) or set(data) != set(BUNDLE_SECTIONS):
        return ["/: must be an object with exactly `policies` and `fallbacks`"]
    faults = []
    for section in BUNDLE_SECTIONS:
        files = data[section]
        if not isinstance(files, dict) or not files:
            faults.append(f"/{section}: must be a non-empty object of file name to YAML text")
            continue
        for name, text in files.items():
            if not _safe_file_name(name):
                faults.append(f"/{section}/{name}: file names are [a-z0-9._-]+.yaml")
            elif not isinstance(text, str) or len(text.encode()) > MAX_FILE_BYTES:
                faults.append(f"/{section}/{name}: must be YAML text of at most 1 MiB")
    return faults


def _safe_file_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name.endswith((".yaml", ".yml"))
        and 0 < len(name) <= 128
        and set(name) <= _FILE_NAME
        and not name.startswith(".")
    )


def read_bundle(policies_dir: Path, fallbacks_dir: Path) -> Bundle:
    """The bundle on disk now; BundleError names each file that cannot be read as text."""
    faults: list[str] = []
    policies = _read_section(policies_dir, "policies", faults)
    fallbacks = _read_section(fallbacks_dir, "fallbacks", faults)
    if faults:
        raise BundleError(faults)
    return Bundle(policies=policies, fallbacks=fallbacks)


def _read_section(directory: Path, section: str, faults: list[str]) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    files = {}
    for path in sorted(directory.iterdir()):
        if path.suffix not in (".yaml", ".yml"):
            continue
        try:
            if path.is_file():
                files[path.name] = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue  # removed since the directory was listed (an editor's scratch file)
        except (OSError, UnicodeDecodeError) as error:
            faults.append(f"{section}/{path.name}: cannot be read: {' '.join(str(error).split())}")
    return files


def load_bundle(bundle: Bundle, settings: Settings, env: Mapping[str, str]) -> Configuration:
    """Check `bundle` exactly as start-up checks files; BundleError lists every fault.

    The bundle is written to a private temporary directory and loaded from there, so one
    code path checks files on disk and bundles sent to the admin API alike.
    """
    with tempfile.TemporaryDirectory(prefix="aigw-bundle-") as scratch:
        root = Path(scratch)
        for section in BUNDLE_SECTIONS:
            (root / section).mkdir()
            for name, text in getattr(bundle, section).items():
                (root / section / name).write_text(text, encoding="utf-8")
        scoped = settings.model_copy(
            update={"policies_dir": root / "policies", "fallbacks_dir": root / "fallbacks"}
        )
        try:
            return load_configuration(scoped, env)
        except FaultsError as error:
            prefix = str(root) + "/"
            raise BundleError([f.replace(prefix, "") for f in error.faults]) from None


def bundle_diff(running: Bundle, proposed: Bundle) -> str:
    """A unified diff, file by file, from the running bundle to the proposed one."""
    chunks: list[str] = []
    for section in BUNDLE_SECTIONS:
        before, after = getattr(running, section), getattr(proposed, section)
        for name in sorted(set(before) | set(after)):
            chunks.extend(
                difflib.unified_diff(
                    before.get(name, "").splitlines(keepends=True),
                    after.get(name, "").splitlines(keepends=True),
                    fromfile=f"running/{section}/{name}",
                    tofile=f"proposed/{section}/{name}",
                )
            )
    return "".join(chunks)


@dataclass(frozen=True)
class PolicyVersion:
    """One applied bundle."""

    number: int
    content_hash: str
    author: str
    applied_at: str
    bundle: Bundle
    source: str

    def summary(self) -> dict[str, object]:
        return {
            "version": self.number,
            "content_hash": self.content_hash,
            "author": self.author,
            "applied_at": self.applied_at,
            "source": self.source,
        }


@dataclass
class PolicyHistory:
    """Every version applied in this process, newest last."""

    versions: list[PolicyVersion] = field(default_factory=list)

    @property
    def current(self) -> PolicyVersion | None:
        return self.versions[-1] if self.versions else None

    def record(self, bundle: Bundle, author: str, source: str) -> PolicyVersion:
        version = PolicyVersion(
            number=len(self.versions) + 1,
            content_hash=bundle.content_hash,
            author=author,
            applied_at=datetime.now(UTC).isoformat(timespec="seconds"),
            bundle=bundle,
            source=source,
        )
        self.versions.append(version)
        return version

    def find(self, number: int) -> PolicyVersion | None:
        return self.versions[number - 1] if 0 < number <= len(self.versions) else None
