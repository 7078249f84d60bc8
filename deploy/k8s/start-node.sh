#!/bin/sh
# Starts one waft node of a StatefulSet. Pod NAME-k gets node id k+1 and advertises its stable
# DNS name NAME-k.SERVICE.NAMESPACE.svc.cluster.local; pod 0 initializes the cluster the first
# time, the others join through pod 0. A pod restarted with its volume rejoins by itself. A pod
# whose volume was lost starts empty: it joins the cluster the other pods still run (the
# cluster lists it, so --join removes it and adds it back, and it copies the log), and pod 0
# initializes only when no other pod knows a leader, never a second cluster beside the first.
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
elif [ "$ordinal" = 0 ] && waft --output json --endpoint "${domain}:7001" cluster status 2>/dev/null |
  grep -q '"leader_id":[0-9]'; then
  # Pod 0 lost its volume while the others kept the cluster going: rejoin it.
  exec waft "$@" --join "${domain}:7001"
elif [ "$ordinal" = 0 ]; then
  waft "$@" &
  pid=$!
  until waft --endpoint 127.0.0.1:7001 cluster status >/dev/null 2>&1; do sleep 1; done
  waft --endpoint 127.0.0.1:7001 cluster init || true
  wait "$pid"
else
  exec waft "$@" --join "$seed"
fi
