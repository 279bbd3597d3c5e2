"""A single-node Ray head whose every listener is bound to 127.0.0.1.

:class:`LocalRayHead` runs ``ray start --head --block`` as a child process in
its own session and waits until the dashboard responds and the raylet and its
agents listen. It then checks that every listening socket of the session is
on loopback, and stops the head otherwise. It stops the head by process id:
SIGTERM to the ``ray start`` process (which stops the processes it started),
then SIGKILL to whatever is still left in that session (workers Ray forked
into their own process groups). It never calls ``ray stop``, which kills every
Ray process of the user on the machine.

The head is started with:

- ``--node-ip-address=127.0.0.1`` and ``--dashboard-host=127.0.0.1``, plus a
  free loopback port for every other listener (GCS, raylet, object manager,
  dashboard agent, runtime env agent, metrics exporters, Ray client server),
  so two heads can share one network namespace;
- ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0`` by default, so a stop takes
  seconds, not Ray's 30 s drain;
- ``RAY_USAGE_STATS_ENABLED=0`` and ``--disable-usage-stats``;
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``;
- ``RAY_AUTH_MODE`` set explicitly. Ray 2.60 accepts ``token`` and
  ``disabled``. ``token`` (the default here) writes a random token to a
  0600 file in the head's temp dir and points ``RAY_AUTH_TOKEN_PATH`` at it,
  so nothing is written to ``~/.ray``; clients take the token from
  :meth:`LocalRayHead.client_env`.

NOTE: Ray's dashboard still probes cloud metadata addresses (169.254.169.254,
metadata.google.internal) when it detects the cloud provider. Binding to
loopback does not stop outgoing requests, so run the head inside a
loopback-only network namespace (``scripts/loopback.sh``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from types import TracebackType

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
AUTH_MODES = ("token", "disabled")
_HEAD_LOG = "ray-start.log"
# Listeners besides the GCS and the dashboard; each gets a free port.
_PORT_NAMES = (
    "node_manager",
    "object_manager",
    "client_server",
    "agent_http",
    "agent_grpc",
    "runtime_env_agent",
    "metrics",
    "autoscaler_metrics",
    "dashboard_metrics",
)
# Listeners the head needs before it can run a job.
_READY_PORTS = ("node_manager", "agent_http", "agent_grpc", "runtime_env_agent")
_TOKEN_FILE = "auth_token"


class LocalClusterError(RuntimeError):
    """The local Ray head failed to start or to stop."""


@dataclasses.dataclass(frozen=True)
class LocalClusterConfig:
    """Resources, ports and limits of a local Ray head.

    Attributes:
        num_cpus: logical CPUs the head offers (None: Ray counts the machine's).
        num_gpus: GPUs the head offers.
        object_store_memory_bytes: plasma store size (None: Ray's default,
            30% of the machine's memory).
        gcs_port: GCS port (0: a free port).
        dashboard_port: dashboard and job-submission HTTP port (0: a free port).
        auth_mode: ``RAY_AUTH_MODE`` of the head: ``token`` or ``disabled``.
        temp_dir: Ray's session root (None: a new directory under the system
            temp dir, removed on stop). Unix socket paths live under it, so
            keep it short (Linux limits them to 107 bytes).
        start_timeout_s: maximum wait for the dashboard, the raylet and its agents.
        stop_timeout_s: maximum wait for a graceful stop before SIGKILL.
        drain_timeout_s: how long the head drains running work on SIGTERM
            (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S``, Ray's default 30 s).
            0 stops at once, which suits a single-node cluster.
    """

    num_cpus: int | None = None
    num_gpus: int = 0
    object_store_memory_bytes: int | None = None
    gcs_port: int = 0
    dashboard_port: int = 0
    auth_mode: str = "token"
    temp_dir: str | None = None
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 60.0
    drain_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if self.auth_mode not in AUTH_MODES:
            raise ValueError(
                f"invalid auth_mode {self.auth_mode!r}: Ray 2.60 accepts "
                f"{', '.join(AUTH_MODES)}"
            )
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"invalid num_cpus {self.num_cpus}: expected >= 1")
        if self.num_gpus < 0:
            raise ValueError(f"invalid num_gpus {self.num_gpus}: expected >= 0")
        if self.start_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ValueError(
                f"invalid timeouts start_timeout_s={self.start_timeout_s}, "
                f"stop_timeout_s={self.stop_timeout_s}: expected > 0"
            )


class LocalRayHead:
    """Starts and stops one loopback-only Ray head; usable as a context manager.

    Example::

        with LocalRayHead(LocalClusterConfig(num_cpus=2)) as head:
            subprocess.run(["ray", "job", "submit", "--", "python", "x.py"],
                           env={**os.environ, **head.client_env()}, check=True)
    """

    def __init__(self, config: LocalClusterConfig | None = None) -> None:
        self.config = config or LocalClusterConfig()
        self._process: subprocess.Popen[bytes] | None = None
        self._temp_dir: str | None = None
        self._owns_temp_dir = False
        self._token_path: str | None = None
        self.gcs_port = 0
        self.dashboard_port = 0
        self._ports: dict[str, int] = {}

    @property
    def address(self) -> str:
        """GCS address for ``ray.init(address=...)``."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard and job-submission URL for ``ray job submit --address``."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def temp_dir(self) -> str:
        if self._temp_dir is None:
            raise LocalClusterError("the head is not started; call start() first")
        return self._temp_dir

    @property
    def log_path(self) -> str:
        """Output of the ``ray start`` process."""
        return os.path.join(self.temp_dir, _HEAD_LOG)

    @property
    def pid(self) -> int | None:
        """Process id of ``ray start`` (also the id of the head's session)."""
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client_env(self) -> dict[str, str]:
        """Environment variables a client (``ray job submit``, ``ray.init``)
        needs to reach this head: addresses, auth mode and token file."""
        env = {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": self.config.auth_mode,
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        if self._token_path is not None:
            env["RAY_AUTH_TOKEN_PATH"] = self._token_path
        return env

    @contextlib.contextmanager
    def client_environment(self) -> Iterator[dict[str, str]]:
        """Set :meth:`client_env` in ``os.environ`` for the block, then restore it."""
        env = self.client_env()
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        _reload_ray_auth_config()
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _reload_ray_auth_config()

    def start(self) -> LocalRayHead:
        """Start the head and wait until its dashboard responds and its agents listen.

        Raises:
            LocalClusterError: ``ray start`` exited or the dashboard did not
                respond within ``start_timeout_s``; the message contains the end of
                the head's log, and the processes started so far are stopped.
        """
        if self._process is not None:
            raise LocalClusterError(f"the head is already running (pid {self.pid})")
        config = self.config
        self._temp_dir = config.temp_dir or tempfile.mkdtemp(prefix="kdray-")
        self._owns_temp_dir = config.temp_dir is None
        os.makedirs(self._temp_dir, exist_ok=True)
        if config.auth_mode == "token":
            self._token_path = _write_token(self._temp_dir)
        ports = _free_ports(2 + len(_PORT_NAMES))
        self.gcs_port = config.gcs_port or ports[0]
        self.dashboard_port = config.dashboard_port or ports[1]
        self._ports = dict(zip(_PORT_NAMES, ports[2:]))
        command = self._command()
        logger.info(
            "starting Ray head on %s (dashboard %s, auth %s, temp dir %s)",
            self.address,
            self.dashboard_url,
            config.auth_mode,
            self._temp_dir,
        )
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._head_env(),
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        exposed = [s for s in self.listening_sockets() if not s.is_loopback]
        if exposed:
            self.stop()
            raise LocalClusterError(
                "the Ray head listens beyond loopback: "
                + ", ".join(f"{s.address}:{s.port} (pid {s.pid})" for s in exposed)
                + "; it was stopped. Check for RAY_* variables that override "
                "the bind address"
            )
        logger.info("Ray head ready (pid %d)", self._process.pid)
        return self

    def listening_sockets(self) -> list[ListeningSocket]:
        """TCP listeners of every process in the head's session."""
        if self._process is None:
            return []
        return listening_sockets(session_processes(self._process.pid))

    def stop(self) -> None:
        """Stop the head and every process left in its session; idempotent.

        Raises:
            LocalClusterError: a process of the session survived SIGKILL.
        """
        process = self._process
        if process is None:
            return
        session = process.pid
        if process.poll() is None:
            logger.info("stopping Ray head (pid %d)", process.pid)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "Ray head (pid %d) still running %.0f s after SIGTERM; killing it",
                    process.pid,
                    self.config.stop_timeout_s,
                )
                process.kill()
                process.wait(timeout=10)
        leftover = _kill_session(session, timeout_s=10.0)
        self._process = None
        if leftover:
            raise LocalClusterError(
                f"processes {leftover} of the Ray head's session {session} survived "
                "SIGKILL; check them with `ps -o pid,stat,args -p "
                f"{','.join(map(str, leftover))}`"
            )
        if self._owns_temp_dir and self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
        self._temp_dir = None
        self._token_path = None

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self) -> list[str]:
        config = self.config
        ports = self._ports
        command = [
            _ray_executable(),
            "start",
            "--head",
            "--block",
            f"--node-ip-address={LOOPBACK}",
            f"--port={self.gcs_port}",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}",
            "--include-dashboard=true",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--ray-client-server-port={ports['client_server']}",
            f"--dashboard-agent-listen-port={ports['agent_http']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--num-gpus={config.num_gpus}",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            "--log-style=record",
            "--log-color=false",
        ]
        if config.num_cpus is not None:
            command.append(f"--num-cpus={config.num_cpus}")
        if config.object_store_memory_bytes is not None:
            command.append(f"--object-store-memory={config.object_store_memory_bytes}")
        return command

    def _head_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Job entrypoints run `python`, so put the interpreter that runs Ray first.
        python_bin = os.path.dirname(sys.executable)
        env["PATH"] = os.pathsep.join([python_bin, env.get("PATH", "")])
        env.update(
            {
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": self.config.auth_mode,
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(
                    self.config.drain_timeout_s
                ),
                # Ray 2.60 defaults these two to fixed ports (44217, 44227).
                "AUTOSCALER_METRIC_PORT": str(self._ports["autoscaler_metrics"]),
                "DASHBOARD_METRIC_PORT": str(self._ports["dashboard_metrics"]),
            }
        )
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)
        if self._token_path is not None:
            env["RAY_AUTH_TOKEN_PATH"] = self._token_path
        else:
            env.pop("RAY_AUTH_TOKEN_PATH", None)
        return env

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.config.start_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise LocalClusterError(
                    f"`ray start` exited with code {code} before the head was ready. "
                    f"End of {self.log_path}:\n{self.log_tail()}"
                )
            status, last_error = self._probe_dashboard()
            closed = [n for n in _READY_PORTS if not _accepts(self._ports[n])]
            if status == 200 and not closed:
                return
            if status == 200:
                last_error = f"dashboard up, not yet listening: {', '.join(closed)}"
            time.sleep(0.5)
        raise LocalClusterError(
            f"the Ray head at {self.dashboard_url} was not ready within "
            f"{self.config.start_timeout_s:.0f} s (last: {last_error}); raise "
            f"start_timeout_s on a loaded machine. End of {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def _probe_dashboard(self) -> tuple[int, str]:
        request = urllib.request.Request(f"{self.dashboard_url}/api/version")
        if self._token_path is not None:
            with open(self._token_path) as f:
                request.add_header("Authorization", f"Bearer {f.read().strip()}")
        # An empty ProxyHandler keeps http_proxy settings off loopback requests.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=2.0) as response:
                json.loads(response.read() or b"{}")
                return int(response.status), "ok"
        except urllib.error.HTTPError as e:
            return int(e.code), f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            return 0, f"{type(e).__name__}: {e}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(cannot read the log: {e})"


def _reload_ray_auth_config() -> None:
    """Make this process re-read ``RAY_AUTH_MODE`` and its token.

    Ray 2.60 reads them once, when ``ray`` is first imported, and keeps them
    in its C++ config. A client that imported ray before the variables were
    set would otherwise connect without the token. Ray's own ``ray.init()``
    makes the same calls when it switches a new local cluster to token mode.
    """
    if "ray" not in sys.modules:
        return
    from ray._raylet import (  # type: ignore[attr-defined]
        AuthenticationTokenLoader,
        Config,
    )

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _ray_executable() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("ray")
    if found is None:
        raise LocalClusterError(
            "the `ray` command is not installed next to "
            f"{sys.executable} nor on PATH; install it with "
            "`pip install 'ray[default,train]==2.60.0'`"
        )
    return found


def _write_token(directory: str) -> str:
    path = os.path.join(directory, _TOKEN_FILE)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def session_processes(session: int) -> list[int]:
    """Return the ids of live processes in session ``session`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, session.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 3 and int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry))
    return found


@dataclasses.dataclass(frozen=True)
class ListeningSocket:
    """A TCP socket in LISTEN state and the process that owns it."""

    pid: int
    address: str
    port: int

    @property
    def is_loopback(self) -> bool:
        return self.address in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening_sockets(pids: Sequence[int]) -> list[ListeningSocket]:
    """Return the TCP listeners owned by ``pids``, read from /proc (Linux, this
    network namespace only)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes[target[len("socket:[") : -1]] = pid
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)  # header
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                    continue
                address_hex, port_hex = local.split(":")
                found.append(
                    ListeningSocket(
                        inodes[inode], _proc_net_address(address_hex), int(port_hex, 16)
                    )
                )
    return found


