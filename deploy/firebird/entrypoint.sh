#!/bin/sh
# Give SYSDBA the password of the firebird_password secret, then run the server in the
# foreground (its process receives compose's SIGTERM and closes its connections).
# The package's install made the security database with a random password; this sets the
# secret's on every start, so rotating it is: change the secret, restart this service and
# the etl services (docs/operations.md).
set -eu
secret=${FIREBIRD_PASSWORD_FILE:-/run/secrets/firebird_password}
security_db=/var/lib/firebird/3.0/system/security3.fdb
if [ ! -r "$secret" ]; then
    echo "firebird: no password: mount the secret $secret (FIREBIRD_PASSWORD_FILE)" >&2
    exit 1
fi
password=$(cat "$secret")  # $(...) drops the trailing newline a secrets file often has
if [ -z "$password" ]; then
    echo "firebird: the secret $secret is empty" >&2
    exit 1
fi
quoted=$(printf '%s' "$password" | sed "s/'/''/g")
# isql-fb without a host opens the security database with the embedded engine (the server
# is not running yet), as Debian's postinst does.
printf "CREATE OR ALTER USER SYSDBA PASSWORD '%s' USING PLUGIN Srp;\nCOMMIT;\n" "$quoted" \
    | isql-fb -q -b -user SYSDBA "$security_db" >/dev/null
exec /usr/sbin/firebird
