#!/bin/bash
# Entrypoint of unibus-local/kafka, standing in for apache/kafka's /etc/kafka/docker/run.
#
# Same contract as the official image:
#   * unset essentials get the official defaults (single combined node, CLUSTER_ID
#     5L6g3nShT-eMCtK--X86sw, listeners on 29092/29093 and 9092, /tmp/kraft-combined-logs);
#   * every KAFKA_<NAME> variable becomes a server.properties entry: strip KAFKA_,
#     lower-case, `___` -> `-`, `__` -> `_`, `_` -> `.`
#     (KAFKA_CONTROLLER_QUORUM_VOTERS -> controller.quorum.voters);
#   * the JVM/launcher variables are not properties: KAFKA_HEAP_OPTS, KAFKA_OPTS,
#     KAFKA_JVM_PERFORMANCE_OPTS, KAFKA_LOG4J_OPTS, KAFKA_GC_LOG_OPTS, KAFKA_JMX_OPTS, ...;
#   * CLUSTER_ID names the cluster the storage is formatted for, once: a restarted
#     container keeps its formatted log directory.
set -euo pipefail

kafka_home=/opt/kafka  # lower case: KAFKA_* variables are properties
config=/run/unibus-kafka/server.properties

# The official image's defaults (its configureDefaults), for what the caller left unset.
: "${CLUSTER_ID:=5L6g3nShT-eMCtK--X86sw}"
: "${KAFKA_NODE_ID:=1}"
: "${KAFKA_LISTENER_SECURITY_PROTOCOL_MAP:=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PLAINTEXT_HOST:PLAINTEXT}"
: "${KAFKA_LISTENERS:=PLAINTEXT://localhost:29092,CONTROLLER://localhost:29093,PLAINTEXT_HOST://0.0.0.0:9092}"
: "${KAFKA_ADVERTISED_LISTENERS:=PLAINTEXT://localhost:29092,PLAINTEXT_HOST://localhost:9092}"
: "${KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR:=1}"
: "${KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS:=0}"
: "${KAFKA_TRANSACTION_STATE_LOG_MIN_ISR:=1}"
: "${KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR:=1}"
: "${KAFKA_PROCESS_ROLES:=broker,controller}"
: "${KAFKA_CONTROLLER_QUORUM_VOTERS:=1@localhost:29093}"
: "${KAFKA_INTER_BROKER_LISTENER_NAME:=PLAINTEXT}"
: "${KAFKA_CONTROLLER_LISTENER_NAMES:=CONTROLLER}"
: "${KAFKA_LOG_DIRS:=/tmp/kraft-combined-logs}"
export "${!KAFKA_@}"

not_a_property='^KAFKA_(VERSION|HEAP_OPTS|OPTS|JVM_PERFORMANCE_OPTS|LOG4J_OPTS|GC_LOG_OPTS|JMX_OPTS|JMX_PORT|JMX_HOSTNAME|DEBUG|LOG4J_ROOT_LOGLEVEL|LOG4J_LOGGERS|TOOLS_LOG4J_LOGLEVEL)$'

properties=()
while IFS='=' read -r -d '' name value; do
    [[ "$name" == KAFKA_* ]] || continue
    [[ "$name" =~ $not_a_property ]] && continue
    key="${name#KAFKA_}"
    key="${key,,}"
    key="${key//___/-}"
    key="${key//__/$'\x01'}"
    key="${key//_/.}"
    key="${key//$'\x01'/_}"
    properties+=("$key=$value")
done < <(env -0)

mkdir -p "$(dirname "$config")"
printf '%s\n' "${properties[@]}" | sort > "$config"

java_opts=(
    ${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}
    ${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true}
    ${KAFKA_LOG4J_OPTS:--Dlog4j2.configurationFile=$kafka_home/config/log4j2.properties}
    ${KAFKA_OPTS:-}
)

# Format the log directory once; a restarted container keeps it (and its data).
log_dirs="$(sed -n -e 's/^log\.dirs=//p' -e 's/^log\.dir=//p' "$config" | head -n 1)"
first_log_dir="${log_dirs%%,*}"
if [ -z "$first_log_dir" ] || [ ! -f "$first_log_dir/meta.properties" ]; then
    # The formatting JVM is short-lived: small heap, no JIT beyond C1.
    java -Xmx128m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        "-Dlog4j2.configurationFile=$kafka_home/config/log4j2.properties" \
        -cp "$kafka_home/libs/*" kafka.tools.StorageTool \
        format "--cluster-id=$CLUSTER_ID" "--config=$config" --ignore-formatted
fi

exec java "${java_opts[@]}" -cp "$kafka_home/libs/*" kafka.Kafka "$config"
