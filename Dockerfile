# The fleet image: the controller CLI (`python -m fleet`), the broker initialiser
# (`python -m fleet.broker_init`) and the terminal simulator (`python -m device_sim`).
# Used by docker-compose.yml; build with `docker build -t fleet .`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Only what the package build needs, so edits to tests or docs do not invalidate the layer.
WORKDIR /src
COPY pyproject.toml ./
COPY fleet/ fleet/
COPY device_sim/ device_sim/
RUN pip install . && rm -rf /src

# A fixed, non-root uid/gid, so volume ownership is the same on every host.
# /var/lib/fleet/artifacts: the artifacts volume (FLEET_ARTIFACT_DIR).
# /var/lib/fleet/broker: where the one-shot broker-init mounts the broker's data volume to
# write the dynamic-security bootstrap file. Both exist in the image owned by `fleet`, so
# a new named volume mounted there is created writable by this user.
RUN groupadd --system --gid 10001 fleet \
    && useradd --system --uid 10001 --gid fleet --home-dir /var/lib/fleet \
        --shell /usr/sbin/nologin fleet \
    && install -d -o fleet -g fleet -m 0755 \
        /var/lib/fleet /var/lib/fleet/artifacts /var/lib/fleet/broker

# Container defaults; every other setting keeps FleetSettings' default unless set.
# Listening on all interfaces is what makes the published port reach the HTTP server.
ENV FLEET_HTTP_HOST=0.0.0.0 \
    FLEET_ARTIFACT_DIR=/var/lib/fleet/artifacts

USER fleet:fleet
WORKDIR /var/lib/fleet
EXPOSE 8080

ENTRYPOINT ["python", "-m", "fleet"]
CMD ["serve"]
