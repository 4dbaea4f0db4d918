#!/bin/sh
# Entrypoint of unibus-local/rabbitmq, standing in for the official image's.
#
# Everything the official image honours that unibus uses is read by rabbitmq-server
# itself, so it works the same here: RABBITMQ_NODENAME, RABBITMQ_NODE_PORT,
# RABBITMQ_DIST_PORT, ERL_EPMD_PORT, ERL_EPMD_ADDRESS,
# RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS and the files in /etc/rabbitmq/conf.d/.
# Like the official image, the server runs as the rabbitmq user.
set -eu

if [ "${1:-}" = rabbitmq-server ] && [ "$(id -u)" = 0 ]; then
    mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
    chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups \
        env HOME=/var/lib/rabbitmq "$@"
fi
exec "$@"
