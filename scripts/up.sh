#!/usr/bin/env bash
# The main job from a fresh clone: installs what `pipeline up` needs when it is missing
# (redis-server; a JRE and Maven for Apache Kafka; the C toolchain and headers librdkafka builds
# with), fetches the pinned Apache Kafka, builds the release binary and runs `pipeline up` with
# the arguments given (e.g. --once --json).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
[ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
PIPELINE_KAFKA_HOME=$(./scripts/kafka.sh)
export PIPELINE_KAFKA_HOME
echo "building: cargo build --release" >&2
cargo build --release --locked >&2
exec target/release/pipeline up "$@"
