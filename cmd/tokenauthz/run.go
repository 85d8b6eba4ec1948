package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/extra/redisotel/v9"
	"github.com/redis/go-redis/v9"
	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/authz/decisionlog"
	"github.com/tokenauthz/tokenauthz/authz/httpauthz"
	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/verify"
)

// Health service names for Kubernetes' native gRPC probes.
const (
	healthLiveness  = "liveness"
	healthReadiness = "readiness"
)

// run serves until ctx ends, then shuts down in order: not ready, drain,
// stop. httpLis may be nil.
// runOptions are run's optional parts.
type runOptions struct {
	// configPath, when set, is watched and reloaded on change and on hup.
	configPath string
	hup        <-chan os.Signal
	reloadPoll time.Duration
}

type runOption func(*runOptions)

// withReload watches path for changes and reloads it on hup too.
func withReload(path string, hup <-chan os.Signal) runOption {
	return func(o *runOptions) { o.configPath, o.hup = path, hup }
}

func run(ctx context.Context, cfg *fileConfig, grpcLis, httpLis net.Listener, log *slog.Logger, opts ...runOption) error {
	ro := runOptions{reloadPoll: 10 * time.Second}
	for _, o := range opts {
		o(&ro)
	}
	logEffectiveConfig(log, cfg)
	for _, w := range cfg.Warnings() {
		log.Warn("config warning (tokenauthz validate lists these)", "warning", w)
	}
	tp, shutdownTracing, err := tracing(ctx)
	if err != nil {
		return fmt.Errorf("tracing: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = shutdownTracing(sctx) // flushes spans still buffered
	}()
	prop := propagator()
	met := newMetrics()

	var shared *cache.Shared
	if rc := cfg.Cache.Redis; rc != nil {
		// go-redis logs dial failures itself; they belong at debug, since the
		// breaker already reports an outage once.
		redis.SetLogger(redisLogger{log})
		var err error
		if shared, err = cache.NewShared(rc, cache.SharedOptions{Logger: log}); err != nil {
			return fmt.Errorf("redis: %w", err)
		}
		defer shared.Close()
		if err := redisotel.InstrumentTracing(shared.Client(), redisotel.WithTracerProvider(tp),
			redisotel.WithDBStatement(false)); err != nil { // statements would show keys and claims
			return fmt.Errorf("redis tracing: %w", err)
		}
		log.Info("redis tier on", "addrs", rc.Addrs, "master_name", rc.MasterName, "hmac", rc.HMACKeyFile != "" || rc.HMACKeyEnv != "")
	}
	v, err := verify.New(cfg.Issuers, verify.Options{Logger: log, CacheMaxBytes: cfg.Cache.MaxBytes, Shared: shared,
		VerifiedTokens: verify.VerifiedCacheOptions(cfg.Cache.VerifiedTokens),
		TracerProvider: tp, Propagator: prop, Observer: met, CallTrace: authz.CallTrace(prop)})
	if err != nil {
		return err
	}
	srv, err := authz.NewServer(&cfg.Config, v, log)
	if err != nil {
		return err
	}
	obs := authz.Observability{TracerProvider: tp, Propagator: prop, Observer: met,
		TraceSubject: cfg.Server.TraceSubject, AllowLogRate: cfg.Server.LogAllows}
	if dc := cfg.DecisionLog; dc != nil {
		dl, err := decisionlog.New(ctx, *dc, os.Stdout)
		if err != nil {
			return err
		}
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_ = dl.Close(sctx) // writes what is buffered
		}()
		obs.DecisionLog = dl
		met.watchDecisionLog(dl)
	}
	srv.Observe(obs)
	denylist := cache.NewDenylist(shared, nil)
	srv.UseDenylist(denylist)
	bg, stopBG := context.WithCancel(context.Background())
	defer stopBG()
	v.Start(bg)
	lv := &live{}
	adminToken, err := cache.ReadSecret(cfg.Server.AdminTokenFile, cfg.Server.AdminTokenEnv)
	if err != nil {
		return fmt.Errorf("admin token: %w", err)
	}
	lv.set(cfg, adminToken)
	// The policy in force: the file's and, with kubernetes.enabled, the
	// cluster's. A reload or a change of a resource replaces it.
	policy := newInForce(srv, v, &cfg.Config, bg, log)
	current := policy.cur.Load
	if cfg.Kubernetes.Enabled {
		if err := policy.followCluster(cfg.Kubernetes); err != nil {
			return err
		}
	}
	if ro.configPath != "" {
		rl := newReloader(ro.configPath, cfg, policy, met, log, lv, shared)
		go rl.watch(bg, ro.hup, ro.reloadPoll)
	}
	met.watchFleet(func() map[string]time.Duration { return current().KeySetAges() }, shared, denylist)
	go denylist.Run(bg, 30*time.Second)

	// The stats handler continues the trace Envoy sends in the call's
	// metadata; health and reflection calls are not traced.
	// inflight counts unary calls (Checks, health checks): a drain is done
	// when they are, even if a health Watch stream would hold it open.
	var inflight atomic.Int64
	countCalls := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		inflight.Add(1)
		defer inflight.Add(-1)
		return h(ctx, req)
	}
	serverOpts := []grpc.ServerOption{grpc.UnaryInterceptor(countCalls), grpc.NumStreamWorkers(streamWorkers())}
	if cfg.Server.TLS != nil {
		certs, err := newCertReloader(*cfg.Server.TLS, log)
		if err != nil {
			return fmt.Errorf("tls: %w", err)
		}
		serverOpts = append(serverOpts, grpc.Creds(credentials.NewTLS(certs.tlsServerConfig())))
	}
	// No otelgrpc stats handler: the decision span is the check's server
	// span and reads Envoy's trace context from the metadata itself; the
	// handler's own span (about 7 µs a call) said nothing more.
	gs := grpc.NewServer(serverOpts...)
	authv3.RegisterAuthorizationServer(gs, srv)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	if *cfg.Server.Reflection {
		reflection.Register(gs)
	}
	// Live at once; ready (overall and for the Check service) once every
	// issuer's keys have loaded, so a new pod takes no traffic it would
	// answer with 503s.
	hs.SetServingStatus(healthLiveness, healthpb.HealthCheckResponse_SERVING)
	setReady := func(st healthpb.HealthCheckResponse_ServingStatus) {
		for _, name := range []string{"", healthReadiness, authv3.Authorization_ServiceDesc.ServiceName} {
			hs.SetServingStatus(name, st)
		}
	}
	setReady(healthpb.HealthCheckResponse_NOT_SERVING)
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		start := time.Now()
		grace := cfg.Server.ReadinessGrace
		for !policy.ready() && (grace <= 0 || time.Since(start) < grace) {
			select {
			case <-bg.Done():
				return
			case <-t.C:
			}
		}
		setReady(healthpb.HealthCheckResponse_SERVING)
		if policy.ready() {
			log.Info("ready: keys of every issuer loaded")
		} else {
			log.Warn("ready without every issuer's keys: readiness_grace passed", "grace", grace.String())
		}
	}()

	var hsrv *http.Server
	if httpLis != nil {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(met.reg, promhttp.HandlerOpts{Registry: met.reg}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
			resp, err := hs.Check(r.Context(), &healthpb.HealthCheckRequest{Service: healthReadiness})
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				http.Error(w, "not ready", http.StatusServiceUnavailable)
				return
			}
			_, _ = w.Write([]byte("ok\n"))
		})
		if cfg.Server.AdminAddr == "" {
			mux.Handle("/admin/", adminHandler(lv, denylist))
		}
		hsrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := hsrv.Serve(httpLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server failed", "error", err)
			}
		}()
	}

	// The admin API on a listener of its own, when asked: the health and
	// metrics port is reachable by more (kubelet, Prometheus, meshes).
	adminAddr := "off"
	if cfg.Server.AdminAddr != "" {
		alis, err := net.Listen("tcp", cfg.Server.AdminAddr)
		if err != nil {
			return fmt.Errorf("%s", listenError("server.admin_addr", "server.admin_addr", cfg.Server.AdminAddr, err))
		}
		amux := http.NewServeMux()
		amux.Handle("/admin/", adminHandler(lv, denylist))
		asrv := &http.Server{Handler: amux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := asrv.Serve(alis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("admin server failed", "error", err)
			}
		}()
		defer func() { _ = asrv.Close() }()
		adminAddr = alis.Addr().String()
	} else if httpLis != nil {
		adminAddr = httpLis.Addr().String()
	}
	if lv.adminToken.Load() == nil {
		adminAddr += " (off until an admin token is configured)"
	}

	// The HTTP authorization endpoint, on a listener of its own: the same
	// decisions for proxies that ask over HTTP.
	authzAddr := "off"
	if cfg.Server.HTTPAuthzAddr != "" {
		h, err := httpauthz.New(cfg.HTTPAuthz, srv, prop, log)
		if err != nil {
			return fmt.Errorf("http_authz: %w", err)
		}
		zlis, err := net.Listen("tcp", cfg.Server.HTTPAuthzAddr)
		if err != nil {
			return fmt.Errorf("%s", listenError("server.http_authz_addr", "server.http_authz_addr", cfg.Server.HTTPAuthzAddr, err))
		}
		zsrv := h.Server()
		go func() {
			if err := zsrv.Serve(zlis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http authorization server failed", "error", err)
			}
		}()
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			_ = zsrv.Shutdown(sctx)
		}()
		authzAddr = zlis.Addr().String()
	}

	serveErr := make(chan error, 1)
	go func() { serveErr <- gs.Serve(grpcLis) }()
	httpAddr := "off"
	if httpLis != nil {
		httpAddr = httpLis.Addr().String()
	}
	log.Info("serving", "grpc_addr", grpcLis.Addr().String(), "http_addr", httpAddr, "admin_addr", adminAddr, "http_authz_addr", authzAddr,
		"issuers", len(cfg.Issuers), "routes", len(cfg.Routes))

	select {
	case err := <-serveErr:
		return fmt.Errorf("grpc server: %w", err)
	case <-ctx.Done():
	}
	// Drain: first say NOT_SERVING (Kubernetes takes the pod out of its
	// endpoints, Envoy's health checks see it), keep answering through the
	// lameduck pause while that news spreads, then stop taking new calls and
	// finish the ones in flight, within the deadline.
	log.Info("shutting down", "lameduck", cfg.Server.Lameduck.String(), "deadline", cfg.Server.ShutdownTimeout.String())
	hs.Shutdown()
	if cfg.Server.Lameduck > 0 {
		time.Sleep(cfg.Server.Lameduck)
	}
	done := make(chan struct{})
	go func() { gs.GracefulStop(); close(done) }()
	deadline := time.After(cfg.Server.ShutdownTimeout)
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	quiet := 0
drain:
	for {
		select {
		case <-done:
			break drain
		case <-poll.C:
			// GracefulStop takes no new calls; once the unary ones in
			// flight are answered (seen twice, so a call accepted just
			// before GracefulStop has reached the counter), only streams
			// (health watches) remain.
			if idle := inflight.Load() == 0; !idle {
				quiet = 0
			} else if quiet++; quiet >= 2 {
				gs.Stop()
				<-done
				break drain
			}
		case <-deadline:
			log.Warn("drain deadline passed; stopping", "in_flight", inflight.Load())
			gs.Stop()
			<-done
			break drain
		}
	}
	log.Info("stopped")
	if hsrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = hsrv.Shutdown(sctx)
	}
	return nil
}

