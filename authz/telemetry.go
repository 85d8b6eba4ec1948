package authz

import (
	"context"
	"sync"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.37.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
)

// Observability says where a Server reports. Zero fields take the otel
// globals and report no metrics.
type Observability struct {
	TracerProvider trace.TracerProvider
	Propagator     propagation.TextMapPropagator
	Observer       Observer
	// TraceSubject adds the token's sub to decision spans as enduser.id.
	// Personal data: off by default.
	TraceSubject bool
	// AllowLogRate is the fraction of allows logged (denies always are).
	AllowLogRate float64
	// DecisionLog receives one structured event per sampled decision
	// (decision_log); nil for none.
	DecisionLog DecisionLogger

	tracer trace.Tracer
	// untraced: the tracer provider is the no-op one (no exporter): spans
	// are not recorded, so nothing is spent on what only they would use.
	untraced bool
}

// DecisionLogger receives decision events: Sample says whether a
// decision of that outcome is logged (no event is built otherwise), Log
// takes the event and must never block.
type DecisionLogger interface {
	Sample(allow bool) bool
	Log(DecisionEvent)
}

// DecisionEvent is one decision, for audit. It holds no token, proof or
// secret: the subject and client id as the token said them (mask them with
// decision_log.mask), the rest from the config and the decision.
type DecisionEvent struct {
	ID        string        `json:"decision_id"`
	Time      time.Time     `json:"time"`
	TraceID   string        `json:"trace_id,omitempty"`
	SpanID    string        `json:"span_id,omitempty"`
	Transport string        `json:"transport"`
	Request   EventRequest  `json:"request"`
	Route     string        `json:"route,omitempty"`
	Issuer    string        `json:"issuer,omitempty"`
	Tenant    string        `json:"tenant,omitempty"`
	TokenKind string        `json:"token_kind,omitempty"`
	Sub       string        `json:"sub,omitempty"`
	ClientID  string        `json:"client_id,omitempty"`
	Decision  string        `json:"decision"`
	Status    int           `json:"status"`
	Reason    string        `json:"reason"`
	Step      string        `json:"failed_step,omitempty"`
	When      []WhenOutcome `json:"when,omitempty"`
	DryRun    bool          `json:"dry_run"`
	LatencyMS float64       `json:"latency_ms"`
	Pod       string        `json:"pod,omitempty"`
}

// EventRequest is what an event says of the request: no headers, no query.
type EventRequest struct {
	Method string `json:"method"`
	Host   string `json:"host"`
	Path   string `json:"path"`
}

// WhenOutcome is one evaluated condition in an event.
type WhenOutcome struct {
	Expr   string `json:"expr"`
	Result bool   `json:"result"`
	Error  string `json:"error,omitempty"`
}

// Observer receives every decision, for metrics. It must be cheap and safe
// for concurrent use.
type Observer interface {
	Decision(DecisionInfo)
}

// DecisionInfo describes one decision with bounded values only: route and
// issuer come from the config, reason from a fixed set.
type DecisionInfo struct {
	// Decision is allow, deny, error (no decision possible) or cancelled
	// (Envoy or the client ended the call first).
	Decision string
	Reason   string
	Route    string
	Issuer   string
	// Transport is how the check came: grpc (Envoy's Check) or http (the
	// HTTP authorization endpoint).
	Transport string
	// DryRun: a dry-run route's decision: Decision and Reason are what the
	// route would have answered; the request was allowed.
	DryRun bool
	Took   time.Duration
}

type transportKey struct{}

// WithTransport marks ctx as a check that came by transport (for metrics,
// spans and logs); Check's own callers are grpc.
func WithTransport(ctx context.Context, transport string) context.Context {
	return context.WithValue(ctx, transportKey{}, transport)
}

func transportOf(ctx context.Context) string {
	if t, ok := ctx.Value(transportKey{}).(string); ok {
		return t
	}
	return "grpc"
}

type nopObserver struct{}

func (nopObserver) Decision(DecisionInfo) {}

// Observe sets where s reports. Call it before serving.
func (s *Server) Observe(o Observability) {
	if o.TracerProvider == nil {
		o.TracerProvider = otel.GetTracerProvider()
	}
	if o.Propagator == nil {
		o.Propagator = otel.GetTextMapPropagator()
	}
	if o.Observer == nil {
		o.Observer = nopObserver{}
	}
	o.tracer = o.TracerProvider.Tracer("github.com/tokenauthz/tokenauthz/authz")
	_, o.untraced = o.TracerProvider.(noop.TracerProvider)
	s.obs = o
}

