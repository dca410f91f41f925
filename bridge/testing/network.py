"""A real network between the bridge and its peers, for fault tests: namespaces, faults, latency.

Loopback hides what a network does to a connection: packets are never lost, a dead peer answers
with a reset at once, nothing is slow. This module puts a real (virtual) link in the path:

* :class:`NetNamespace`: a network namespace of its own (``eb-<pid>-<n>``) joined to the test's
  namespace by a veth pair on a private /30 out of ``10.203.0.0/16``: the host end is ``.1``
  (e.g. ``10.203.18.1``), the namespace end ``.2``. The block is picked so that it overlaps no
  address or route of the host (under a lock, so parallel runs cannot pick the same one), and
  only these namespace addresses are ever a target: while the harness is in use the rest of
  the pool is an ``unreachable`` route, so a client still aiming at a deleted namespace gets
  "no route to host" instead of sending packets to the default gateway (the route is removed
  at exit by the last user). A process runs inside with
  ``ip netns exec NAME argv...`` (:meth:`NetNamespace.popen`, and :class:`NetnsMosquitto` /
  :class:`NetnsStub`, which are :class:`~bridge.testing.processes.Mosquitto` and
  :class:`~bridge.testing.processes.StubProcess` listening on the namespace's address).
  Faults are nftables rules in a table of the harness's own inside the namespace, so the host's
  firewall is never touched: :meth:`~NetNamespace.loss` (``numgen random`` drops, both
  directions), :meth:`~NetNamespace.partition` (drop everything: connection attempts time out,
  established connections hang and retransmit) and :meth:`~NetNamespace.heal`. Partition is
  never ``ip link set down`` on the host end: that would remove the host's route and send the
  packets to the default gateway instead.
  Teardown (:meth:`~NetNamespace.delete`) kills what runs inside, deletes the veth and the
  namespace; it is idempotent and also runs at interpreter exit. Each live namespace holds an
  ``flock`` on ``/run/lock/energy-bridge-netns/NAME.lock``; one whose holder died (SIGKILL) is
  deleted by the next :meth:`~NetNamespace.create` (:func:`cleanup_stale_namespaces`).
* :class:`DelayProxy`: latency and jitter. This kernel has no ``netem`` qdisc, so delay comes
  from a TCP proxy in the test process (a thread with its own event loop): every chunk read in
  either direction is written ``delay_ms`` (+ uniform ``0..jitter_ms``) later, never before the
  chunk ahead of it, so byte order is kept and a round trip through it costs at least
  ``2 * delay_ms``. Memory is bounded (chunks of at most 16 KiB, at most 64 queued per
  direction and connection, then the proxy stops reading: TCP back-pressure). It counts bytes,
  can :meth:`~DelayProxy.freeze` (hold everything, like a partition) and
  :meth:`~DelayProxy.cut` every connection at once with a reset (a NAT or firewall reset).
* :class:`RemoteHost`: what tests use. ``RemoteHost(workdir).start()`` makes a namespace when
  it can (``mode == "netns"``) and otherwise falls back (not root, no ``ip``, ``ip netns add``
  fails) to ``mode == "loopback-proxy"``: the same API, the peers on 127.0.0.1, latency from
  the proxies only, :meth:`~RemoteHost.partition` freezes the proxies and :meth:`~RemoteHost.loss`
  raises :class:`FaultUnsupported` (tests skip on it). ``ENERGY_BRIDGE_TEST_NETWORK=netns`` or
  ``=loopback-proxy`` forces a mode. Print :attr:`RemoteHost.mode` in tests.

Typical path: bridge -> ``host.proxy(broker.port, delay_ms=50)`` on 127.0.0.1 -> veth ->
mosquitto in the namespace. Clients that should see loss or a partition connect to
``host.address`` (directly or through a proxy).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import ipaddress
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final, Literal, Self, TypeVar, cast

from bridge.testing.processes import (
    LOOPBACK,
    Mosquitto,
    StubProcess,
    wait_until,
)

__all__ = [
    "ADDRESS_POOL",
    "DelayProxy",
    "FaultUnsupported",
    "MqttProbe",
    "NetNamespace",
    "NetnsMosquitto",
    "NetnsStub",
    "NetworkMode",
    "NetworkUnavailable",
    "RemoteHost",
    "cleanup_stale_namespaces",
    "mqtt_connect_ok",
    "mqtt_ping_rtts",
    "wait_mqtt_reachable",
]

ADDRESS_POOL: Final = ipaddress.IPv4Network("10.203.0.0/16")
"""Where the /30 of every namespace comes from."""
NFT_TABLE: Final = "eb_harness"
"""The nftables table (family ``inet``) the harness owns inside each namespace."""
MODE_ENV: Final = "ENERGY_BRIDGE_TEST_NETWORK"
"""Environment variable forcing :class:`RemoteHost`'s mode: ``netns`` or ``loopback-proxy``."""

NetworkMode = Literal["netns", "loopback-proxy"]

