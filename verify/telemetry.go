package verify

import (
	"context"
	"net/http"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/tokenauthz/tokenauthz/cache"
)

// Observer receives what verify does, for metrics. Its methods must be
// cheap and safe for concurrent use.
type Observer interface {
	// KeySetFetched: one fetch of an issuer's key set from the provider.
	KeySetFetched(issuer string, err error)
	// ProviderCalled: one introspection or userinfo call.
	ProviderCalled(issuer, endpoint string, took time.Duration, err error)
	// Throttled: a provider call refused by the call budget.
	Throttled(issuer, endpoint string)
	// Served: where an issuer's keys (kind "keys") or an introspection or
	// userinfo answer came from for one request.
	Served(kind string, src cache.Source)
}

type nopObserver struct{}

func (nopObserver) KeySetFetched(string, error)                         {}
func (nopObserver) ProviderCalled(string, string, time.Duration, error) {}
func (nopObserver) Served(string, cache.Source)                         {}
func (nopObserver) Throttled(string, string)                            {}

// telemetry is what every part of a Verifier reports to.
type telemetry struct {
	tracer    trace.Tracer
	obs       Observer
	tp        trace.TracerProvider
	prop      propagation.TextMapPropagator
	callTrace func(context.Context) context.Context // Options.CallTrace
	// untraced: tp is the no-op provider (no exporter), whose spans would
	// only be allocated and dropped.
	untraced bool
}

func newTelemetry(o Options) *telemetry {
	t := &telemetry{tp: o.TracerProvider, prop: o.Propagator, obs: o.Observer, callTrace: o.CallTrace}
	if t.tp == nil {
		t.tp = otel.GetTracerProvider()
	}
	if t.prop == nil {
		t.prop = otel.GetTextMapPropagator()
	}
	if t.obs == nil {
		t.obs = nopObserver{}
	}
	t.tracer = t.tp.Tracer("github.com/tokenauthz/tokenauthz/verify")
	_, t.untraced = t.tp.(noop.TracerProvider)
	return t
}

// start opens a child span of whatever span ctx carries.
func (t *telemetry) start(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	if t.untraced {
		// What the no-op tracer would return, without its allocations:
		// ctx keeps the trace context it carries for provider calls.
		return ctx, trace.SpanFromContext(ctx)
	}
	return t.tracer.Start(ctx, name, trace.WithAttributes(attrs...))
}

// end records err (if any) on span and ends it. Causes here name issuers and
// endpoints, never tokens.
func end(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// transport wraps base so every provider call is a client span carrying
// the trace context.
func (t *telemetry) transport(base http.RoundTripper) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	rt := otelhttp.NewTransport(base, otelhttp.WithTracerProvider(t.tp), otelhttp.WithPropagators(t.prop))
	if t.callTrace == nil {
		return rt
	}
	return callTraced{rt, t.callTrace}
}

// callTraced gives a request's context the trace context of the call that
// caused it (Options.CallTrace) before the request's span and headers are
// made from it.
type callTraced struct {
	next  http.RoundTripper
	trace func(context.Context) context.Context
}

func (c callTraced) RoundTrip(r *http.Request) (*http.Response, error) {
	if ctx := c.trace(r.Context()); ctx != r.Context() {
		r = r.WithContext(ctx)
	}
	return c.next.RoundTrip(r)
}
