# Start a throwaway PostgreSQL cluster for the store tests; sourced by .ci/run.
# Exports ATTNKIT_TEST_POSTGRES_URL; the cluster (a temporary directory, loopback only) is stopped on exit.
# Installs Debian's postgresql when no server binaries are present. Safe when PostgreSQL is already
# installed or a system cluster is running: this one uses its own directory, socket and a free port.
start_test_postgres() {
  local initdb pgbin dir port
  initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$initdb" ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "postgres: not installed and not root; the PostgreSQL store tests will skip" >&2
      return 0
    fi
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    initdb=$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
    [ -n "$initdb" ] || { echo "postgres: installation failed" >&2; return 1; }
  fi
  pgbin=$(dirname "$initdb")
  dir=$(mktemp -d /tmp/attnkit-pg.XXXXXX)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$dir"
    local as=(runuser -u postgres --)
  else
    local as=()
  fi
  "${as[@]}" "$pgbin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2; return 1; }
  "${as[@]}" "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off" start >/dev/null || {
    cat "$dir/server.log" >&2; return 1; }
  export ATTNKIT_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
  ATTNKIT_PG_STOP=("${as[@]}" "$pgbin/pg_ctl" -D "$dir/data" -m fast -w stop)
  trap '"${ATTNKIT_PG_STOP[@]}" >/dev/null 2>&1 || true; rm -rf "'"$dir"'"' EXIT
  echo "postgres: test server on 127.0.0.1:$port ($($pgbin/postgres --version))"
}
