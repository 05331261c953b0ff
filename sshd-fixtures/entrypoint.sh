#!/bin/sh
# Runs under tini (PID 1, reaps orphans). sshd daemonizes, so killing sshd for a fault test
# leaves the container, and whatever the killed sessions left behind, up for inspection.
set -e
mkdir -p /run/sshd
chmod 0755 /run/sshd
/usr/sbin/sshd -e "$@"
exec sleep infinity