// startSpan opens the decision span, the server span of the check: no
// transport adds one of its own (an otelgrpc server span under it cost as
// much again as the decision span, for the same interval). Its parent is
// the trace context Envoy put in the call's gRPC metadata.
//
// When the metadata carries none, the span is the root of a trace of its
// own (or continues a span the caller's ctx holds) and links to the
// request's traceparent or b3 context: parenting it there would put it in a
// trace nobody else records (Envoy sent no context) or one the request
// marked not sampled, where it would be dropped; as it is, every check
// exports its spans, and none is an orphan.
//
// linked is the request's context when the span links to it (invalid
// otherwise), for the decision log.
//
// Without an exporter (untraced), no span is started and no trace context
// is read here: copying the call's metadata and extracting from it was 4%
// of a warm check's CPU under load, for IDs that most checks never use. The
// call's context is read when something names it (callTrace: a provider
// call, through verify.Options.CallTrace, a log line, a decision-log event),
// the request's only for a log line (requestTrace).
func (o *Observability) startSpan(ctx context.Context, h *authv3.AttributeContext_HttpRequest) (_ context.Context, _ trace.Span, linked trace.SpanContext) {
	if o.untraced {
		return ctx, trace.SpanFromContext(ctx), linked
	}
	if mctx := o.Propagator.Extract(ctx, incomingCarrier{ctx}); trace.SpanContextFromContext(mctx).IsRemote() {
		parent := ctx
		if !trace.SpanContextFromContext(ctx).IsValid() {
			parent = mctx // no span of the caller's to continue: Envoy's span is the parent
		}
		ctx, span := o.tracer.Start(parent, "tokenauthz.check", serverSpan...)
		return ctx, span, linked
	}
	opts := serverSpan[:1:1]
	if linked = trace.SpanContextFromContext(o.Propagator.Extract(context.Background(), requestCarrier{h})); linked.IsValid() {
		opts = append(opts, trace.WithLinks(trace.Link{SpanContext: linked,
			Attributes: []attribute.KeyValue{attribute.String("tokenauthz.link", "request")}}))
	}
	if !trace.SpanContextFromContext(ctx).IsValid() {
		opts = append(opts, trace.WithNewRoot())
	}
	ctx, span := o.tracer.Start(ctx, "tokenauthz.check", opts...)
	return ctx, span, linked
}

var serverSpan = []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindServer)}

// CallTrace returns a function that gives ctx the trace context Envoy put
// in the gRPC call's metadata, read with prop, when ctx carries none. Give
// it to verify.Options.CallTrace so that, without an exporter, provider
// calls still carry Envoy's trace on.
func CallTrace(prop propagation.TextMapPropagator) func(context.Context) context.Context {
	if prop == nil {
		prop = otel.GetTextMapPropagator()
	}
	return func(ctx context.Context) context.Context { return callTrace(ctx, prop) }
}

func callTrace(ctx context.Context, prop propagation.TextMapPropagator) context.Context {
	if trace.SpanContextFromContext(ctx).IsValid() {
		return ctx
	}
	if mctx := prop.Extract(ctx, incomingCarrier{ctx}); trace.SpanContextFromContext(mctx).IsRemote() {
		return mctx
	}
	return ctx
}

// requestTrace is the request's own trace context (traceparent or b3 of
// the HTTP request), for a log line.
func (o *Observability) requestTrace(h *authv3.AttributeContext_HttpRequest) trace.SpanContext {
	return trace.SpanContextFromContext(o.Propagator.Extract(context.Background(), requestCarrier{h}))
}

