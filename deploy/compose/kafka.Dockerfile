# The broker of the compose stack: Apache Kafka 3.9.2 (the version deploy/local/pom.xml pins)
# with the native stack's jars, built here from deploy/local/pom.xml, never copied from a
# local build. Build from the repository root (compose does: context ../..).

# ---- the jars: SpiffePrincipalBuilder & co, the OPA authorizer, java-spiffe, JMX agent ----
FROM maven:3.9.11-eclipse-temurin-17 AS jars
WORKDIR /build
COPY deploy/local/pom.xml ./
# Dependencies first (a layer reused while only the sources change).
RUN mvn -B -q dependency:go-offline
COPY deploy/local/src ./src
RUN mvn -B -q -DskipTests package

# ---- the broker ----------------------------------------------------------------------------
FROM apache/kafka:3.9.2
# The same classpath as the native stack (deploy/local/tools.py kafka_classpath): our jar and
# target/lib, which holds Kafka 3.9.2 itself, the OPA authorizer and java-spiffe. The image's
# own /opt/kafka/libs is not on it, so no jar is there twice in two versions.
COPY --from=jars /build/target/spiffe-principal.jar /opt/pipeline/spiffe-principal.jar
COPY --from=jars /build/target/lib/ /opt/pipeline/lib/
COPY --from=jars /build/target/agents/jmx_prometheus_javaagent.jar /opt/pipeline/agents/jmx_prometheus_javaagent.jar
COPY deploy/compose/kafka/start.sh /opt/pipeline/start.sh
# The data directory, owned by the image's non-root user (a fresh named volume takes that
# owner), who runs the broker.
USER root
RUN mkdir -p /var/lib/kafka/data && chown appuser:appuser /var/lib/kafka/data
USER appuser
ENTRYPOINT ["/opt/pipeline/start.sh"]