_NAME_PREFIX: Final = "eb"
_NAME_RE: Final = re.compile(rf"^{_NAME_PREFIX}-(\d+)-(\d+)$")
_LOCK_DIR: Final = Path("/run/lock/energy-bridge-netns")
_COUNTER = itertools.count(1)
_IP_TIMEOUT: Final = 15.0

T = TypeVar("T")


class NetworkUnavailable(RuntimeError):
    """A network namespace cannot be made here (not root, no ``ip``, ``ip netns add`` failed)."""


class FaultUnsupported(RuntimeError):
    """This fault cannot be injected in this mode (e.g. packet loss without a namespace)."""


# ---------------------------------------------------------------------------------------------
# small helpers


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _run(
    argv: Sequence[str], *, input_text: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a short command; raise :class:`NetworkUnavailable` with its stderr when it fails."""
    try:
        result = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=_IP_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkUnavailable(f"{' '.join(argv)}: {exc}") from exc
    if check and result.returncode != 0:
        raise NetworkUnavailable(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result


def _ip_binary() -> str | None:
    for candidate in ("ip", "/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"):
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    return None


def _nft_binary() -> str | None:
    for candidate in ("nft", "/usr/sbin/nft", "/sbin/nft"):
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.access(path, os.X_OK):
            return path
    return None


def _netns_names(ip: str) -> list[str]:
    result = _run([ip, "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _host_ifname(pid: int, n: int) -> str:
    # Interface names have at most 15 characters: hex keeps pid (<= 0x400000) and n short.
    return f"ebh{pid:x}-{n:x}"


def _ns_ifname(pid: int, n: int) -> str:
    return f"ebn{pid:x}-{n:x}"


def _used_networks(ip: str) -> list[ipaddress.IPv4Network]:
    """Every IPv4 network on an interface or in a route of the host, except the default."""
    used: list[ipaddress.IPv4Network] = []
    addrs = _run([ip, "-4", "-o", "addr", "show"], check=False).stdout
    for match in re.finditer(r"\binet (\d+\.\d+\.\d+\.\d+/\d+)", addrs):
        used.append(ipaddress.IPv4Interface(match.group(1)).network)
    routes = _run([ip, "-4", "route", "show", "table", "all"], check=False).stdout
    for line in routes.splitlines():
        words = line.split()
        if len(words) < 2 or words[:2] == ["unreachable", str(ADDRESS_POOL)]:
            continue  # no route, or the harness's own guard
        dest = words[1] if words[0] in _ROUTE_TYPES else words[0]
        if dest == "default":
            continue
        with contextlib.suppress(ValueError):
            used.append(ipaddress.IPv4Network(dest, strict=False))
    return used


_ROUTE_TYPES: Final = frozenset(
    {"unicast", "local", "broadcast", "multicast", "anycast", "blackhole", "unreachable"}
    | {"prohibit", "throw", "nat"}
)


def _guard_pool(ip: str) -> None:
    """Make the whole pool unreachable except through the namespaces' own /30 routes.

    A client still aiming at a namespace's address after teardown then fails at once with "no
    route to host" instead of sending its packets to the default gateway.
    """
    _run([ip, "route", "replace", "unreachable", str(ADDRESS_POOL)], check=False)


def _unguard_pool_if_unused(ip: str) -> None:
    """Remove the guard route when no harness namespace (of any process) is left."""
    with _flock(_LOCK_DIR / "allocate.lock"):
        if not any(_NAME_RE.match(name) for name in _netns_names(ip)):
            _run([ip, "route", "del", "unreachable", str(ADDRESS_POOL)], check=False)


def _pick_block(ip: str, seed: int) -> ipaddress.IPv4Network:
    """A /30 of :data:`ADDRESS_POOL` that overlaps no address or route of the host."""
    used = [net for net in _used_networks(ip) if net.prefixlen > 0]
    blocks = ADDRESS_POOL.num_addresses // 4
    for step in range(blocks):
        index = (seed + step) % blocks
        block = ipaddress.IPv4Network((int(ADDRESS_POOL.network_address) + 4 * index, 30))
        if not any(block.overlaps(net) for net in used):
            return block
    raise NetworkUnavailable(f"every /30 of {ADDRESS_POOL} overlaps an address or route here")


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[IO[str]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cleanup_stale_namespaces() -> list[str]:
    """Delete the namespaces (and veths) of harness processes that died without teardown.

    Only namespaces named ``eb-<pid>-<n>`` whose lock file exists and is not held any more are
    touched: the lock is held by the process that made the namespace for as long as it lives,
    so a live one (in this PID namespace or another) is never deleted.

    Returns:
        The names deleted.
    """
    ip = _ip_binary()
    if ip is None or os.geteuid() != 0 or not _LOCK_DIR.is_dir():
        return []
    deleted: list[str] = []
    for name in _netns_names(ip):
        match = _NAME_RE.match(name)
        lock_path = _LOCK_DIR / f"{name}.lock"
        if match is None or not lock_path.exists():
            continue
        with lock_path.open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner is alive
            pid, n = int(match.group(1)), int(match.group(2))
            _run([ip, "link", "del", _host_ifname(pid, n)], check=False)
            _run([ip, "netns", "del", name], check=False)
            lock_path.unlink(missing_ok=True)
            deleted.append(name)
    return deleted


# ---------------------------------------------------------------------------------------------
# the namespace


_LIVE_NAMESPACES: weakref.WeakSet[NetNamespace] = weakref.WeakSet()
_MADE_ANY = [False]  # whether this process added the guard route (removed at exit if unused)


def _delete_leftover_namespaces() -> None:
    made_any = _MADE_ANY[0]
    for netns in list(_LIVE_NAMESPACES):
        with contextlib.suppress(Exception):
            netns.delete()
    ip = _ip_binary()
    if made_any and ip is not None:
        with contextlib.suppress(Exception):
            _unguard_pool_if_unused(ip)


atexit.register(_delete_leftover_namespaces)


class NetNamespace:
    """A network namespace of its own, joined to the test's by a veth pair on a private /30.

    Lifecycle: ``NetNamespace()`` (nothing is made), :meth:`create`, use (:meth:`popen`,
    :meth:`run`, :class:`NetnsMosquitto`, faults), :meth:`delete` (idempotent; also at exit).
    Also a context manager. Needs root and ``ip``; faults other than :meth:`partition` need
    ``nft``.
    """

    def __init__(self) -> None:
        """Choose the names; nothing is made until :meth:`create`."""
        pid, n = os.getpid(), next(_COUNTER)
        self._seed = pid * 8 + n
        self.name = f"{_NAME_PREFIX}-{pid}-{n}"
        self.host_ifname = _host_ifname(pid, n)
        self.ifname = _ns_ifname(pid, n)
        self.network: ipaddress.IPv4Network | None = None
        self._ip = _ip_binary()
        self._nft = _nft_binary()
        self._created = False
        self._lock: IO[str] | None = None
        self._loss = 0.0
        self._partitioned = False
        self._children: weakref.WeakSet[Any] = weakref.WeakSet()
        self._popens: list[subprocess.Popen[bytes]] = []

    # -- addresses ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The namespace's end of the veth (``.2`` of the /30): where its services listen."""
        return str(self._block()[2])

    @property
    def host_address(self) -> str:
        """The test namespace's end of the veth (``.1`` of the /30)."""
        return str(self._block()[1])

    def _block(self) -> ipaddress.IPv4Network:
        if self.network is None:
            raise RuntimeError(f"namespace {self.name} has not been created")
        return self.network

    @property
    def exists(self) -> bool:
        """Whether :meth:`create` succeeded and :meth:`delete` has not run."""
        return self._created

    @property
    def supports_loss(self) -> bool:
        """Whether :meth:`loss` works (``nft`` is installed)."""
        return self._nft is not None

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self) -> Self:
        """Make the namespace, the veth pair, the addresses and the harness's nftables table.

        Raises:
            NetworkUnavailable: not root, no ``ip``, or a step failed (whatever was made is
                deleted again).
        """
        if self._created:
            return self
        if self._ip is None:
            raise NetworkUnavailable("the ip command (iproute2) is not installed")
        if os.geteuid() != 0:
            raise NetworkUnavailable("network namespaces need root")
        cleanup_stale_namespaces()
        ip = self._ip
        try:
            _LOCK_DIR.mkdir(parents=True, exist_ok=True)
            with _flock(_LOCK_DIR / "allocate.lock"):
                self.network = _pick_block(ip, self._seed)
                _guard_pool(ip)
                _MADE_ANY[0] = True
                lock = (_LOCK_DIR / f"{self.name}.lock").open("a")
                fcntl.flock(lock, fcntl.LOCK_EX)
                self._lock = lock
                _run([ip, "netns", "add", self.name])
                self._created = True
                _LIVE_NAMESPACES.add(self)
                prefix = f"/{self.network.prefixlen}"
                veth = ["type", "veth", "peer", "name", self.ifname, "netns", self.name]
                _run([ip, "link", "add", self.host_ifname, *veth])
                _run([ip, "addr", "add", self.host_address + prefix, "dev", self.host_ifname])
                _run([ip, "link", "set", self.host_ifname, "up"])
            _run([ip, "-n", self.name, "addr", "add", self.address + prefix, "dev", self.ifname])
            _run([ip, "-n", self.name, "link", "set", self.ifname, "up"])
            _run([ip, "-n", self.name, "link", "set", "lo", "up"])
            if self._nft is not None:
                self._nft_apply()
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Kill what runs inside, delete the veth and the namespace. Safe to call twice."""
        for child in list(self._children):
            with contextlib.suppress(Exception):
                child.kill()
        for proc in self._popens:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self._popens.clear()
        if self._created and self._ip is not None:
            # The veth first: deleting a namespace frees its devices asynchronously.
            _run([self._ip, "link", "del", self.host_ifname], check=False)
            _run([self._ip, "netns", "del", self.name], check=False)
        self._created = False
        self._loss, self._partitioned = 0.0, False
        _LIVE_NAMESPACES.discard(self)
        if self._lock is not None:
            (_LOCK_DIR / f"{self.name}.lock").unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Self:
        """Create."""
        return self.create()

    def __exit__(self, *exc_info: object) -> None:
        """Delete."""
        self.delete()

    # -- processes inside --------------------------------------------------------------------

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside the namespace (``ip netns exec NAME``).

        ``ip netns exec`` execs the command in place: the child's pid is the command's.
        """
        self._block()
        assert self._ip is not None
        return [self._ip, "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace.

        It is killed when this process dies or at :meth:`delete`. ``kwargs`` go to
        :class:`subprocess.Popen`.
        """
        if (
            sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
        ):
            kwargs.setdefault("preexec_fn", _die_with_parent)
        proc: subprocess.Popen[bytes] = subprocess.Popen(self.exec_argv(argv), **kwargs)
        self._popens.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, timeout: float = _IP_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the namespace and return its result (text)."""
        return subprocess.run(
            self.exec_argv(argv), capture_output=True, text=True, timeout=timeout, check=check
        )

    def adopt(self, child: Any) -> None:
        """Kill ``child`` (anything with ``kill()``) at :meth:`delete`."""
        self._children.add(child)

    # -- faults ------------------------------------------------------------------------------

    @property
    def loss_percent(self) -> float:
        """The packet loss in force, percent per direction."""
        return self._loss

    @property
    def partitioned(self) -> bool:
        """Whether :meth:`partition` is in force."""
        return self._partitioned

    def loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets on the veth, each direction independently.

        ``0`` removes the loss; 100 drops everything (like :meth:`partition`). Resolution is
        0.01 %.

        Raises:
            FaultUnsupported: ``nft`` is not installed.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be within 0..100 %, got {percent}")
        if self._nft is None:
            raise FaultUnsupported("packet loss needs nft (apt-get install nftables)")
        self._block()
        self._loss = float(percent)
        self._nft_apply()

    def partition(self) -> None:
        """Drop every packet on the veth, both ways, until :meth:`heal`.

        New connections time out (no reset, no refusal); established ones hang and retransmit.
        Without ``nft`` the namespace's end of the veth is set down instead.
        """
        self._block()
        self._partitioned = True
        if self._nft is not None:
            self._nft_apply()
        else:
            _run(self._ip_n("link", "set", self.ifname, "down"))

    def heal(self) -> None:
        """Remove every fault: no partition, no loss."""
        self._block()
        was_partitioned, self._partitioned, self._loss = self._partitioned, False, 0.0
        if self._nft is not None:
            self._nft_apply()
        elif was_partitioned:
            _run(self._ip_n("link", "set", self.ifname, "up"))

    def dropped_packets(self) -> int:
        """Packets the harness's rules dropped so far (both directions)."""
        if self._nft is None or not self._created:
            return 0
        result = _run(self._nft_argv("-j", "list", "counter", "inet", NFT_TABLE, "dropped"))
        for item in json.loads(result.stdout).get("nftables", []):
            if "counter" in item:
                return int(item["counter"]["packets"])
        return 0

    def ruleset(self) -> str:
        """The harness's nftables table as ``nft list`` prints it (empty without nft)."""
        if self._nft is None or not self._created:
            return ""
        return _run(self._nft_argv("list", "table", "inet", NFT_TABLE), check=False).stdout

    def _ip_n(self, *args: str) -> list[str]:
        assert self._ip is not None
        return [self._ip, "-n", self.name, *args]

    def _nft_argv(self, *args: str) -> list[str]:
        assert self._nft is not None
        return self.exec_argv([self._nft, *args])

    def _nft_apply(self) -> None:
        """Write the whole table from the fault state in one atomic ``nft -f`` transaction."""
        t, dev = NFT_TABLE, self.ifname
        lines = [
            f"table inet {t} {{",
            "  counter dropped { }",
            "  chain input { type filter hook input priority -10; policy accept; }",
            "  chain output { type filter hook output priority -10; policy accept; }",
            "}",
            f"flush chain inet {t} input",
            f"flush chain inet {t} output",
        ]
        if self._partitioned or self._loss >= 100:
            match = ""
        elif self._loss > 0:
            match = f"numgen random mod 10000 < {max(1, round(self._loss * 100))} "
        else:
            match = None
        if match is not None:
            lines += [
                f'add rule inet {t} input iifname "{dev}" {match}counter name "dropped" drop',
                f'add rule inet {t} output oifname "{dev}" {match}counter name "dropped" drop',
            ]
        _run(self._nft_argv("-f", "-"), input_text="\n".join(lines) + "\n")

    def describe(self) -> str:
        """A block for failure reports: names, addresses, faults and the nftables table."""
        if not self._created:
            return f"---- netns {self.name} (not created) ----"
        return (
            f"---- netns {self.name}: {self.host_ifname} {self.host_address} <-> "
            f"{self.ifname} {self.address} loss={self._loss}% partitioned={self._partitioned} "
            f"dropped={self.dropped_packets()} ----\n{self.ruleset()}"
        )


# ---------------------------------------------------------------------------------------------
# the peers inside a namespace


class NetnsMosquitto(Mosquitto):
    """A :class:`~bridge.testing.processes.Mosquitto` running inside ``netns``.

    It listens on the namespace's address (``url`` is ``mqtt://10.203.x.2:PORT``) and is not
    reachable on the host's loopback.
    """

    def __init__(self, workdir: Path, netns: NetNamespace, **kwargs: Any) -> None:
        """Like :class:`Mosquitto` (same keyword arguments), inside ``netns``."""
        super().__init__(workdir, **kwargs)
        self.netns = netns
        self.host = netns.address
        netns.adopt(self)

    def _spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        return super()._spawn(self.netns.exec_argv(argv), env=env, stdout=stdout)


class NetnsStub(StubProcess):
    """A :class:`~bridge.testing.processes.StubProcess` (the cloud stand-in) inside ``netns``.

    It listens on the namespace's address (``url`` is ``http://10.203.x.2:PORT``).
    """

    def __init__(self, workdir: Path, netns: NetNamespace, **kwargs: Any) -> None:
        """Like :class:`StubProcess` (same keyword arguments), inside ``netns``."""
        super().__init__(workdir, **kwargs)
        self.netns = netns
        self.host = netns.address
        netns.adopt(self)

    def _spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: int | IO[bytes] | None = None,
    ) -> subprocess.Popen[bytes]:
        return super()._spawn(self.netns.exec_argv(argv), env=env, stdout=stdout)


