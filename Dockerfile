# syntax=docker/dockerfile:1
# Multi-stage: a static binary on distroless (CA certificates, tzdata, no
# shell), running as a non-root user. Build:
#   docker build --build-arg VERSION=$(git describe --tags --always) -t tokenauthz .
# For reproducible builds pin both base images by digest, e.g.
#   FROM golang:1.26@sha256:<digest> AS build
#   FROM gcr.io/distroless/static-debian12:nonroot@sha256:<digest>
# (docker buildx imagetools inspect <image> prints the digest; Renovate or
# Dependabot keep it current).
FROM golang:1.26 AS build
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
# The same command .ci/run uses to check the static build and its version.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -ldflags="-s -w -X main.buildVersion=${VERSION}" -o /tokenauthz ./cmd/tokenauthz \
    && /tokenauthz version

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /tokenauthz /tokenauthz
USER 65532:65532
EXPOSE 9191 9090
ENTRYPOINT ["/tokenauthz"]
CMD ["serve", "--config", "/etc/tokenauthz/config/config.yaml"]
