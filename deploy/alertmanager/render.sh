#!/bin/sh
# render.sh TEMPLATE OUT: writes TEMPLATE to OUT with ${ALERT_WEBHOOK_URL} and
# ${ALERT_SLACK_WEBHOOK_URL} replaced by their values from the environment (Alertmanager itself
# expands no variables). Fails, naming the variable, when one is unset or empty.
set -eu
template=$1
out=$2
: "${ALERT_WEBHOOK_URL:?set ALERT_WEBHOOK_URL in .env}"
: "${ALERT_SLACK_WEBHOOK_URL:?set ALERT_SLACK_WEBHOOK_URL in .env}"
# Escape what sed's replacement treats specially: \, & and the | delimiter.
escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }
webhook=$(escape "$ALERT_WEBHOOK_URL")
slack=$(escape "$ALERT_SLACK_WEBHOOK_URL")
sed -e "s|\${ALERT_WEBHOOK_URL}|$webhook|g" -e "s|\${ALERT_SLACK_WEBHOOK_URL}|$slack|g" \
  "$template" > "$out"
