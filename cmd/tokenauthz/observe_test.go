package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// scrape reads /metrics and returns the families by name.
func scrape(t *testing.T, base string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// value sums the samples of a counter or histogram (count) whose labels
// include want.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	var sum float64
	f := fams[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		for k, v := range want {
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == k && l.GetValue() == v {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		}
	}
	return sum
}

func TestMetricsCountDecisions(t *testing.T) {
	key := idptest.NewKey(t, "k1", "ES256")
	idp := idptest.New(t, key)
	p := startPod(t, fmt.Sprintf(`
issuers:
  - { name: main, issuer: "%s", audiences: [api], jwks_uri: "%s", algorithms: [ES256] }
routes:
  - { name: admin, match: { path_prefix: /admin }, scopes: [admin] }
  - { name: all, match: { path_prefix: / } }
`, idp.URL(), idp.JWKSURL()))
	tok := idptest.Mint(t, key, idp.Claims("api"))
	for range 3 {
		if c := p.check(tok); c != 0 {
			t.Fatalf("allow expected, got %v", c)
		}
	}
	for range 2 {
		_ = p.check("garbage")
	}
	fams := scrape(t, p.adminURL)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"tokenauthz_decisions_total", map[string]string{"decision": "allow", "route": "all", "issuer": "main", "reason": "ok"}, 3},
		{"tokenauthz_decisions_total", map[string]string{"decision": "deny", "route": "all", "reason": "malformed"}, 2},
		{"tokenauthz_decision_duration_seconds", map[string]string{"decision": "allow"}, 3},
		{"tokenauthz_decision_duration_seconds", nil, 5},
		{"tokenauthz_keyset_fetches_total", map[string]string{"issuer": "main", "result": "ok"}, 1},
		// Verified twice (a token is kept from its second verification),
		// then the verified-token cache answers.
		{"tokenauthz_cache_lookups_total", map[string]string{"kind": "keys"}, 2},
		{"tokenauthz_cache_lookups_total", map[string]string{"kind": "tokens", "tier": "origin"}, 2},
		{"tokenauthz_cache_lookups_total", map[string]string{"kind": "tokens", "tier": "memory"}, 1},
		{"tokenauthz_build_info", nil, 1},
	} {
		if got := value(fams, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if age := value(fams, "tokenauthz_keyset_age_seconds", map[string]string{"issuer": "main"}); age < 0 || age > 60 {
		t.Errorf("key set age %v", age)
	}
	if fams["go_goroutines"] == nil || fams["process_resident_memory_bytes"] == nil {
		t.Error("no Go runtime or process metrics")
	}
	// Every result of config reloads is there from the start; build info
	// carries the bare version.
	if f := fams["tokenauthz_config_reloads_total"]; f == nil || len(f.GetMetric()) != 2 {
		t.Errorf("tokenauthz_config_reloads_total at start: %v", f)
	}
	for _, m := range fams["tokenauthz_build_info"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "version" && (l.GetValue() == "" || strings.Contains(l.GetValue(), "tokenauthz")) {
				t.Errorf("build info version %q", l.GetValue())
			}
		}
	}
	// Every metric served is in the metrics table (docs/operations.md).
	readme, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	for name := range fams {
		if strings.HasPrefix(name, "tokenauthz_") && !strings.Contains(string(readme), strings.TrimSuffix(name, "_total")) {
			t.Errorf("%s is not in the README's metrics table", name)
		}
	}
	// No label may carry a subject, a token or a path.
	for name, f := range fams {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if v := l.GetValue(); strings.Contains(v, "user-1") || strings.Contains(v, tok) || strings.HasPrefix(v, "/") {
					t.Errorf("%s has label %s=%q", name, l.GetName(), v)
				}
			}
		}
	}
}

