"""RFC 9457 problem details: the one shape every error takes on its way to a caller.

Code anywhere in the gateway raises `Problem`; the app turns it into an
`application/problem+json` response. Nothing else ever reaches a caller as an error,
so no stack trace or internal name can leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "urn:aigw:problem:"


@dataclass(frozen=True)
class FieldError:
    """One bad part of a request: a JSON pointer (RFC 6901) into the body, or a header name."""

    pointer: str
    detail: str
    header: str | None = None

    def to_dict(self) -> dict[str, str]:
        if self.header is not None:
            return {"header": self.header, "detail": self.detail}
        return {"pointer": self.pointer, "detail": self.detail}


@dataclass
class Problem(Exception):
    """An error a caller may see; `slug` becomes the problem `type` URI."""

    status: int
    slug: str
    title: str
    detail: str = ""
    errors: list[FieldError] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def to_dict(self, instance: str | None = None) -> dict:
        body: dict = {
            "type": TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            body["detail"] = self.detail
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = [e.to_dict() for e in self.errors]
        return body


class FaultsError(Exception):
    """Operator-edited input that failed its checks; `faults` lists each as one line,
    `file: field: message`, so a CLI prints them and an API returns them as they are."""

    def __init__(self, faults: list[str]) -> None:
        super().__init__("\n".join(faults))
        self.faults = faults


def json_pointer(parts: list[str | int]) -> str:
    """Build an RFC 6901 pointer, escaping `~` and `/` inside keys."""
    escaped = (str(p).replace("~", "~0").replace("/", "~1") for p in parts)
    return "".join("/" + p for p in escaped)