// logEffectiveConfig logs the config in force. It holds no secrets: every
// secret is named by a file or an environment variable, never inlined.
// It is logged with the file's own key names (through YAML), defaults
// filled in.
func logEffectiveConfig(log *slog.Logger, cfg *fileConfig) {
	y, err := yaml.Marshal(cfg.withDefaults())
	if err != nil {
		return
	}
	var m map[string]any
	if yaml.Unmarshal(y, &m) != nil {
		return
	}
	log.Info("effective config", "config", m)
}

type redisLogger struct{ log *slog.Logger }

func (l redisLogger) Printf(ctx context.Context, format string, v ...any) {
	l.log.DebugContext(ctx, fmt.Sprintf(format, v...), "component", "go-redis")
}

func newLogger(format, level string) *slog.Logger {
	lvl, _ := parseLevel(level)
	opts := &slog.HandlerOptions{Level: lvl}
	if format == "text" {
		return slog.New(slog.NewTextHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewJSONHandler(os.Stderr, opts))
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	err := l.UnmarshalText([]byte(strings.ToUpper(s)))
	if err != nil {
		return l, fmt.Errorf("unknown level %q (debug, info, warn, error)", s)
	}
	return l, nil
}

// streamWorkers sizes gRPC's pool of goroutines that serve streams. A check
// needs a deeper stack than a new goroutine starts with, so one goroutine
// per call grew (copied) its stack on every call: about 8% of the CPU of a
// check of a new token under load. Pooled workers keep their grown stacks.
// Calls beyond the pool still get their own goroutine, so the pool only
// needs to cover the usual number in flight.
func streamWorkers() uint32 {
	return uint32(max(64, 16*runtime.GOMAXPROCS(0)))
}
