#!/usr/bin/env bash
# The project's test command: installs what the tests need when it is missing (redis-server for
# the real Redis, kcat as a Kafka console tool, Apache Kafka's jars through Maven), then runs
# formatting, lints and every test tier (unit, component and process-level on Apache Kafka).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v kcat >/dev/null 2>&1 || need+=(kcat)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
# Static checks of the deployment files, and a real Prometheus and Alertmanager for the scrape,
# alerting and dashboard tests.
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
# A real browser renders the mocks' Swagger UI; Python's venv holds the OpenAPI validator.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# librdkafka is built from source by rdkafka-sys: it needs a C toolchain, make and zlib/OpenSSL headers.
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
[ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's packages may start system redis-server/prometheus/alertmanager services; the tests
# start their own on free ports.

# The OpenAPI validator of the mocks' specs, from PyPI into .cache/ (once).
validator_env=.cache/openapi-validator
if [ ! -x "$validator_env/bin/openapi-spec-validator" ]; then
  echo "installing: openapi-spec-validator (PyPI) into $validator_env"
  python3 -m venv "$validator_env"
  "$validator_env/bin/pip" install -q 'openapi-spec-validator==0.7.1'
fi
OPENAPI_SPEC_VALIDATOR="$PWD/$validator_env/bin/openapi-spec-validator"
export OPENAPI_SPEC_VALIDATOR

# Apache Kafka, pinned in deploy/kafka/pom.xml, fetched once with Maven (JRE and Maven from
# Debian when missing); every test starts its own broker from it.
PIPELINE_KAFKA_HOME=$(./scripts/kafka.sh)
export PIPELINE_KAFKA_HOME
echo "Apache Kafka: $PIPELINE_KAFKA_HOME"
# A test run killed outright cannot stop its brokers: stop any such JVM before and after.
stop_brokers() { pkill -f 'kafka\.Kafka .*apache-kafka-' 2>/dev/null || true; }
stop_brokers

# The compose stack needs a Docker engine, which this machine lacks: validate it statically.
docker-compose --env-file .env.example config -q
promtool check config deploy/prometheus/prometheus.yml
promtool test rules deploy/prometheus/alerts.test.yml
am_config=$(mktemp)
(set -a; . ./.env.example; deploy/alertmanager/render.sh deploy/alertmanager/alertmanager.yml "$am_config")
amtool check-config "$am_config" >/dev/null
rm -f "$am_config"
python3 -m json.tool deploy/grafana/dashboards/pipeline.json >/dev/null

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --release --locked
log=$(mktemp)
trap 'rm -f "$log"; stop_brokers' EXIT
set +e
# Two at a time: the process tests each run a broker, Redis, mocks and several consumers, and
# on a 2-core machine more in parallel starves them.
RUST_TEST_THREADS=2 cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo's own last line is a doc-test run of 0 tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\ntotal: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
