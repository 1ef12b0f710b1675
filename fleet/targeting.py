"""Who takes part in a campaign, and why the others do not.

A member of the campaign's groups is excluded, with a stable reason, when the target filter
does not select it or the bundle cannot install on it: a package not made for its model, a
current version the package cannot upgrade from, an unmet dependency, or a downgrade the
campaign does not allow.
"""

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.policy import TargetFilter, version_key


class Exclusion(enum.StrEnum):
    """Why a terminal is not in a campaign. DO NOT CHANGE: stored and on dashboards."""

    FILTER = "filter"
    OPERATOR = "operator"
    INCOMPATIBLE_MODEL = "incompatible_model"
    INCOMPATIBLE_VERSION = "incompatible_version"
    UNMET_DEPENDENCY = "unmet_dependency"
    DOWNGRADE = "downgrade"


@dataclass(frozen=True)
class Package:
    """What targeting needs of a bundle package."""

    name: str
    version: str
    models: tuple[str, ...]
    #: Versions this package upgrades from (empty: any).
    from_versions: tuple[str, ...] = ()
    #: name -> minimum version that must be installed (or installed earlier in the bundle).
    requires: Mapping[str, str] | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Package":
        """Build from a packages row (or its JSON form)."""
        return cls(
            name=row["name"],
            version=row["version"],
            models=tuple(row["models"]),
            from_versions=tuple(row.get("from_versions") or ()),
            requires=dict(row.get("requires") or {}),
        )


@dataclass(frozen=True)
class Terminal:
    """What targeting needs of a terminal."""

    id: str
    model: str
    merchant_id: str
    versions: Mapping[str, str]
    attributes: Mapping[str, str]


def exclusion(
    terminal: Terminal,
    target: TargetFilter,
    bundle: Sequence[Package],
    *,
    allow_downgrade: bool,
    in_source_campaign: bool = True,
) -> tuple[Exclusion, str] | None:
    """Return why the terminal is excluded, or None when it takes part."""
    if terminal.model in target.exclude_models:
        return Exclusion.OPERATOR, f"model {terminal.model} excluded by an operator"
    unmatched = _unmatched_clause(terminal, target, in_source_campaign=in_source_campaign)
    if unmatched is not None:
        return Exclusion.FILTER, unmatched
    installed = dict(terminal.versions)
    for package in bundle:
        problem = _package_problem(terminal.model, installed, package, allow_downgrade)
        if problem is not None:
            return problem
        # Later packages of the bundle may depend on this one.
        installed[package.name] = package.version
    return None


def _package_problem(
    model: str, installed: Mapping[str, str], package: Package, allow_downgrade: bool
) -> tuple[Exclusion, str] | None:
    label = f"{package.name} {package.version}"
    if package.models and model not in package.models:
        return Exclusion.INCOMPATIBLE_MODEL, f"{label} is not for {model}"
    current = installed.get(package.name)
    if current == package.version:
        return None
    if package.from_versions and current not in package.from_versions:
        return Exclusion.INCOMPATIBLE_VERSION, f"{label} does not upgrade from {current or 'none'}"
    if (
        current is not None
        and not allow_downgrade
        and version_key(package.version) < version_key(current)
    ):
        return Exclusion.DOWNGRADE, f"{package.name} {current} -> {package.version} is a downgrade"
    for needed, minimum in (package.requires or {}).items():
        have = installed.get(needed)
        if have is None or version_key(have) < version_key(minimum):
            detail = f"{label} needs {needed} >= {minimum}, has {have or 'none'}"
            return Exclusion.UNMET_DEPENDENCY, detail
    return None


def _unmatched_clause(
    terminal: Terminal, target: TargetFilter, *, in_source_campaign: bool
) -> str | None:
    """The first filter clause the terminal fails, described; None if it matches all."""
    region = terminal.attributes.get("region")
    checks: list[tuple[bool, str]] = [
        (
            target.models is None or terminal.model in target.models,
            f"model {terminal.model} not in filter",
        ),
        (
            target.merchants is None or terminal.merchant_id in target.merchants,
            f"merchant {terminal.merchant_id} not in filter",
        ),
        (
            target.regions is None or region in target.regions,
            f"region {region or 'none'} not in filter",
        ),
        (
            target.from_campaign is None or in_source_campaign,
            f"not in campaign {target.from_campaign}",
        ),
    ]
    for name, allowed in (target.versions or {}).items():
        have = terminal.versions.get(name)
        checks.append((have in allowed, f"{name} {have or 'none'} not in filter"))
    for key, allowed in (target.attributes or {}).items():
        value = terminal.attributes.get(key)
        checks.append((value in allowed, f"{key} {value or 'none'} not in filter"))
    return next((message for ok, message in checks if not ok), None)
