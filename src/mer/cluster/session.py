"""Connecting to Ray: a private local instance ("local" or "local:N") or a running cluster
(an address, as `ray start --head` prints it, or "auto")."""

from __future__ import annotations

from mer.errors import ClusterError, ConfigError

# A local instance for a handful of workers on a small machine: no dashboard, a small
# object store (the calls carry a few rows of hidden states), no worker logs on our stdout.
LOCAL_OBJECT_STORE = 128 << 20


def parse_cluster(cluster: str) -> tuple[str | None, int | None]:
    """'local' -> (None, None); 'local:3' -> (None, 3); 'host:port' or 'auto' -> (address,
    None). The count of 'local:N' is the number of workers."""
    if cluster == "local":
        return None, None
    if cluster.startswith("local:"):
        n = cluster.removeprefix("local:")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--cluster {cluster!r}: local:N wants a worker count of 1 or more")
        return None, int(n)
    if not cluster:
        raise ConfigError("--cluster: give local, local:N, auto or a Ray address host:port")
    return cluster, None


def connect(address: str | None) -> bool:
    """Join Ray (start a local instance when `address` is None) unless this process already
    has; True when this call started it, so the caller shuts it down."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--cluster needs Ray: pip install 'mer[cluster]'") from None
    if ray.is_initialized():
        return False
    if address is not None:
        reachable(address)
    import signal

    # ray.init makes SIGTERM raise SystemExit in the driver; mer's own handling stays (the
    # server's graceful stop, then the default action), as without a cluster.
    before = signal.getsignal(signal.SIGTERM)
    try:
        if address is None:
            ray.init(
                num_cpus=1, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE,
                log_to_driver=False, configure_logging=False,
            )  # fmt: skip
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local Ray instance" if address is None else f"Ray at {address}"
        raise ClusterError(f"cannot start or reach {where}: {str(e).splitlines()[0]}") from None
    if before is not None:
        signal.signal(signal.SIGTERM, before)
    return True


def reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ClusterError unless host:port accepts a connection: ray.init waits minutes, deaf
    to signals, on an address where nothing listens. ("auto" and ray:// pass unchecked.)"""
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ClusterError(
            f"--cluster {address}: no Ray cluster answers there ({why}); start one with "
            "`ray start --head`, or use --cluster local"
        ) from None