func TestGrafanaDashboardUsesServedMetrics(t *testing.T) {
	b, err := os.ReadFile("../../deploy/grafana/tokenauthz-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Title  string `json:"title"`
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	m := newMetrics()
	m.watchFleet(func() map[string]time.Duration { return map[string]time.Duration{"x": 0} }, nil, cache.NewDenylist(nil, nil))
	fams, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, f := range fams {
		known[f.GetName()] = true
	}
	// Series that exist only once they have a sample, or only with Redis.
	for _, n := range []string{"tokenauthz_decisions_total", "tokenauthz_decision_duration_seconds", "tokenauthz_keyset_fetches_total",
		"tokenauthz_provider_requests_total", "tokenauthz_provider_request_duration_seconds", "tokenauthz_cache_lookups_total",
		"tokenauthz_redis_breaker_state", "tokenauthz_redis_errors_total", "tokenauthz_redis_rejected_entries_total"} {
		known[n] = true
	}
	name := regexp.MustCompile(`\b(tokenauthz_[a-z_]+?)(_bucket|_count|_sum)?\b`)
	panels := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			panels++
			for _, m := range name.FindAllStringSubmatch(tg.Expr, -1) {
				if !known[m[1]] {
					t.Errorf("panel %q uses %s, which tokenauthz does not serve", p.Title, m[1])
				}
			}
		}
	}
	if panels < 6 {
		t.Errorf("the dashboard has %d queries", panels)
	}
}

func TestReadinessFollowsKeysAndDrain(t *testing.T) {
	key := idptest.NewKey(t, "k1", "ES256")
	idp := idptest.New(t, key)
	idp.SetDown(true)
	cfg, err := parseConfig([]byte(fmt.Sprintf(`
server: { shutdown_timeout: 2s }
issuers:
  - name: main
    issuer: "%s"
    audiences: [api]
    jwks_uri: "%s"
    algorithms: [ES256]
    keys: { min_refresh_interval: 100ms }
routes:
  - { name: all, match: { path_prefix: / } }
`, idp.URL(), idp.JWKSURL())), "test")
	if err != nil {
		t.Fatal(err)
	}
	httpLis, _ := net.Listen("tcp", "127.0.0.1:0")
	svc := runService(t, cfg, nil, httpLis)
	hc := healthpb.NewHealthClient(svc.conn)
	status := func(svc string) healthpb.HealthCheckResponse_ServingStatus {
		r, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
		if err != nil {
			return healthpb.HealthCheckResponse_UNKNOWN
		}
		return r.GetStatus()
	}
	readyz := func() int {
		r, err := http.Get("http://" + httpLis.Addr().String() + "/readyz")
		if err != nil {
			return 0
		}
		r.Body.Close()
		return r.StatusCode
	}
	waitFor(t, func() bool { return status("liveness") == healthpb.HealthCheckResponse_SERVING })
	// The provider is down: live, not ready, for a while (several fetch
	// retries go by).
	waitFor(t, func() bool { return idp.JWKSHits.Load() >= 3 })
	if s := status("readiness"); s != healthpb.HealthCheckResponse_NOT_SERVING || readyz() != 503 {
		t.Fatalf("ready without keys: %v, /readyz %d", s, readyz())
	}
	idp.SetDown(false)
	waitFor(t, func() bool { return status("readiness") == healthpb.HealthCheckResponse_SERVING && readyz() == 200 })
	if s := status(authv3.Authorization_ServiceDesc.ServiceName); s != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("Check service health %v", s)
	}

	// Draining: a watcher sees NOT_SERVING before the server goes.
	w, err := hc.Watch(context.Background(), &healthpb.HealthCheckRequest{Service: "readiness"})
	if err != nil {
		t.Fatal(err)
	}
	if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v %v", r, err)
	}
	svc.cancel() // start the drain; the cleanup waits for its end
	r, err := w.Recv()
	if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("on drain: %v %v, want NOT_SERVING", r, err)
	}
}

