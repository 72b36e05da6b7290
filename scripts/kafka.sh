#!/usr/bin/env bash
# Fetches the pinned Apache Kafka (broker and console tools, as Maven jars: deploy/kafka/pom.xml)
# into .cache/kafka-<version>/lib and prints that directory. Reused offline once fetched; Maven
# keeps its own cache in ~/.m2. Installs a JRE and Maven from Debian when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
pom=deploy/kafka/pom.xml
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")
home=".cache/kafka-$version"
if [ ! -f "$home/lib/.complete" ]; then
  need=()
  command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
  command -v mvn >/dev/null 2>&1 || need+=(maven)
  if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  echo "fetching Apache Kafka $version (broker and tools) with Maven into $home/lib" >&2
  rm -rf "$home/lib"
  mvn -B -q -f "$pom" org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$PWD/$home/lib" >&2
  touch "$home/lib/.complete"
fi
echo "$PWD/$home"
