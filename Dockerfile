# One image for the pipeline's Python programs: the three services, pipectl, the lag
# exporter (and its KEDA Secret sidecar), the SVID sidecars and the one-shot setup. No ENTRYPOINT: compose (deploy/compose/compose.yaml) names the program, e.g.
# `python -m services.ingester`, `python -m services.lag_exporter`, `pipectl status`.
# Build from the repository root: docker build -t pipeline .

# ---- builder: the dependencies from pyproject.toml, in a venv copied whole below ----------
FROM python:3.11.13-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /venv
WORKDIR /app
# pyproject first, so a change to the code alone reuses the dependency layer.
COPY pyproject.toml README.md ./
COPY services ./services
# Editable install: the package stays at /app, where its code finds schemas/ and opa/
# (services/common/avro.py and topology.py resolve them from the source tree), and the
# runtime stage below puts /app and /venv at the same paths.
RUN /venv/bin/pip install -e .

# ---- runtime -----------------------------------------------------------------------------
FROM python:3.11.13-slim
# A fixed uid, not root: nothing here needs privileges, and the SPIRE agent attests by
# container labels (deploy/compose/README.md), not by this uid.
RUN groupadd --system --gid 10001 pipeline \
    && useradd --system --uid 10001 --gid pipeline --no-create-home --home-dir /app pipeline
# Where an SVID sidecar (compose's opa-svid, elasticsearch-svid) writes the server's SVID:
# a fresh named volume takes this directory's owner and mode. Group 0 may write too, since
# the Elasticsearch sidecar runs as that image's uid 1000, group 0.
RUN install -d -m 0770 -o 10001 -g 0 /svid
COPY --from=builder /venv /venv
WORKDIR /app
COPY --from=builder /app /app
# What the code reads at run time besides itself: the Avro schema store and the source list
# (policy data, opa/pipeline/data.json). The rest of opa/ is OPA's, mounted into OPA.
COPY schemas ./schemas
COPY opa/pipeline/data.json ./opa/pipeline/data.json
# The one-shot setup (deploy/compose/bootstrap.py: compose's `setup`, the Kubernetes Job
# pipeline-setup) and the native stack's definitions it imports (roles, bucket, search users,
# topic creation): Python modules only, none of the native stack's data or Java sources.
# tests/unit/test_compose.py checks that every module it imports is copied.
COPY deploy/compose/bootstrap.py ./deploy/compose/bootstrap.py
COPY deploy/local/*.py ./deploy/local/
ENV PATH=/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