// collector is a real OTLP trace receiver: the collector's gRPC service.
type collector struct {
	collectortrace.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []string // "service.name/span name"
}

func (c *collector) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		svc := ""
		for _, a := range rs.GetResource().GetAttributes() {
			if a.GetKey() == "service.name" {
				svc = a.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				c.spans = append(c.spans, fmt.Sprintf("%s/%s/%x", svc, s.GetName(), s.GetTraceId()))
			}
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

func TestSpansExportedOverOTLP(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	col := &collector{}
	gs := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(gs, col)
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"+lis.Addr().String())
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
	t.Setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
	t.Setenv("OTEL_SERVICE_NAME", "tokenauthz-test")

	key := idptest.NewKey(t, "k1", "ES256")
	idp := idptest.New(t, key)
	cfg, err := parseConfig([]byte(fmt.Sprintf(`
issuers:
  - { name: main, issuer: "%s", audiences: [api], jwks_uri: "%s", algorithms: [ES256] }
routes:
  - { name: all, match: { path_prefix: / } }
`, idp.URL(), idp.JWKSURL())), "test")
	if err != nil {
		t.Fatal(err)
	}
	svc := runService(t, cfg, nil, nil)
	traceID := "4bf92f3577b34da6a3ce929d0e0e4736"
	// Envoy sends its trace context in the call's metadata.
	ctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")
	resp, err := authv3.NewAuthorizationClient(svc.conn).Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/x", Host: "api",
			Headers: map[string]string{"authorization": "Bearer " + idptest.Mint(t, key, idp.Claims("api"))}}}}})
	if err != nil || resp.GetStatus().GetCode() != 0 {
		t.Fatalf("check: %v %v", err, resp.GetStatus())
	}
	if err := svc.stop(); err != nil { // shutdown flushes the batch
		t.Fatal(err)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	want := "tokenauthz-test/tokenauthz.check/" + traceID
	for _, s := range col.spans {
		if s == want {
			return
		}
	}
	t.Fatalf("collector did not receive %s; got %v", want, col.spans)
}

// TestUntracedServiceCarriesEnvoysTrace: serve with no exporter reads the
// call's trace context only when something uses it; a provider call is such
// a use, and carries Envoy's trace on.
func TestUntracedServiceCarriesEnvoysTrace(t *testing.T) {
	key := idptest.NewKey(t, "k1", "ES256")
	idp := idptest.New(t, key)
	idp.RegisterClient(idptest.Client{ID: "authz", Secret: "secret", Method: "client_secret_basic"})
	secret := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secret, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := parseConfig([]byte(fmt.Sprintf(`
issuers:
  - name: main
    issuer: "%s"
    audiences: [api]
    jwks_uri: "%s"
    algorithms: [ES256]
    introspection: { endpoint: "%s", client_id: authz, client_secret_file: "%s" }
routes:
  - { name: all, match: { path_prefix: / } }
`, idp.URL(), idp.JWKSURL(), idp.IntrospectionURL(), secret)), "test")
	if err != nil {
		t.Fatal(err)
	}
	svc := runService(t, cfg, nil, nil)
	traceID := "4bf92f3577b34da6a3ce929d0e0e4736"
	ctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", "00-"+traceID+"-00f067aa0ba902b7-01")
	opaque := idp.Opaque(map[string]any{"active": true, "sub": "u1", "aud": "api", "iss": idp.URL()})
	resp, err := authv3.NewAuthorizationClient(svc.conn).Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/x", Host: "api",
			Headers: map[string]string{"authorization": "Bearer " + opaque}}}}})
	if err != nil || resp.GetStatus().GetCode() != 0 {
		t.Fatalf("check: %v %v", err, resp.GetStatus())
	}
	if tp := idp.LastRequest().Header.Get("traceparent"); !strings.Contains(tp, traceID) {
		t.Errorf("the introspection call carried traceparent %q, want Envoy's trace %s", tp, traceID)
	}
}
