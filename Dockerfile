# Multi-stage: a static binary on distroless, non-root, no shell.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /tokenauthz ./cmd/tokenauthz

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /tokenauthz /tokenauthz
USER nonroot:nonroot
EXPOSE 9191 9090
ENTRYPOINT ["/tokenauthz"]
CMD ["serve", "--config", "/etc/tokenauthz/config.yaml"]
