# The broker image Strimzi runs for the Kafka resource (base/kafka.yaml spec.kafka.version/image):
# Strimzi's Kafka image with the native stack's plugins (SpiffePrincipalBuilder,
# MutualTlsOpaAuthorizer and the OPA authorizer plugin, java-spiffe), built from deploy/local/pom.xml
# in a Maven stage as deploy/compose/kafka.Dockerfile does, but against the image's Kafka
# (-Pkafka4: the same sources, tested against it by `make test-java`). That profile leaves Kafka's
# own jars out of target/kafka4/lib: what is there is what the plugins need beyond them (including
# scala-logging and Jackson's Scala module, which Kafka 3 brought and Kafka 4 does not).
# Build from the repository root:
#   docker build -f deploy/k8s/kafka.Dockerfile -t pipeline-strimzi-kafka:dev .
FROM maven:3.9.11-eclipse-temurin-17 AS jars
WORKDIR /build
COPY deploy/local/pom.xml ./
RUN mvn -B -q -Pkafka4 dependency:go-offline
COPY deploy/local/src ./src
RUN mvn -B -q -Pkafka4 -DskipTests package

FROM quay.io/strimzi/kafka:1.2.0-kafka-4.3.1
USER root
COPY --from=jars /build/target/kafka4/spiffe-principal.jar /opt/kafka/libs/
COPY --from=jars /build/target/kafka4/lib/ /tmp/pipeline-lib/
# lib/ names each jar by artifact alone. One the image has (any version) stays the image's, so the
# broker never has two copies of a library on its classpath; the others are added. Except the OPA
# plugin: MutualTlsOpaAuthorizer relies on 1.5.1's internals (AllowCallable's HTTP client), so
# ours replaces any copy of the image's.
RUN set -eu; \
    rm -f /opt/kafka/libs/opa-authorizer-*.jar; \
    for jar in /tmp/pipeline-lib/*.jar; do \
      name=$(basename "$jar" .jar); \
      if ls /opt/kafka/libs/"$name"-[0-9]*.jar >/dev/null 2>&1; then \
        echo "kept the image's $name"; \
      else \
        cp "$jar" /opt/kafka/libs/; \
      fi; \
    done; \
    rm -rf /tmp/pipeline-lib
USER 1001
