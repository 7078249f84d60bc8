#!/bin/sh
# Starts one waft node of a StatefulSet. Pod NAME-k gets node id k+1 and advertises its stable
# DNS name NAME-k.SERVICE.NAMESPACE.svc.cluster.local; pod 0 initializes the cluster the first
# time, the others join through pod 0. A pod restarted with its volume rejoins by itself.
set -eu
ordinal=${HOSTNAME##*-}
id=$((ordinal + 1))
domain="${WAFT_SERVICE}.${POD_NAMESPACE}.svc.cluster.local"
self="${HOSTNAME}.${domain}:7001"
seed="${HOSTNAME%-*}-0.${domain}:7001"
set -- node --id "$id" --listen 0.0.0.0:7001 --advertise "$self" --data-dir /data \
  --metrics-listen 0.0.0.0:9101
if [ -e /data/log.wal ] || [ -e /data/log.redb ]; then
  exec waft "$@"
elif [ "$ordinal" = 0 ]; then
  waft "$@" &
  pid=$!
  until waft --endpoint 127.0.0.1:7001 cluster status >/dev/null 2>&1; do sleep 1; done
  waft --endpoint 127.0.0.1:7001 cluster init || true
  wait "$pid"
else
  exec waft "$@" --join "$seed"
fi
