# The broker image Strimzi runs for the Kafka resource (base/kafka.yaml spec.kafka.image):
# Strimzi's Kafka image with the native stack's jars (SpiffePrincipalBuilder, the OPA
# authorizer, java-spiffe), built from deploy/local/pom.xml in a Maven stage as
# deploy/compose/kafka.Dockerfile does. Only the jars Strimzi's image lacks are added: Kafka
# itself and its Scala runtime stay the image's. Build from the repository root:
#   docker build -f deploy/k8s/kafka.Dockerfile -t pipeline-strimzi-kafka:dev .
FROM maven:3.9.11-eclipse-temurin-17 AS jars
WORKDIR /build
COPY deploy/local/pom.xml ./
RUN mvn -B -q dependency:go-offline
COPY deploy/local/src ./src
RUN mvn -B -q -DskipTests package \
    && rm -f target/lib/kafka*.jar target/lib/scala-*.jar target/lib/zookeeper*.jar target/lib/slf4j-*.jar

FROM quay.io/strimzi/kafka:1.2.0-kafka-4.3.1
COPY --from=jars /build/target/spiffe-principal.jar /opt/kafka/libs/
COPY --from=jars /build/target/lib/ /opt/kafka/libs/
USER 1001
