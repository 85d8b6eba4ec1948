package authz_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/redis/go-redis/extra/redisotel/v9"
	"go.opentelemetry.io/contrib/propagators/b3"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc/metadata"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/verify"
)

var testProp = propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}, b3.New())

// tracedFixture serves the introspection fixture as serve does (a gRPC
// server with no stats handler, a traced verifier, the Redis tier
// instrumented with redisotel), all spans into an in-memory recorder.
func tracedFixture(t *testing.T) (*introFixture, authv3.AuthorizationClient, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	f := newIntroFixture(t, "client_secret_basic")
	rs := redistest.Start(t)
	shared, err := cache.NewShared(redisConfig(t, rs, ""), cache.SharedOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = shared.Close() })
	if err := redisotel.InstrumentTracing(shared.Client(), redisotel.WithTracerProvider(tp), redisotel.WithDBStatement(false)); err != nil {
		t.Fatal(err)
	}
	v, err := verify.New(f.cfg.Issuers, verify.Options{Shared: shared, TracerProvider: tp, Propagator: testProp})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := authz.NewServer(f.cfg, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv.Observe(authz.Observability{TracerProvider: tp, Propagator: testProp})
	c := serve(t, srv)
	return f, c, rec
}

const (
	envoyTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	envoySpan  = "00f067aa0ba902b7"
)

// decisionSpan finds the one decision span of a trace.
func decisionSpan(t *testing.T, rec *tracetest.SpanRecorder, traceID string) sdktrace.ReadOnlySpan {
	t.Helper()
	var found []sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		if s.Name() == "tokenauthz.check" && s.SpanContext().TraceID().String() == traceID {
			found = append(found, s)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d decision spans in trace %s", len(found), traceID)
	}
	return found[0]
}

func children(rec *tracetest.SpanRecorder, parent trace.SpanContext) map[string][]sdktrace.ReadOnlySpan {
	out := map[string][]sdktrace.ReadOnlySpan{}
	var walk func(id trace.SpanID)
	walk = func(id trace.SpanID) {
		for _, s := range rec.Ended() {
			if s.Parent().SpanID() == id && s.SpanContext().TraceID() == parent.TraceID() {
				out[s.Name()] = append(out[s.Name()], s)
				walk(s.SpanContext().SpanID())
			}
		}
	}
	walk(parent.SpanID())
	return out
}

func attr(s sdktrace.ReadOnlySpan, key string) string {
	for _, a := range s.Attributes() {
		if string(a.Key) == key {
			return a.Value.Emit()
		}
	}
	return ""
}

func TestDecisionSpanContinuesEnvoysTraceFromMetadata(t *testing.T) {
	f, c, rec := tracedFixture(t)
	tok := f.opaque(nil)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", "00-"+envoyTrace+"-"+envoySpan+"-01")
	resp, err := c.Check(ctx, req{path: "/payments/1", headers: bearer(f.jwt(t))}.proto())
	if err != nil || resp.GetStatus().GetCode() != 0 {
		t.Fatalf("check: %v %v", err, resp.GetStatus())
	}
	_, err = c.Check(metadata.AppendToOutgoingContext(context.Background(), "traceparent",
		"00-"+strings.Repeat("a", 32)+"-"+envoySpan+"-01"), req{headers: bearer(tok)}.proto())
	if err != nil {
		t.Fatal(err)
	}

	d := decisionSpan(t, rec, envoyTrace)
	// The decision span is the check's server span, right under Envoy's
	// span from the metadata.
	if d.SpanKind() != trace.SpanKindServer || d.Parent().SpanID().String() != envoySpan || !d.Parent().IsRemote() {
		t.Fatalf("the decision span is not a server span under Envoy's span: kind %v, parent %v", d.SpanKind(), d.Parent())
	}
	for k, want := range map[string]string{"tokenauthz.decision": "allow", "tokenauthz.reason": "ok", "tokenauthz.route": "payments",
		"tokenauthz.issuer": "main", "tokenauthz.token.kind": "jwt", "tokenauthz.keys.source": "origin",
		"tokenauthz.answer.source": "origin", "http.response.status_code": "200",
		"rpc.system": "grpc", "rpc.service": "envoy.service.auth.v3.Authorization", "rpc.method": "Check"} {
		if got := attr(d, k); got != want {
			t.Errorf("decision span %s = %q, want %q", k, got, want)
		}
	}
	kids := children(rec, d.SpanContext())
	for _, name := range []string{"tokenauthz.keys.lookup", "tokenauthz.keys.fetch", "tokenauthz.verify.signature",
		"tokenauthz.introspection", "HTTP GET", "HTTP POST", "get", "set"} {
		if len(kids[name]) == 0 {
			names := []string{}
			for n := range kids {
				names = append(names, n)
			}
			t.Errorf("no %q span under the decision span; have %v", name, names)
		}
	}
	if got := attr(kids["tokenauthz.keys.fetch"][0], "tokenauthz.source"); got != "origin" {
		t.Errorf("keys.fetch source %q", got)
	}

	// The opaque token's decision, in its own trace.
	o := decisionSpan(t, rec, strings.Repeat("a", 32))
	if attr(o, "tokenauthz.token.kind") != "opaque" || attr(o, "tokenauthz.answer.source") != "origin" {
		t.Errorf("opaque decision attributes: %v", o.Attributes())
	}
	assertNoSecretsInSpans(t, rec, tok, "user-1")
}

