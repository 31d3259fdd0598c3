# syntax=docker/dockerfile:1
#
# Palisade's images, one target each (see docs/install.md, "Building the images"):
#
#   docker build --target palisade-ca         -t ghcr.io/palisade-mesh/palisade-ca:0.1.0 .
#   docker build --target palisade-injector   -t ghcr.io/palisade-mesh/palisade-injector:0.1.0 .
#   docker build --target palisade-proxy      -t ghcr.io/palisade-mesh/palisade-proxy:0.1.0 .
#
# The binaries are built once, in the `build` stage, by the same cargo command the tests run
# (scripts/test.sh), in release mode. Runtime images are distroless: no shell, no package
# manager, the binary and the C runtime it links (libc, libgcc) only.

# Kubernetes probes the admin ports (see the chart); a Docker HEALTHCHECK would need a shell or
# a client in the image and is ignored by Kubernetes.
# checkov:skip=CKV_DOCKER_2:Kubernetes ignores HEALTHCHECK; the chart probes /ready and /live on the admin ports.

# ---- build: every binary of the workspace ----------------------------------------------------
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# Only the sources: a local target/ must not reach the build context's layers.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY ca ./ca
COPY plumbing ./plumbing
COPY testkit ./testkit
COPY proxy ./proxy
COPY injector ./injector
COPY benches ./benches
COPY tests ./tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --workspace --bins --locked --release \
 && install -D -m 0755 -t /out \
      target/release/palisade-ca target/release/palisade-injector target/release/palisade-proxy

# ---- iptables for palisade-init: both backends, files only ------------------------------------
# The injector runs the pod's init container palisade-init (`palisade-proxy init`) from the proxy
# image (palisade-injector --proxy-image), so that image carries iptables. Here the files of
# iptables and the libraries it links are copied into /rootfs, so it gets iptables without
# Debian's shell or apt. `iptables` points at the nft backend, as on Debian and current
# distributions; iptables-legacy* and iptables-nft* (and their ip6tables twins, for dual-stack
# pods) are all there for `palisade-proxy init` to pick the one the node's kernel rules use.
FROM docker.io/library/debian:bookworm-slim AS iptables
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
RUN set -eux; \
    mkdir -p /rootfs; \
    dpkg -L iptables libip4tc2 libip6tc2 libxtables12 libmnl0 libnftnl11 \
             libnetfilter-conntrack3 libnfnetlink0 \
      | while read -r f; do \
          if [ -f "$f" ] || [ -L "$f" ]; then \
            echo "$(readlink -f "$(dirname "$f")")/$(basename "$f")"; \
          fi; \
        done \
      | grep -v -e '^/usr/share/' -e '-apply$' > /tmp/files; \
    tar --no-recursion -cf - -T /tmp/files | tar -xf - -C /rootfs; \
    for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do \
      ln -s xtables-nft-multi "/rootfs/usr/sbin/$t"; \
    done; \
    mkdir -p /rootfs/run; \
    test -x /rootfs/usr/sbin/xtables-legacy-multi; \
    test -x /rootfs/usr/sbin/xtables-nft-multi

# ---- runtime images ---------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS palisade-ca
COPY --from=build /out/palisade-ca /usr/local/bin/palisade-ca
USER 65532:65532
EXPOSE 15012 15014
ENTRYPOINT ["/usr/local/bin/palisade-ca"]
CMD ["serve"]

FROM gcr.io/distroless/cc-debian12:nonroot AS palisade-injector
COPY --from=build /out/palisade-injector /usr/local/bin/palisade-injector
USER 65532:65532
EXPOSE 15017 15014
ENTRYPOINT ["/usr/local/bin/palisade-injector"]
CMD ["serve"]

# The sidecar runs as uid 1337: the capture rules skip that uid's own traffic. The same image
# runs palisade-init, which the injector starts as uid 0 with NET_ADMIN and NET_RAW only; the
# sidecar itself has every capability dropped, so iptables can do nothing there.
FROM gcr.io/distroless/cc-debian12:nonroot AS palisade-proxy
COPY --from=iptables /rootfs/ /
COPY --from=build /out/palisade-proxy /usr/local/bin/palisade-proxy
USER 1337:1337
EXPOSE 15001 15006 15021
ENTRYPOINT ["/usr/local/bin/palisade-proxy"]
CMD ["run"]
