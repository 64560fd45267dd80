#!/usr/bin/env bash
# What `pip install -e '.[test]'` needs from the system: mysqlclient (MySQLdb, in the
# test extra) has no wheels for Linux, and pip builds it from source against the
# MySQL/MariaDB client library, which it finds with pkg-config. The Makefile runs this
# before each virtualenv's install: it installs Debian's packages for that when they are
# missing (as root, with apt-get, as on this project's machines and CI); elsewhere it
# says what is needed, and pip then fails on mysqlclient.
set -euo pipefail
PACKAGES=(default-libmysqlclient-dev pkg-config)
if command -v pkg-config >/dev/null \
    && { pkg-config --exists mysqlclient || pkg-config --exists libmariadb; }; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  # The package lists may be missing or stale on a fresh machine: update and retry.
  apt-get install -y -qq "${PACKAGES[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq "${PACKAGES[@]}" >/dev/null; }
  exit 0
fi
echo "scripts/install_build_deps.sh: mysqlclient (in the test extra) builds from source and" \
  "needs pkg-config and the MySQL/MariaDB client headers: install them (Debian:" \
  "apt-get install ${PACKAGES[*]}; macOS: brew install mysql-client pkg-config)." >&2
