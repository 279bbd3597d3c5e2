#!/usr/bin/env bash
# Run a command in a network namespace whose only interface is loopback.
#
# Ray's dashboard probes cloud metadata addresses and gloo does reverse DNS
# lookups; inside this namespace nothing can leave the machine. As root this
# uses `unshare -n`; otherwise a user namespace (`unshare -rn`).
set -euo pipefail

if [[ "${KD_DAGFM_IN_LOOPBACK_NS:-}" == "1" ]]; then
    exec "$@"
fi
if [[ "$(id -u)" == "0" ]]; then
    flags=(-n)
else
    flags=(-r -n)
fi
if ! unshare "${flags[@]}" true 2>/dev/null; then
    echo "error: cannot create a network namespace (unshare ${flags[*]} failed)." >&2
    echo "Runs that start Ray or torch.distributed must not reach the network;" >&2
    echo "run as root or enable unprivileged user namespaces." >&2
    exit 2
fi
exec unshare "${flags[@]}" env KD_DAGFM_IN_LOOPBACK_NS=1 bash -c \
    'ip link set lo up && exec "$@"' loopback "$@"
