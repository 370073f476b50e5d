#!/bin/sh
# Adds the smtpd service the proxy talks to (PROXY_PORT, default 10025; "127.0.0.1:10025"
# in a pod) with every parameter of proxy-port.cf as a master.cf -o option, then runs
# Postfix in the foreground. `--configure-only` stops before starting (the test suite runs
# it that way against a scratch MAIL_CONFIG directory).
set -eu
port="${PROXY_PORT:-10025}"
settings="${PROXY_PORT_CF:-/etc/postfix/proxy-port.cf}"
postconf -e "maillog_file=/dev/stdout" "myhostname=${MYHOSTNAME:-mail.example.org}"
# Mail enters only through the proxy: no smtpd of Postfix's own on port 25 (in a pod it
# would also take the port the proxy listens on).
postconf -M# smtp/inet
postconf -M "${port}/inet=${port} inet n - n - - smtpd"
grep -v '^[[:space:]]*\(#\|$\)' "$settings" | while IFS= read -r setting; do
    postconf -P "${port}/inet/${setting}"
done
if [ "${1:-}" = "--configure-only" ]; then
    exit 0
fi
# Local delivery (e.g. postmaster@$MYHOSTNAME) needs the alias database.
newaliases
exec postfix start-fg