// linkedDecisionSpan finds the one decision span that links to traceID.
func linkedDecisionSpan(t *testing.T, rec *tracetest.SpanRecorder, traceID string) sdktrace.ReadOnlySpan {
	t.Helper()
	var found []sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		for _, l := range s.Links() {
			if s.Name() == "tokenauthz.check" && l.SpanContext.TraceID().String() == traceID {
				found = append(found, s)
			}
		}
	}
	if len(found) != 1 {
		t.Fatalf("%d decision spans link to trace %s", len(found), traceID)
	}
	return found[0]
}

// TestDecisionSpanLinksTheRequestsTrace: with no trace context in the gRPC
// metadata, the decision span is the root of the call's own trace and links
// to the request's traceparent or b3 context; so it is exported even when
// the request's context says not sampled, and no span lands in a trace
// nobody else records.
func TestDecisionSpanLinksTheRequestsTrace(t *testing.T) {
	f, c, rec := tracedFixture(t)
	jwt := f.jwt(t)
	for flags, tr := range map[string]string{"01": strings.Repeat("1", 32), "00": strings.Repeat("d", 32)} { // sampled, and not
		_, err := c.Check(context.Background(), req{headers: map[string]string{"authorization": "Bearer " + jwt,
			"traceparent": "00-" + tr + "-" + envoySpan + "-" + flags}}.proto())
		if err != nil {
			t.Fatal(err)
		}
		d := linkedDecisionSpan(t, rec, tr)
		if d.SpanContext().TraceID().String() == tr || d.Parent().IsValid() || d.SpanKind() != trace.SpanKindServer {
			t.Fatalf("flags %s: the decision span should be a server span and a root of its own trace: parent %v", flags, d.Parent())
		}
	}
	// B3 multiple headers, as an Istio sidecar sends them.
	b3Trace := strings.Repeat("b", 32)
	_, err := c.Check(context.Background(), req{headers: map[string]string{"authorization": "Bearer " + jwt,
		"x-b3-traceid": b3Trace, "x-b3-spanid": "1234567890abcdef", "x-b3-sampled": "1"}}.proto())
	if err != nil {
		t.Fatal(err)
	}
	if l := linkedDecisionSpan(t, rec, b3Trace).Links()[0]; l.SpanContext.SpanID().String() != "1234567890abcdef" {
		t.Fatalf("b3 link %v", l.SpanContext)
	}
	// A deny carries its reason.
	_, _ = c.Check(context.Background(), req{headers: map[string]string{"authorization": "Bearer " + jwt + "x",
		"traceparent": "00-" + strings.Repeat("c", 32) + "-" + envoySpan + "-01"}}.proto())
	deny := linkedDecisionSpan(t, rec, strings.Repeat("c", 32))
	if attr(deny, "tokenauthz.decision") != "deny" || attr(deny, "http.response.status_code") != "401" || attr(deny, "tokenauthz.reason") == "" {
		t.Errorf("deny span attributes %v", deny.Attributes())
	}
	assertNoSecretsInSpans(t, rec, jwt, "user-1")
}

