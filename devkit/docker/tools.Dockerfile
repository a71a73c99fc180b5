# compose-smoke's test hosts: an S3 endpoint (moto's server, MinIO's stand-in: MinIO has no
# package here) and the image server of synthetic pictures. Versions from the development lock.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY requirements-dev.txt deploy/locks/installer.txt /tmp/build/
RUN python -m pip install --no-cache-dir --require-hashes -r /tmp/build/installer.txt \
    && uv pip install --no-cache --python "$(command -v python)" -c /tmp/build/requirements-dev.txt \
        "moto[server]" numpy pillow \
    && rm -r /tmp/build
COPY ml/__init__.py ml/errors.py ml/labels.py /opt/tools/ml/
COPY devkit/__init__.py devkit/imageserver.py /opt/tools/devkit/
WORKDIR /opt/tools
ENV PYTHONPATH=/opt/tools
