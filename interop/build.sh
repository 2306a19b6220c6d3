#!/usr/bin/env bash
# Build the Go tools used by the interop tests:
#   derper         tailscale.com/cmd/derper (the Tailscale DERP relay)
#   derpconnect    github.com/ntnj/derpnet/cmd/derpconnect (the real tool), if
#                  the Go module proxy serves it
#   goderpconnect  our faithful stand-in in interop/goderpconnect (always built)
# Everything lands in $(go env GOPATH)/bin. Idempotent; quick when up to date.
# Without Go it prints a note and exits 0 (the interop tests then skip).
set -u

DERPER_VERSION="${DERPER_VERSION:-v1.102.3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if ! command -v go >/dev/null 2>&1; then
    echo "interop/build.sh: 'go' not found; Go interop tools not built (interop tests will skip)." >&2
    exit 0
fi

gobin="$(go env GOBIN)"
[ -n "$gobin" ] || gobin="$(go env GOPATH)/bin"
mkdir -p "$gobin"
status=0

# 1. derper. `go install` of a fixed version is a cache hit when already built,
#    but skip even that when the installed binary is the wanted version.
if [ -x "$gobin/derper" ] && go version -m "$gobin/derper" 2>/dev/null \
        | grep -q "^[[:space:]]*mod[[:space:]]*tailscale.com[[:space:]]*${DERPER_VERSION}\b"; then
    echo "derper ${DERPER_VERSION}: already built ($gobin/derper)"
else
    echo "building derper ${DERPER_VERSION} ..."
    if go install "tailscale.com/cmd/derper@${DERPER_VERSION}"; then
        echo "derper: installed to $gobin/derper"
    else
        echo "interop/build.sh: building derper failed" >&2
        status=1
    fi
fi

# 2. The real derpconnect (expected to be unavailable from the module proxy).
if [ -x "$gobin/derpconnect" ]; then
    echo "derpconnect (real): already built ($gobin/derpconnect)"
elif [ "${SKIP_REAL_DERPCONNECT:-}" = "1" ]; then
    echo "derpconnect (real): skipped (SKIP_REAL_DERPCONNECT=1)"
else
    echo "trying the real derpconnect: go install github.com/ntnj/derpnet/cmd/derpconnect@latest ..."
    if out="$(go install github.com/ntnj/derpnet/cmd/derpconnect@latest 2>&1)"; then
        echo "derpconnect (real): installed to $gobin/derpconnect"
    else
        echo "NOTE: the real derpconnect could not be installed (the Go module proxy does not serve"
        echo "      github.com/ntnj/derpnet here); the interop tests use the stand-in goderpconnect."
        echo "      go said: $(printf '%s' "$out" | tail -n 1)"
    fi
fi

# 2b. The original, built from its unmodified source in ../shared/upstream (MIT), as
#     `ntnj-derpconnect` so that the tests choosing `derpconnect` are not switched over
#     silently; tests that must run against the original look for this name.
upstream="$here/../../shared/upstream/build-derpconnect.sh"
if [ -x "$gobin/ntnj-derpconnect" ]; then
    echo "ntnj-derpconnect (original): already built ($gobin/ntnj-derpconnect)"
elif [ -f "$upstream" ]; then
    if bash "$upstream" "$gobin/ntnj-derpconnect"; then
        echo "ntnj-derpconnect (original): installed to $gobin/ntnj-derpconnect"
    else
        echo "interop/build.sh: building the original derpconnect failed" >&2
        status=1
    fi
else
    echo "NOTE: $upstream not found: the original derpconnect is not built"
fi

# 3. The stand-in. `go build` is incremental: a no-op rebuild takes ~1 s.
echo "building goderpconnect (stand-in) ..."
if (cd "$here/goderpconnect" && go build -trimpath -o "$gobin/goderpconnect" .); then
    echo "goderpconnect: installed to $gobin/goderpconnect"
else
    echo "interop/build.sh: building goderpconnect failed" >&2
    status=1
fi

exit $status
