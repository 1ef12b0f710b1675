"""Typed errors of the fleet backend.

Tree (add new errors here and to the tree; keep it additive)::

    FleetError
    ├── BrokerAdminError        a dynamic-security command was refused by the broker
    ├── DatabaseError
    │   ├── DatabaseUnavailableError   PostgreSQL cannot be reached (retry later)
    │   ├── DuplicateError             a unique constraint refused a row
    │   ├── QueryRefusedError          the database refused a statement's data
    │   └── SchemaVersionError         the database is not at this build's version
    ├── CampaignError           an operator request that the campaign's state refuses
    │   └── NotFoundError       no such campaign, group, package, terminal or webhook
    └── WebhookError            a webhook endpoint request that is not valid
"""


class FleetError(Exception):
    """Base of every error the fleet backend raises on purpose."""


class BrokerAdminError(FleetError):
    """The broker refused (or did not answer) a dynamic-security command.

    Attributes:
        command: The dynamic-security command name, e.g. ``createClient``.
        error: The broker's error text, e.g. ``Client not found``.
    """

    def __init__(self, command: str, error: str) -> None:
        """Keep the command name and the broker's error text."""
        super().__init__(f"{command}: {error}")
        self.command = command
        self.error = error


class DatabaseError(FleetError):
    """The database refused or failed an operation."""


class DatabaseUnavailableError(DatabaseError):
    """PostgreSQL cannot be reached; the caller should back off and retry."""


class TransientConflictError(DatabaseUnavailableError):
    """A deadlock, serialization failure or lock timeout: the same work succeeds if retried.

    A kind of unavailability, so callers that retry an unavailable database retry this
    too, instead of blaming the data (a batch written one by one, a message dead-lettered).
    """


class DuplicateError(DatabaseError):
    """A row already exists.

    Attributes:
        constraint: The unique constraint that refused it.
    """

    def __init__(self, constraint: str) -> None:
        """Keep the constraint's name."""
        super().__init__(f"already exists ({constraint})")
        self.constraint = constraint


class QueryRefusedError(DatabaseError):
    """The database refused a statement because of its data (a type, range or check).

    Attributes:
        sqlstate: PostgreSQL's error code, e.g. ``22003`` (numeric value out of range).
    """

    def __init__(self, sqlstate: str, message: str) -> None:
        """Keep the SQLSTATE and PostgreSQL's message."""
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate


class SchemaVersionError(DatabaseError):
    """The database schema is not the version this build expects; run ``fleet migrate``.

    Attributes:
        expected: The version this build needs.
        found: The version the database has.
    """

    def __init__(self, expected: int, found: int) -> None:
        """Keep both versions."""
        super().__init__(f"schema version {found}, expected {expected}: run `fleet migrate`")
        self.expected = expected
        self.found = found


class CampaignError(FleetError):
    """The request does not fit the campaign's current state.

    Attributes:
        code: A stable code for the wire and the CLI, e.g. ``not_running``.
    """

    def __init__(self, code: str, message: str) -> None:
        """Keep the stable code and the message."""
        super().__init__(message)
        self.code = code


class NotFoundError(CampaignError):
    """No such campaign, group, package or terminal."""

    def __init__(self, what: str, key: str) -> None:
        """Say what was looked for."""
        super().__init__("not_found", f"no {what} {key!r}")
        self.what = what
        self.key = key


class EmbeddedServiceError(FleetError):
    """A private test/demo service (Mosquitto, PostgreSQL) could not be started."""


class WebhookError(FleetError):
    """A webhook endpoint request is not valid (its URL, events or secret).

    Attributes:
        code: A stable code for the wire and the CLI: ``bad_url``, ``bad_events`` or
            ``bad_secret``.
    """

    def __init__(self, code: str, message: str) -> None:
        """Keep the stable code and the message."""
        super().__init__(message)
        self.code = code
