#!/usr/bin/env bash
# Submit a kd-dagfm run to the long-lived RayCluster kd-dagfm-criteo in namespace
# recsys (apply raycluster.yaml first). Needs kubectl and Ray
# 2.60.0 on this machine. Extra arguments go to the entrypoint, after the
# config file, for example: ray-job-submit.sh --epochs 5
# Rendered by kd-dagfm render-k8s.
set -euo pipefail

kubectl -n recsys wait raycluster/kd-dagfm-criteo \
    --for=jsonpath='{.status.state}'=ready --timeout=15m
kubectl -n recsys port-forward service/kd-dagfm-criteo-head-svc 8265:8265 >/dev/null &
forward=$!
trap 'kill "$forward"' EXIT

address=http://127.0.0.1:8265
for _ in $(seq 30); do
    ray job list --address "$address" >/dev/null 2>&1 && break
    sleep 1
done

# Resubmitting after a failure resumes from the newest complete checkpoint in
# output_dir, because the config (and so output_dir) is the same.
ray job submit --address "$address" \
    --submission-id "kd-dagfm-criteo-$(date +%Y%m%d-%H%M%S)" \
    -- python -m jobs.pipeline --config /etc/kd-dagfm/run.yaml "$@"