def _proc_net_address(hex_address: str) -> str:
    """Decode /proc/net/tcp{,6} addresses: 32-bit words in host (little) byte order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    if words[:12] == b"\x00" * 10 + b"\xff\xff":
        return "::ffff:" + socket.inet_ntop(socket.AF_INET, words[12:])
    return socket.inet_ntop(socket.AF_INET6, words)


def _kill_session(session: int, timeout_s: float) -> list[int]:
    """SIGKILL every process left in ``session``; returns those still alive."""
    deadline = time.monotonic() + timeout_s
    remaining = session_processes(session)
    if remaining:
        logger.info(
            "killing %d leftover processes of the Ray head's session %d: %s",
            len(remaining),
            session,
            remaining,
        )
    while remaining and time.monotonic() < deadline:
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        remaining = session_processes(session)
    return remaining


def main(argv: Sequence[str] | None = None) -> int:
    """Run a loopback-only head in the foreground until SIGINT or SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m cluster.local",
        description="Run a loopback-only Ray head until interrupted, then stop it.",
    )
    parser.add_argument("--num_cpus", type=int, default=None, help="logical CPUs")
    parser.add_argument("--num_gpus", type=int, default=0, help="GPUs")
    parser.add_argument("--port", type=int, default=0, help="GCS port (0: free)")
    parser.add_argument(
        "--dashboard_port", type=int, default=0, help="dashboard port (0: free)"
    )
    parser.add_argument("--auth_mode", choices=AUTH_MODES, default="token")
    parser.add_argument(
        "--start_timeout_s", type=float, default=120.0, help="start limit, seconds"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    head = LocalRayHead(
        LocalClusterConfig(
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            gcs_port=args.port,
            dashboard_port=args.dashboard_port,
            auth_mode=args.auth_mode,
            start_timeout_s=args.start_timeout_s,
        )
    )
    # SIGTERM takes the same path as Ctrl-C, so the head is always stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    head.start()
    try:
        print("# export these in the shell that runs `ray job submit`:")
        for key, value in head.client_env().items():
            print(f"export {key}={value}")
        sys.stdout.flush()
        while head.is_running():
            time.sleep(1.0)
        print(
            f"error: the Ray head exited on its own. End of its log:\n{head.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        head.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
