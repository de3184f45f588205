"""`pipectl status`: the whole pipeline on one screen.

Every component is asked at once, each with a short timeout, so a component that is down
costs at most that timeout and is named instead of hanging the command: the three services
(/healthz, /readyz), OPA, PostgreSQL, Kafka (as the operator identity), S3 and
Elasticsearch. With PIPELINE_STACK_DIR (the native stack) it also reads each service's
supervisor state: restarts, the last exit and error, and a crash loop, which fails the
service's check. Besides health it shows each consumer group's lag, records/s in and out of
each stage (from two samples of the services' Prometheus counters), the DLQ by error class
and how much each store holds.

Exit codes: 0 every component healthy and everything read; 1 something unhealthy,
unreachable or unreadable (the output names it); 2 bad settings or usage.
"""

from services.cli.status.config import GROUPS

__all__ = ["GROUPS"]