// assertNoSecretsInSpans: no span, attribute or event holds the token or
// personal data.
func assertNoSecretsInSpans(t *testing.T, rec *tracetest.SpanRecorder, secrets ...string) {
	t.Helper()
	for _, s := range rec.Ended() {
		dump := fmt.Sprint(s.Name(), s.Attributes(), s.Events(), s.Status(), s.Links())
		for _, secret := range secrets {
			if strings.Contains(dump, secret) {
				t.Errorf("span %q holds %q: %s", s.Name(), secret, dump)
			}
		}
	}
}

// tracedServer is the fixture's Check server in process (no gRPC),
// recording spans.
func tracedServer(t *testing.T, traceSubject bool) (*introFixture, *authz.Server, *tracetest.SpanRecorder) {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	f := newIntroFixture(t, "client_secret_basic")
	v, err := verify.New(f.cfg.Issuers, verify.Options{TracerProvider: tp})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := authz.NewServer(f.cfg, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv.Observe(authz.Observability{TracerProvider: tp, Propagator: testProp, TraceSubject: traceSubject})
	return f, srv, rec
}

func TestDecisionSpanNamesTheSubjectOnlyWhenAsked(t *testing.T) {
	f, srv, rec := tracedServer(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := srv.Check(ctx, req{headers: bearer(f.jwt(t))}.proto()); err != nil {
		t.Fatal(err)
	}
	for _, s := range rec.Ended() {
		if s.Name() == "tokenauthz.check" && attr(s, "enduser.id") == "user-1" {
			return
		}
	}
	t.Fatal("trace_subject: true did not put the subject on the decision span")
}

// TestTraceIDFromMetadataWithoutStatsHandler: the Check server reads
// Envoy's trace from the metadata itself, with no gRPC stats handler: it is
// the decision span's parent (and the logs' trace_id).
func TestTraceIDFromMetadataWithoutStatsHandler(t *testing.T) {
	f, srv, rec := tracedServer(t, false)
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("traceparent", "00-"+envoyTrace+"-"+envoySpan+"-01"))
	if _, err := srv.Check(ctx, req{headers: bearer(f.jwt(t))}.proto()); err != nil {
		t.Fatal(err)
	}
	if d := decisionSpan(t, rec, envoyTrace); d.Parent().SpanID().String() != envoySpan {
		t.Fatalf("parent %v, want Envoy's span from the metadata", d.Parent())
	}
}

// TestUntracedKeepsTraceIDs: with no exporter (the no-op tracer provider,
// as serve runs without OTEL_* settings) no span is made, yet a deny's log
// line names Envoy's trace (from the call's metadata) or, without one, the
// request's own traceparent; and the provider calls carry Envoy's trace on.
func TestUntracedKeepsTraceIDs(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	logs := &logBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	v, err := verify.New(f.cfg.Issuers, verify.Options{TracerProvider: noop.NewTracerProvider(), Propagator: testProp,
		CallTrace: authz.CallTrace(testProp)}) // as serve wires it
	if err != nil {
		t.Fatal(err)
	}
	srv, err := authz.NewServer(f.cfg, v, log)
	if err != nil {
		t.Fatal(err)
	}
	srv.Observe(authz.Observability{TracerProvider: noop.NewTracerProvider(), Propagator: testProp})
	const reqTrace = "0af7651916cd43dd8448eb211c80319c"
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("traceparent", "00-"+envoyTrace+"-"+envoySpan+"-01"))
	// An opaque token goes to introspection: the call carries the trace.
	if _, err := srv.Check(ctx, req{headers: bearer("opaque-unknown")}.proto()); err != nil {
		t.Fatal(err)
	}
	if tp := f.idp.LastRequest().Header.Get("traceparent"); !strings.Contains(tp, envoyTrace) {
		t.Errorf("the introspection call carried traceparent %q, want Envoy's trace", tp)
	}
	if !strings.Contains(logs.String(), "trace_id="+envoyTrace) {
		t.Errorf("the deny's log line lacks Envoy's trace id:\n%s", logs)
	}
	r := req{headers: map[string]string{"traceparent": "00-" + reqTrace + "-00f067aa0ba902b7-01", "authorization": "Bearer x.y"}}
	if _, err := srv.Check(context.Background(), r.proto()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "request_trace_id="+reqTrace) {
		t.Errorf("the deny's log line lacks the request's trace id:\n%s", logs)
	}
}
