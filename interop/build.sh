#!/usr/bin/env bash
# Build the Go tools used by the interop tests:
#   derper            tailscale.com/cmd/derper (the Tailscale DERP relay)
#   derpprobe         tailscale.com/cmd/derpprobe (Tailscale's relay monitor; same version)
#   ntnj-derpconnect  the original Go derpconnect (github.com/ntnj/derpnet, MIT, commit
#                     450ef13), built from its unmodified source in shared/upstream by
#                     shared/upstream/build-derpconnect.sh (the module proxy does not serve
#                     github.com/ntnj/derpnet itself; its dependencies come from the proxy).
#                     Named so that it never shadows our own `derpconnect` on PATH.
# Everything lands in $(go env GOPATH)/bin. Idempotent; quick when up to date (FORCE=1
# rebuilds). Without Go it prints a note and exits 0 (the interop tests then skip). With Go,
# a tool that cannot be built is an error (exit 1): CI requires them.
set -u

DERPER_VERSION="${DERPER_VERSION:-v1.102.3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
upstream="${DERPNET_UPSTREAM:-$here/../../shared/upstream}"

if ! command -v go >/dev/null 2>&1; then
    echo "interop/build.sh: 'go' not found; Go interop tools not built (interop tests will skip)." >&2
    exit 0
fi

gobin="$(go env GOBIN)"
[ -n "$gobin" ] || gobin="$(go env GOPATH)/bin"
mkdir -p "$gobin"
status=0

# 1. derper and derpprobe (Tailscale's relay monitor, tests/derpnet/test_server_derpprobe.py).
#    `go install` of a fixed version is a cache hit when already built, but skip even that
#    when the installed binary is the wanted version.
install_tailscale_cmd() {
    local name="$1"
    if [ "${FORCE:-}" != 1 ] && [ -x "$gobin/$name" ] && go version -m "$gobin/$name" 2>/dev/null \
            | grep -q "^[[:space:]]*mod[[:space:]]*tailscale.com[[:space:]]*${DERPER_VERSION}\b"; then
        echo "$name ${DERPER_VERSION}: already built ($gobin/$name)"
    else
        echo "building $name ${DERPER_VERSION} ..."
        if go install "tailscale.com/cmd/$name@${DERPER_VERSION}"; then
            echo "$name: installed to $gobin/$name"
        else
            echo "interop/build.sh: building $name failed" >&2
            status=1
        fi
    fi
}
install_tailscale_cmd derper
install_tailscale_cmd derpprobe

# 2. The original derpconnect, from its unmodified source (about 20 s cold, 1 s warm).
if [ "${FORCE:-}" != 1 ] && [ -x "$gobin/ntnj-derpconnect" ]; then
    echo "ntnj-derpconnect (original): already built ($gobin/ntnj-derpconnect)"
elif [ -f "$upstream/build-derpconnect.sh" ]; then
    if bash "$upstream/build-derpconnect.sh" "$gobin/ntnj-derpconnect"; then
        echo "ntnj-derpconnect (original): installed to $gobin/ntnj-derpconnect"
    else
        echo "interop/build.sh: building the original derpconnect failed" >&2
        status=1
    fi
else
    echo "interop/build.sh: $upstream/build-derpconnect.sh not found (set DERPNET_UPSTREAM to the" \
         "directory holding it and ntnj-derpnet/): the original derpconnect is not built" >&2
    status=1
fi

exit $status