func (o *Observability) endSpan(span trace.Span, d *decision, info DecisionInfo) {
	if span.IsRecording() {
		buf := spanAttrs.Get().(*[]attribute.KeyValue)
		attrs := append((*buf)[:0],
			attribute.String("tokenauthz.decision", info.Decision),
			attribute.String("tokenauthz.reason", info.Reason),
			attribute.String("tokenauthz.route", info.Route),
			attribute.String("tokenauthz.transport", info.Transport),
			attribute.Bool("tokenauthz.dry_run", info.DryRun),
			attribute.Int("http.response.status_code", d.status()),
		)
		if r := d.result; r != nil {
			attrs = append(attrs, attribute.String("tokenauthz.issuer", info.Issuer),
				attribute.String("tokenauthz.token.kind", r.Kind))
			if r.KeySource != "" {
				attrs = append(attrs, attribute.String("tokenauthz.keys.source", string(r.KeySource)))
			}
			if r.AnswerSource != "" {
				attrs = append(attrs, attribute.String("tokenauthz.answer.source", string(r.AnswerSource)))
			}
			if o.TraceSubject {
				if sub := r.Claims.String("sub"); sub != "" {
					attrs = append(attrs, semconv.EnduserID(sub))
				}
			}
		}
		if info.Transport == "grpc" {
			// What otelgrpc's server span said, now that it is this one.
			attrs = append(attrs, attribute.String("rpc.system", "grpc"),
				attribute.String("rpc.service", "envoy.service.auth.v3.Authorization"), attribute.String("rpc.method", "Check"))
		}
		span.SetAttributes(attrs...) // copied into the span: buf is ours again
		clear(attrs)
		*buf = attrs[:0]
		spanAttrs.Put(buf)
		if info.Decision == "error" {
			span.SetStatus(otelcodes.Error, d.desc)
		}
	}
	span.End()
}

// spanAttrs holds the buffers endSpan builds a span's attributes in: the
// SDK copies them into the span, and a fresh slice a sampled check (grown
// twice to hold up to 14) was 15% of the bytes it allocated.
var spanAttrs = sync.Pool{New: func() any { b := make([]attribute.KeyValue, 0, 16); return &b }}

// info summarises d for metrics, spans and logs.
func (d *decision) info(took time.Duration) DecisionInfo {
	if d.wouldBe != nil {
		i := d.wouldBe.info(took)
		i.DryRun = true
		return i
	}
	i := DecisionInfo{Decision: "deny", Reason: d.reason, Took: took, DryRun: d.dryRun}
	switch {
	case d.allow:
		i.Decision = "allow"
	case d.cancelled:
		i.Decision = "cancelled"
	case d.code == codes.Unavailable || d.code == codes.Internal:
		i.Decision = "error"
	}
	if d.route != nil {
		i.Route = d.route.name
	}
	if d.result != nil {
		i.Issuer = d.result.Issuer.Name()
	} else {
		i.Issuer = d.issuer
	}
	return i
}

// status is the HTTP status Envoy will use: 200 (upstream) for an allow.
func (d *decision) status() int {
	if d.allow {
		return 200
	}
	return int(d.httpStatus)
}

// incomingCarrier reads trace context from the call's gRPC metadata, a key
// at a time: metadata.FromIncomingContext copies every key and value of the
// call (eight on an ext_authz call from Envoy: nine allocations) to read
// one or two of them.
type incomingCarrier struct{ ctx context.Context }

func (c incomingCarrier) Get(k string) string {
	if v := metadata.ValueFromIncomingContext(c.ctx, k); len(v) > 0 {
		return v[0]
	}
	return ""
}
func (c incomingCarrier) Set(string, string) {}
func (c incomingCarrier) Keys() []string {
	md, _ := metadata.FromIncomingContext(c.ctx)
	out := make([]string, 0, len(md))
	for k := range md {
		out = append(out, k)
	}
	return out
}

// requestCarrier reads trace context from the HTTP request's headers, in
// either of the forms Envoy sends them.
type requestCarrier struct {
	h *authv3.AttributeContext_HttpRequest
}

func (r requestCarrier) Get(k string) string {
	if v, ok := r.h.GetHeaders()[k]; ok {
		return v
	}
	for _, hv := range r.h.GetHeaderMap().GetHeaders() {
		if hv.GetKey() == k {
			if raw := hv.GetRawValue(); len(raw) > 0 {
				return string(raw)
			}
			return hv.GetValue()
		}
	}
	return ""
}
func (r requestCarrier) Set(string, string) {}
func (r requestCarrier) Keys() []string {
	var out []string
	for k := range r.h.GetHeaders() {
		out = append(out, k)
	}
	for _, hv := range r.h.GetHeaderMap().GetHeaders() {
		out = append(out, hv.GetKey())
	}
	return out
}
