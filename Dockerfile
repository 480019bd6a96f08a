# FlexCache daemon image: ghcr.io/flexcache/flexcache:0.1.0 in k8s/.
#   docker build -t ghcr.io/flexcache/flexcache:0.1.0 .
#   docker run -p 50051:50051 -p 50052:50052 -p 9464:9464 -v flexcache-data:/var/lib/flexcache \
#     ghcr.io/flexcache/flexcache:0.1.0
# 50052 is the data port (fetched blobs); publish it under the same number: clients dial the number
# the daemon reports.
# The daemon never imports torch: the image installs flexcache[daemon] and copies no model code.

# Build stage: compiles proto/ into the wheel (grpcio-tools is a build-system requirement) and
# collects wheels for the runtime dependencies.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto/ proto/
COPY daemon/ daemon/
COPY client/ client/
RUN pip wheel --wheel-dir /wheels '.[daemon]'

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# No FLEXCACHE_* variables here on purpose: env vars override the --config file, so an image
# default would silently win over a Kubernetes ConfigMap.
RUN groupadd --system --gid 10001 flexcache \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin flexcache \
    && mkdir -p /var/lib/flexcache \
    && chown 10001:10001 /var/lib/flexcache
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels 'flexcache[daemon]' && rm -rf /wheels
USER 10001:10001
WORKDIR /var/lib/flexcache
EXPOSE 50051 50052 9464
ENTRYPOINT ["flexcache", "serve"]
# Defaults for `docker run`; Kubernetes `args:` replace them (k8s/ passes --config instead). On these
# addresses anyone who reaches the ports can use every tenant's entries: for a shared daemon add TLS
# and tokens (FLEXCACHE_TLS_CERT_FILE, FLEXCACHE_TLS_KEY_FILE, FLEXCACHE_AUTH_TOKENS_FILE; README
# "Security"); without them the daemon starts with a SECURITY error line saying so.
CMD ["--data-dir", "/var/lib/flexcache", "--listen", "0.0.0.0:50051", "--data-listen", "0.0.0.0:50052", \
     "--metrics-listen", "0.0.0.0:9464"]
