# compose-smoke's stand-in for redis:7 (no image registry here): Debian's redis-server and
# redis-cli, its `redis` user and /data as the working folder, as the official image has them.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
CMD ["redis-server"]