# ---------------------------------------------------------------------------------------------
# the delay proxy


def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    """Abort ``writer``'s connection with a TCP reset (SO_LINGER 0), like a firewall would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the client's side and the target's side."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.target: asyncio.StreamWriter | None = None

    def abort(self, *, reset: bool = False) -> None:
        for writer in (self.client, self.target):
            if writer is not None:
                if reset:
                    _reset_on_close(writer)
                else:
                    writer.transport.abort()

    def close(self) -> None:
        for writer in (self.client, self.target):
            if writer is not None:
                writer.close()


class DelayProxy:
    """A TCP proxy that delays every chunk, in each direction, by ``delay_ms`` + jitter.

    Each direction of each connection is a bounded FIFO: a reader puts ``(due, chunk)`` (at
    most ``chunk_size`` bytes, at most ``max_queued_chunks`` queued, then it stops reading)
    and a writer sends each chunk at ``due`` = arrival + ``delay_ms`` + uniform
    ``0..jitter_ms``, but never before the chunk ahead of it: jitter does not reorder. A round
    trip through the proxy thus takes at least ``2 * delay_ms``. Half-closes are forwarded.

    Lifecycle: construct, :meth:`start` (a thread with its own event loop; ``listen_port`` 0
    picks a free one, see :attr:`port`), use, :meth:`stop`. Also a context manager.
    """

    def __init__(  # noqa: PLR0917 - from, to, delay: positional like socat and friends
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        *,
        chunk_size: int = 16 * 1024,
        max_queued_chunks: int = 64,
        max_connections: int = 256,
        connect_timeout: float = 5.0,
        name: str = "proxy",
    ) -> None:
        """Describe the proxy; nothing listens until :meth:`start`."""
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        self.listen_host = listen_host
        self.port = listen_port
        self.target_host = target_host
        self.target_port = target_port
        self.delay_ms = float(delay_ms)
        self.jitter_ms = float(jitter_ms)
        self.chunk_size = chunk_size
        self.max_queued_chunks = max_queued_chunks
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.name = name
        self.bytes_up = 0
        """Bytes forwarded client -> target."""
        self.bytes_down = 0
        """Bytes forwarded target -> client."""
        self.connections_total = 0
        self.upstream_failures = 0
        self.refused_connections = 0
        self.cut_connections = 0
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._frozen = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random(secrets.randbits(64))

    # -- state -------------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` clients connect to."""
        return self.listen_host, self.port

    @property
    def running(self) -> bool:
        """Whether the proxy's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_connections(self) -> int:
        """Connections open right now."""
        return len(self._links)

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` is in force."""
        return self._frozen

    def set_delay(self, delay_ms: float, jitter_ms: float = 0.0) -> None:
        """Change delay and jitter; applies to chunks read from now on."""
        if delay_ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        self.delay_ms, self.jitter_ms = float(delay_ms), float(jitter_ms)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Self:
        """Listen and forward in a thread of its own; return once listening.

        Raises:
            OSError: the listening socket could not be bound.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        loop = asyncio.new_event_loop()
        started: list[BaseException | None] = []
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._flowing = asyncio.Event()
                if not self._frozen:
                    self._flowing.set()
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._accept, self.listen_host, self.port, reuse_address=True
                    )
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                started.append(exc)
                ready.set()
                loop.close()
                return
            started.append(None)
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"{self.name} did not start within {timeout}s")
        if started[0] is not None:
            self._thread.join(timeout)
            self._thread = self._loop = None
            raise started[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every connection, and end the thread. Safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"{self.name} did not stop within {timeout}s")
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        """Start."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop."""
        self.stop()

    # -- faults ------------------------------------------------------------------------------

    def freeze(self) -> None:
        """Stop forwarding; :meth:`thaw` resumes. Also works before :meth:`start`.

        Nothing more is read or written and new connections wait, like a partition: TCP
        buffers fill, no data is lost.
        """
        self._frozen = True
        if self.running:
            self._call(self._set_flowing(flowing=False))

    def thaw(self) -> None:
        """Resume forwarding after :meth:`freeze`; what was held flows in order."""
        self._frozen = False
        if self.running:
            self._call(self._set_flowing(flowing=True))

    def cut(self) -> int:
        """Reset every proxied connection at once, on both sides (a NAT or firewall reset).

        The listener stays: new connections work. Returns how many connections were cut.
        """
        return self._call(self._cut())

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        loop = self._loop
        if loop is None or not self.running:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def _set_flowing(self, *, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort(reset=True)
        self.cut_connections += len(links)
        return len(links)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    # -- forwarding --------------------------------------------------------------------------

    def _due_in(self) -> float:
        jitter = self._rng.uniform(0.0, self.jitter_ms) if self.jitter_ms else 0.0
        return (self.delay_ms + jitter) / 1000.0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._links) >= self.max_connections:
            self.refused_connections += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        link = _Link(writer)
        self._links.add(link)
        self.connections_total += 1
        try:
            assert self._flowing is not None
            await self._flowing.wait()
            try:
                target_reader, target_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port),
                    self.connect_timeout,
                )
            except (OSError, TimeoutError):
                self.upstream_failures += 1
                return
            link.target = target_writer
            await asyncio.gather(
                self._pipe(reader, target_writer, link, up=True),
                self._pipe(target_reader, writer, link, up=False),
            )
        except asyncio.CancelledError:
            # Only stop() cancels: end quietly. (Python 3.11's StreamReaderProtocol calls
            # exception() on this task when it is done, which raises for a cancelled task.)
            link.abort()
        finally:
            link.close()
            self._links.discard(link)
            self._tasks.discard(task)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        link: _Link,
        *,
        up: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        flowing = self._flowing
        assert flowing is not None
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(self.max_queued_chunks)

        async def read() -> None:
            last_due = 0.0
            while True:
                await flowing.wait()
                data = await source.read(self.chunk_size)
                due = max(loop.time() + self._due_in(), last_due)
                last_due = due
                await queue.put((due, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    # call_later never fires early on the monotonic clock (1 ns resolution).
                    await asyncio.sleep(wait)
                await flowing.wait()
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return
                sink.write(data)
                await sink.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)

        tasks = [asyncio.ensure_future(read()), asyncio.ensure_future(write())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if any(not task.cancelled() and task.exception() is not None for task in done):
            link.abort()  # one side broke: so does the other, as through a real path

    def describe(self) -> str:
        """One line for failure reports: addresses, delay, state and counters."""
        return (
            f"---- {self.name} {self.listen_host}:{self.port} -> {self.target_host}:"
            f"{self.target_port} delay={self.delay_ms}ms jitter={self.jitter_ms}ms "
            f"frozen={self._frozen} up={self.bytes_up}B down={self.bytes_down}B "
            f"connections={self.connections_total} active={self.active_connections} "
            f"cut={self.cut_connections} upstream_failures={self.upstream_failures} ----"
        )


# ---------------------------------------------------------------------------------------------
# the remote host: a namespace when possible, loopback and proxies otherwise


class RemoteHost:
    """Where a test puts the broker and the cloud stand-in: behind a real link when possible.

    ``mode`` is ``"netns"`` (a :class:`NetNamespace`; :attr:`address` is its ``10.203.x.2``)
    or ``"loopback-proxy"`` (no namespace could be made, or forced: the peers listen on
    127.0.0.1, latency comes from :meth:`proxy` only, :meth:`partition` freezes the proxies and
    :meth:`loss` raises :class:`FaultUnsupported`). The mode is ``auto`` unless forced by the
    argument or by ``ENERGY_BRIDGE_TEST_NETWORK``.

    Lifecycle: ``RemoteHost(workdir)``, :meth:`start`, make peers (:meth:`mosquitto`,
    :meth:`stub`) and :meth:`proxy` s, inject faults, :meth:`stop` (kills the peers, stops the
    proxies, deletes the namespace; idempotent). Also a context manager.
    """

    def __init__(
        self, workdir: Path, *, mode: Literal["auto", "netns", "loopback-proxy"] = "auto"
    ) -> None:
        """Describe the host; nothing is made until :meth:`start`."""
        if mode not in {"auto", "netns", "loopback-proxy"}:
            raise ValueError(f"unknown network mode {mode!r}")
        forced = os.environ.get(MODE_ENV, "").strip()
        if mode == "auto" and forced in {"netns", "loopback-proxy"}:
            mode = cast(NetworkMode, forced)
        self.workdir = workdir
        self.requested_mode: Literal["auto", "netns", "loopback-proxy"] = mode
        self.netns: NetNamespace | None = None
        self.fallback_reason: str | None = None
        self._mode: NetworkMode | None = None
        self._peers: list[Mosquitto | StubProcess] = []
        self._proxies: list[DelayProxy] = []
        self._partitioned = False
        self._stopped = False

    @property
    def mode(self) -> NetworkMode:
        """``"netns"`` or ``"loopback-proxy"`` (after :meth:`start`)."""
        if self._mode is None:
            raise RuntimeError("the remote host has not been started")
        return self._mode

    def _require_started(self) -> None:
        if self._mode is None:
            raise RuntimeError("the remote host has not been started")

    @property
    def address(self) -> str:
        """Where the peers listen: the namespace's address, or 127.0.0.1."""
        return self.netns.address if self.netns is not None else LOOPBACK

    @property
    def host_address(self) -> str:
        """The test's own end of the link: the veth's host address, or 127.0.0.1."""
        return self.netns.host_address if self.netns is not None else LOOPBACK

    @property
    def supports_loss(self) -> bool:
        """Whether :meth:`loss` can drop packets in this mode."""
        return self.netns is not None and self.netns.supports_loss

    def start(self) -> Self:
        """Make the namespace, or fall back to loopback when allowed.

        Raises:
            NetworkUnavailable: ``mode="netns"`` was asked for and no namespace can be made.
        """
        if self._stopped:
            raise RuntimeError("a stopped remote host cannot start again; make a new one")
        if self._mode is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.requested_mode != "loopback-proxy":
            netns = NetNamespace()
            try:
                self.netns = netns.create()
            except NetworkUnavailable as exc:
                if self.requested_mode == "netns":
                    raise
                self.fallback_reason = str(exc)
            else:
                self._mode = "netns"
                return self
        else:
            self.fallback_reason = "loopback-proxy mode asked for"
        self._mode = "loopback-proxy"
        return self

    def stop(self) -> None:
        """Stop the proxies, kill the peers, delete the namespace. Safe to call twice."""
        for proxy in self._proxies:
            with contextlib.suppress(Exception):
                proxy.stop()
        for peer in self._peers:
            with contextlib.suppress(Exception):
                peer.kill()
        if self.netns is not None:
            self.netns.delete()
        self._partitioned = False
        self._stopped = self._mode is not None

    def __enter__(self) -> Self:
        """Start."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop."""
        self.stop()

    # -- peers -------------------------------------------------------------------------------

    def _workdir(self, kind: str) -> Path:
        return self.workdir / f"{kind}-{len(self._peers)}"

    def mosquitto(self, *, start: bool = True, **kwargs: Any) -> Mosquitto:
        """A broker on :attr:`address` (keyword arguments as for :class:`Mosquitto`)."""
        self._require_started()
        workdir = self._workdir("mosquitto")
        broker: Mosquitto
        if self.netns is not None:
            broker = NetnsMosquitto(workdir, self.netns, **kwargs)
        else:
            broker = Mosquitto(workdir, **kwargs)
        self._peers.append(broker)
        return broker.start() if start else broker

    def stub(
        self, *args: str, env: Mapping[str, str] | None = None, start: bool = True
    ) -> StubProcess:
        """A cloud stub on :attr:`address` (``args``: extra CLI arguments of the stub)."""
        self._require_started()
        workdir = self._workdir("stub")
        stub: StubProcess
        if self.netns is not None:
            stub = NetnsStub(workdir, self.netns, args=args, env=env)
        else:
            stub = StubProcess(workdir, args=args, env=env)
        self._peers.append(stub)
        return stub.start() if start else stub

    def proxy(
        self,
        target_port: int,
        *,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        listen_host: str = LOOPBACK,
        listen_port: int = 0,
        target_host: str | None = None,
    ) -> DelayProxy:
        """A started :class:`DelayProxy` to ``target_port`` on :attr:`address`.

        It listens on ``listen_host`` (loopback by default) and is stopped at :meth:`stop`.
        """
        self._require_started()
        proxy = DelayProxy(
            listen_host,
            listen_port,
            target_host or self.address,
            target_port,
            delay_ms,
            jitter_ms,
            name=f"proxy-{len(self._proxies)}",
        )
        if self._partitioned and self.netns is None:
            proxy.freeze()
        self._proxies.append(proxy.start())
        return proxy

    @property
    def proxies(self) -> list[DelayProxy]:
        """The proxies made by :meth:`proxy`."""
        return list(self._proxies)

    # -- faults ------------------------------------------------------------------------------

    def loss(self, percent: float) -> None:
        """Drop ``percent`` % of the packets between the test and the peers (each direction).

        Raises:
            FaultUnsupported: in ``loopback-proxy`` mode (for any percent but 0), or without nft.
        """
        if self.netns is None:
            self._require_started()
            if percent:
                raise FaultUnsupported(f"packet loss needs a namespace ({self.fallback_reason})")
            return
        self.netns.loss(percent)

    def partition(self) -> None:
        """Cut the peers off (nothing passes, nothing is refused) until :meth:`heal`.

        In ``loopback-proxy`` mode only traffic through the proxies is held.
        """
        self._require_started()
        self._partitioned = True
        if self.netns is not None:
            self.netns.partition()
        else:
            for proxy in self._proxies:
                proxy.freeze()

    def heal(self) -> None:
        """Remove partition and loss."""
        self._require_started()
        if self.netns is not None:
            self.netns.heal()
        elif self._partitioned:
            for proxy in self._proxies:
                proxy.thaw()
        self._partitioned = False

    def cut_connections(self) -> int:
        """Reset every connection through the proxies at once; return how many."""
        return sum(proxy.cut() for proxy in self._proxies if proxy.running)

    def dropped_packets(self) -> int:
        """Packets dropped by :meth:`loss` / :meth:`partition` so far (0 without a namespace)."""
        return self.netns.dropped_packets() if self.netns is not None else 0

    def describe(self) -> str:
        """A block for failure reports: mode, namespace, proxies and the peers' log tails."""
        head = f"==== remote host: mode={self._mode} address={self.address}"
        if self.fallback_reason:
            head += f" (fallback: {self.fallback_reason})"
        parts = [head]
        if self.netns is not None:
            with contextlib.suppress(Exception):
                parts.append(self.netns.describe())
        parts += [proxy.describe() for proxy in self._proxies]
        parts += [peer.describe() for peer in self._peers]
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# MQTT probes on a raw socket (no client library in the way of the timing)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the peer")
        data += chunk
    return data


def _expect_connack(packet: bytes) -> None:
    if packet[0] != 0x20 or packet[3] != 0:
        raise ConnectionError(f"the broker refused the connection: CONNACK {packet!r}")


class MqttProbe:
    """A bare MQTT 3.1.1 connection that only pings: times round trips through a path.

    Connects (CONNECT/CONNACK, clean session, keepalive 60 s) on construction. :meth:`ping`
    times one PINGREQ -> PINGRESP; :meth:`send_ping` and :meth:`recv_pong` split it, to see a
    ping hang during a partition and complete after :meth:`RemoteHost.heal`.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        """Connect and wait for the CONNACK.

        Raises:
            OSError: no connection, no CONNACK within ``timeout`` (``TimeoutError``), or a
                refusal (``ConnectionError``).
        """
        client_id = f"probe-{secrets.token_hex(4)}".encode()
        variable = b"\x00\x04MQTT\x04\x02\x00\x3c"  # MQTT 3.1.1, clean session, keepalive 60 s
        body = variable + len(client_id).to_bytes(2, "big") + client_id
        self._sent_at = 0.0
        self.sock = socket.create_connection((host, port), timeout=timeout)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(bytes([0x10, len(body)]) + body)
            _expect_connack(_recv_exact(self.sock, 4))
        except BaseException:
            self.sock.close()
            raise

    def send_ping(self) -> None:
        """Send a PINGREQ (and start the clock)."""
        self._sent_at = time.monotonic()
        self.sock.sendall(b"\xc0\x00")

    def recv_pong(self, timeout: float = 5.0) -> float:
        """Wait for the PINGRESP; return seconds since :meth:`send_ping`.

        Raises:
            TimeoutError: none within ``timeout`` (the probe stays usable: call again).
            ConnectionError: the connection was closed or reset.
        """
        self.sock.settimeout(timeout)
        answer = _recv_exact(self.sock, 2)
        elapsed = time.monotonic() - self._sent_at
        if answer != b"\xd0\x00":
            raise ConnectionError(f"expected PINGRESP, got {answer!r}")
        return elapsed

    def ping(self, timeout: float = 5.0) -> float:
        """One PINGREQ -> PINGRESP round trip, seconds."""
        self.send_ping()
        return self.recv_pong(timeout)

    def close(self) -> None:
        """Send DISCONNECT (if still possible) and close. Safe to call twice."""
        with contextlib.suppress(OSError):
            self.sock.settimeout(0.5)
            self.sock.sendall(b"\xe0\x00")
        self.sock.close()

    def __enter__(self) -> Self:
        """Return self (already connected)."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close."""
        self.close()


def mqtt_connect_ok(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether an MQTT CONNECT to ``host:port`` gets a successful CONNACK within ``timeout``."""
    try:
        MqttProbe(host, port, timeout).close()
    except OSError:
        return False
    return True


def mqtt_ping_rtts(host: str, port: int, count: int = 5, timeout: float = 5.0) -> list[float]:
    """Connect to an MQTT broker and time ``count`` PINGREQ -> PINGRESP round trips, seconds.

    Raises:
        OSError: the connection failed or a PINGRESP did not come within ``timeout``.
    """
    with MqttProbe(host, port, timeout) as probe:
        return [probe.ping(timeout) for _ in range(count)]


def wait_mqtt_reachable(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until an MQTT CONNECT to ``host:port`` succeeds (e.g. after :meth:`heal`)."""
    wait_until(
        lambda: mqtt_connect_ok(host, port, timeout=1.0),
        timeout,
        interval=0.1,
        message=f"an MQTT CONNACK from {host}:{port}",
    )
