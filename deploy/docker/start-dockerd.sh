#!/usr/bin/env bash
# Start a Docker daemon on this machine if none answers (as root: installs Debian's docker.io,
# debootstrap for the base image and docker-compose 1.29 when missing). Images live in
# /var/lib/fedfill-docker, so the base image and the image's layers stay cached between runs.
set -uo pipefail
docker info >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ]; then echo "start-dockerd: not root, cannot start dockerd" >&2; exit 1; fi
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null || exit 1
fi
# A daemon that died leaves containerd's pid file; once the pid is reused by another process,
# dockerd takes it for a running containerd and times out waiting on its socket.
pidfile=/var/run/docker/containerd/containerd.pid
if [ -f "$pidfile" ] && [ "$(cat /proc/"$(cat "$pidfile")"/comm 2>/dev/null)" != containerd ]; then
  rm -f "$pidfile"
fi
nohup dockerd --data-root /var/lib/fedfill-docker >/var/log/fedfill-dockerd.log 2>&1 &
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "start-dockerd: dockerd did not answer in 30 s; see /var/log/fedfill-dockerd.log" >&2
exit 1
