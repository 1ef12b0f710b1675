"""Private Mosquitto and PostgreSQL servers for the tests and the demo.

Each service runs as a child process on a loopback port of its own, with its files under
a work directory the caller owns. Every started process is stopped at interpreter exit
if the caller forgot, and every stopped process is waited for, so none is left behind as
an orphan or a zombie.
"""

import atexit
import contextlib
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import urlsplit, urlunsplit

from fleet import dynsec
from fleet.errors import EmbeddedServiceError

logger = logging.getLogger(__name__)

LOOPBACK: Final = "127.0.0.1"
#: The committed broker configuration that the local one is rendered from.
BROKER_CONFIG: Final = Path(__file__).resolve().parent.parent / "broker_config" / "mosquitto.conf"
#: The only settings `render_mosquitto_config` changes (plus `user`, which it may add).
RENDERED_KEYS: Final = frozenset(
    {"listener", "persistence_location", "plugin", "plugin_opt_config_file", "log_dest", "user"}
)

# Linux hands out ephemeral ports from 32768 up, where TIME_WAIT sockets of load tests
# linger; a server port below it cannot collide with them.
_PORT_RANGE: Final = (10_000, 32_767)
_STOP_TIMEOUT_S: Final = 15.0
_PLUGIN_CANDIDATES: Final = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/lib/*/mosquitto_dynamic_security.so",
)

_running: dict[int, Callable[[], None]] = {}


@atexit.register
def _stop_forgotten() -> None:
    for stop in list(_running.values()):
        with contextlib.suppress(Exception):
            stop()


def free_port() -> int:
    """Return a TCP port on the loopback address that is free now, below 32768."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise EmbeddedServiceError("no free port found below 32768")


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_ready(
    proc: "subprocess.Popen[bytes]",
    ready: Callable[[], bool],
    *,
    what: str,
    log: Path,
    timeout_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise EmbeddedServiceError(
                f"{what} exited with status {proc.returncode}; log tail:\n{_log_tail(log)}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise EmbeddedServiceError(
                f"{what} not ready after {timeout_s:.0f}s; log tail:\n{_log_tail(log)}"
            )
        time.sleep(0.02)


def _terminate(proc: "subprocess.Popen[bytes]", sig: signal.Signals) -> None:
    """Signal a child and reap it; escalate to SIGKILL if it does not go in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored %s; killing it", proc.pid, sig.name)
            proc.kill()
            proc.wait()


def _is_root() -> bool:
    return os.geteuid() == 0


# -- Mosquitto --------------------------------------------------------------------------


def find_dynsec_plugin() -> str:
    """Return the path of Mosquitto's dynamic-security plugin on this machine.

    Raises:
        EmbeddedServiceError: the plugin is not installed.
    """
    for pattern in _PLUGIN_CANDIDATES:
        for path in sorted(Path("/").glob(pattern.lstrip("/"))):
            return str(path)
    raise EmbeddedServiceError(
        "mosquitto_dynamic_security.so not found; install the Debian package 'mosquitto'"
    )


def find_mosquitto() -> str:
    """Return the path of the ``mosquitto`` broker binary.

    Raises:
        EmbeddedServiceError: Mosquitto is not installed.
    """
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if found is None:
        raise EmbeddedServiceError("mosquitto not found; install the Debian package 'mosquitto'")
    return found


def render_mosquitto_config(
    template: str,
    *,
    host: str,
    port: int,
    data_dir: Path,
    plugin: str,
    dynsec_file: Path,
    log_file: Path,
    as_root: bool,
) -> str:
    """Rewrite the committed broker configuration for a local, private broker.

    Only the keys in `RENDERED_KEYS` change; every other line is kept verbatim.

    Args:
        template: Text of broker_config/mosquitto.conf.
        host: Address to listen on.
        port: Port to listen on.
        data_dir: Persistence directory.
        plugin: Path of the dynamic-security plugin.
        dynsec_file: The plugin's JSON file.
        log_file: Where the broker logs.
        as_root: Add ``user root``, so a broker started by root keeps access to its files
            instead of dropping privileges to the ``mosquitto`` user.
    """
    replacements = {
        "listener": f"listener {port} {host}",
        "persistence_location": f"persistence_location {data_dir}/",
        "plugin": f"plugin {plugin}",
        "plugin_opt_config_file": f"plugin_opt_config_file {dynsec_file}",
        "log_dest": f"log_dest file {log_file}",
    }
    out: list[str] = []
    for line in template.splitlines():
        key = (
            line.split(maxsplit=1)[0] if line.strip() and not line.lstrip().startswith("#") else ""
        )
        if key == "user":
            continue
        out.append(replacements.get(key, line))
    if as_root:
        out.append("user root")
    return "\n".join(out) + "\n"


class Mosquitto:
    """A private Mosquitto broker, configured like production, on a loopback port."""

    host: str = LOOPBACK

    def __init__(
        self, *, controller_username: str = "controller", template: Path = BROKER_CONFIG
    ) -> None:
        """Prepare (not start) a broker.

        Args:
            controller_username: Username of the bootstrap controller identity.
            template: The broker configuration to render.
        """
        self.controller_username = controller_username
        self.template = template
        self.workdir = Path()
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The listener port (known once started)."""
        if self._port is None:
            raise EmbeddedServiceError("broker not started")
        return self._port

    @property
    def pid(self) -> int:
        """Process id of the running broker."""
        if self._proc is None:
            raise EmbeddedServiceError("broker not running")
        return self._proc.pid

    @property
    def config_file(self) -> Path:
        """The rendered configuration file."""
        return self.workdir / "mosquitto.conf"

    @property
    def dynsec_file(self) -> Path:
        """The dynamic-security JSON file."""
        return self.workdir / "data" / "dynamic-security.json"

    @property
    def log_file(self) -> Path:
        """The broker's log."""
        return self.workdir / "mosquitto.log"

    def start(
        self,
        workdir: Path,
        controller_password: str,
        port: int | None = None,
        *,
        terminals: Sequence[str] = (),
        terminal_secret: str = "",
        replicas: Sequence[str] = (),
    ) -> None:
        """Render the configuration, bootstrap dynamic security and start the broker.

        The dynamic-security file is written only if absent, so identities added at run
        time survive a stop and a new start on the same work directory.

        Args:
            workdir: Directory for the configuration, data and log; created if missing.
            controller_password: Password of the bootstrap controller identities.
            port: Listener port; a free one when omitted.
            terminals: Terminal ids to provision in the bootstrap file (fast, unlike
                provisioning thousands at run time).
            terminal_secret: The secret their passwords are derived from.
            replicas: More controller usernames (cluster mode), same password.

        Raises:
            EmbeddedServiceError: the broker exited or did not listen in time.
        """
        self.workdir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        if not self.dynsec_file.exists():
            dynsec.write_bootstrap(
                self.dynsec_file,
                self.controller_username,
                controller_password,
                terminals=terminals,
                terminal_secret=terminal_secret,
                replicas=replicas,
            )
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            self._port = port if port is not None else free_port()
            try:
                self._launch()
            except EmbeddedServiceError:
                if attempt + 1 == attempts:
                    raise
                logger.warning("broker failed on port %d; trying another", self._port)
            else:
                return

    def _launch(self) -> None:
        config = render_mosquitto_config(
            self.template.read_text(),
            host=self.host,
            port=self.port,
            data_dir=self.workdir / "data",
            plugin=find_dynsec_plugin(),
            dynsec_file=self.dynsec_file,
            log_file=self.log_file,
            as_root=_is_root(),
        )
        self.config_file.write_text(config)
        stderr = (self.workdir / "mosquitto.stderr").open("ab")
        with stderr:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [find_mosquitto(), "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,
            )
        _running[id(self)] = self.kill
        try:
            _wait_ready(
                self._proc,
                lambda: _port_open(self.host, self.port),
                what="mosquitto",
                log=self.log_file,
                timeout_s=15,
            )
        except EmbeddedServiceError:
            self.kill()
            raise
        logger.info("mosquitto pid %d listening on %s:%d", self.pid, self.host, self.port)

    def _forget(self) -> None:
        _running.pop(id(self), None)
        self._proc = None

    def stop(self) -> None:
        """Stop the broker cleanly (SIGTERM): it saves its persistence file first."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGTERM)
            self._forget()

    def kill(self) -> None:
        """Kill the broker (SIGKILL): like a crash, unsaved state is lost."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGKILL)
            self._forget()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        self._launch()


# -- PostgreSQL -------------------------------------------------------------------------


class PostgresServer(Protocol):
    """What tests need of a PostgreSQL server, private or external."""

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URL for a database on this server."""

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create a database, optionally as a copy of `template`."""


def find_postgres_bindir() -> Path:
    """Return the directory holding ``initdb``, ``postgres`` and ``pg_isready``.

    Raises:
        EmbeddedServiceError: no PostgreSQL server binaries are installed.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise EmbeddedServiceError(
        "PostgreSQL server binaries (initdb) not found; install the Debian package "
        "'postgresql' (e.g. postgresql-15)"
    )


def _createdb(bindir: Path, connection: list[str], name: str, template: str | None) -> None:
    argv = [str(bindir / "createdb"), *connection]
    if template is not None:
        argv += ["--template", template]
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [*argv, "--", name], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise EmbeddedServiceError(f"createdb {name} failed: {result.stderr.strip()}")


class Postgres:
    """A private PostgreSQL server on a loopback port, trusting local connections."""

    host: str = LOOPBACK
    user: str = "postgres"

    def __init__(self) -> None:
        """Prepare (not start) a server."""
        self.workdir = Path()
        self._bindir = find_postgres_bindir()
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The listener port (known once started)."""
        if self._port is None:
            raise EmbeddedServiceError("postgres not started")
        return self._port

    @property
    def pid(self) -> int:
        """Process id of the postmaster."""
        if self._proc is None:
            raise EmbeddedServiceError("postgres not running")
        return self._proc.pid

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.workdir / "data"

    @property
    def socket_dir(self) -> Path:
        """Where the server puts its unix socket."""
        return self.workdir / "run"

    @property
    def log_file(self) -> Path:
        """The server's log."""
        return self.workdir / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        """Return a libpq URL for a database on this server."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create a database, optionally as a copy of `template`.

        Raises:
            EmbeddedServiceError: ``createdb`` failed (e.g. the name exists).
        """
        connection = ["-h", self.host, "-p", str(self.port), "-U", self.user]
        _createdb(self._bindir, connection, name, template)

    @property
    def _os_user(self) -> str | None:
        # PostgreSQL refuses to run as root; as root, run it as the `postgres` OS user.
        return self.user if _is_root() else None

    def _check_reachable(self) -> None:
        if not _is_root():
            return
        uid = pwd.getpwnam(self.user).pw_uid
        for directory in [self.workdir.resolve(), *self.workdir.resolve().parents]:
            mode = directory.stat()
            if not (mode.st_mode & 0o001 or mode.st_uid == uid):
                raise EmbeddedServiceError(
                    f"{directory} is not searchable by the '{self.user}' OS user; put the "
                    "PostgreSQL work directory elsewhere (e.g. tempfile.mkdtemp())"
                )

    def start(self, workdir: Path, port: int | None = None) -> None:
        """Create the cluster if needed and start the server.

        Args:
            workdir: Directory for the data, socket and log; created if missing. As root,
                it must be searchable by the ``postgres`` OS user.
            port: Listener port; a free one when omitted.

        Raises:
            EmbeddedServiceError: initdb failed, or the server did not get ready in time.
        """
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._check_reachable()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._port = port if port is not None else free_port()
        self._launch()

    def _initdb(self) -> None:
        for directory in (self.data_dir, self.socket_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
            if _is_root():
                shutil.chown(directory, self.user, self.user)
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [
                str(self._bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                # Only initdb's own final flush is skipped; the server runs with fsync on.
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.data_dir,
            user=self._os_user,
            group=self._os_user,
            extra_groups=[] if self._os_user else None,
        )
        if result.returncode != 0:
            raise EmbeddedServiceError(f"initdb failed:\n{result.stdout}\n{result.stderr}")
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# fleet test server\n"
                "listen_addresses = '127.0.0.1'\n"
                "max_connections = 200\n"
                "fsync = on\n"
                "logging_collector = off\n"
                "log_min_messages = warning\n"
            )

    def _launch(self) -> None:
        log = self.log_file.open("ab")
        with log:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [
                    str(self._bindir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.socket_dir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.data_dir,
                start_new_session=True,
                user=self._os_user,
                group=self._os_user,
                extra_groups=[] if self._os_user else None,
            )
        _running[id(self)] = self.kill
        try:
            _wait_ready(
                self._proc, self._is_ready, what="postgres", log=self.log_file, timeout_s=60
            )
        except EmbeddedServiceError:
            self.kill()
            raise
        logger.info("postgres pid %d listening on %s:%d", self.pid, self.host, self.port)

    def _is_ready(self) -> bool:
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [
                str(self._bindir / "pg_isready"),
                "-q",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "postgres",
            ],
            check=False,
        )
        return result.returncode == 0

    def _forget(self) -> None:
        _running.pop(id(self), None)
        self._proc = None

    def stop(self) -> None:
        """Stop with a fast shutdown (SIGINT): sessions are cut, the data is flushed."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGINT)
            self._forget()

    def kill(self) -> None:
        """Stop with an immediate shutdown (SIGQUIT): like a crash, recovery on start."""
        if self._proc is not None:
            _terminate(self._proc, signal.SIGQUIT)
            self._forget()

    def restart(self) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        self._launch()


class ExternalPostgres:
    """A PostgreSQL server someone else runs, given by a libpq URL."""

    def __init__(self, url: str) -> None:
        """Remember the server's URL (its database part is replaced per use)."""
        self.url = url

    def dsn(self, dbname: str = "postgres") -> str:
        """Return the URL with `dbname` as its database."""
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path=f"/{dbname}"))

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create a database, optionally as a copy of `template`.

        Raises:
            EmbeddedServiceError: ``createdb`` failed or is not installed.
        """
        createdb = shutil.which("createdb")
        bindir = Path(createdb).parent if createdb else find_postgres_bindir()
        _createdb(bindir, [f"--maintenance-db={self.dsn()}"], name, template)
