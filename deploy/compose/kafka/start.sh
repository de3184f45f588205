#!/bin/sh
# The compose broker's start: format the KRaft storage once, then run the broker with the
# native stack's Java options (deploy/local/components.py KafkaBroker). Config files are
# mounted at /etc/pipeline/kafka/: server.properties (generated from the native template by
# deploy/compose/generate.py), jmx-exporter.yml and log4j.properties (the native files).
set -eu
conf=/etc/pipeline/kafka
cp="/opt/pipeline/spiffe-principal.jar:/opt/pipeline/lib/*"
log4j="-Dlog4j.configuration=file:$conf/log4j.properties"
: "${KAFKA_CLUSTER_ID:?set KAFKA_CLUSTER_ID (deploy/compose/.env)}"

if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  # --cluster-id=<id> as one argument: a base64url id may start with "-".
  java -Xmx256m "$log4j" -cp "$cp" kafka.tools.StorageTool format --ignore-formatted \
    "--cluster-id=$KAFKA_CLUSTER_ID" "--config=$conf/server.properties"
fi

# acceptAll: any SPIFFE ID of the trust domain may connect; OPA decides what it may do.
# The JMX exporter listens on all interfaces here (Prometheus scrapes it over the compose
# network); the native stack keeps it on loopback.
exec java -Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true "$log4j" \
  -Dssl.spiffe.acceptAll=true \
  "-javaagent:/opt/pipeline/agents/jmx_prometheus_javaagent.jar=9404:$conf/jmx-exporter.yml" \
  -cp "$cp" kafka.Kafka "$conf/server.properties"
