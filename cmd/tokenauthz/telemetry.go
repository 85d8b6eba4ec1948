package main

import (
	"context"
	"errors"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/contrib/propagators/b3"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.37.0"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/authz/decisionlog"
	"github.com/tokenauthz/tokenauthz/cache"
)

// propagator reads and writes W3C trace context, baggage and B3 (single or
// multiple headers on extraction), the formats Envoy and Istio use. B3 is
// read last, so it wins when a request carries both, as before.
func propagator() propagation.TextMapPropagator {
	return propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{},
		b3IfPresent{b3.New(b3.WithInjectEncoding(b3.B3MultipleHeader))})
}

// b3IfPresent is the B3 propagator, reading only a carrier that holds a B3
// header. With none, B3's extraction sets its "deferred" flag in the
// context and then clears it: two context values that change nothing, two
// allocations on every traced check.
type b3IfPresent struct{ propagation.TextMapPropagator }

// b3Headers are the headers B3 extraction reads (Fields lists only those it
// writes).
var b3Headers = [...]string{"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"}

func (p b3IfPresent) Extract(ctx context.Context, c propagation.TextMapCarrier) context.Context {
	for _, h := range b3Headers {
		if c.Get(h) != "" {
			return p.TextMapPropagator.Extract(ctx, c)
		}
	}
	return ctx
}

// exportConfigured reports whether the standard OTEL_* variables ask for
// trace export. With none set nothing is exported, and nothing is logged
// about it.
func exportConfigured() bool {
	if v := os.Getenv("OTEL_TRACES_EXPORTER"); v != "" {
		return v != "none"
	}
	return os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

// tracing builds the tracer provider from the OTEL_* environment: OTLP over
// gRPC or HTTP (OTEL_EXPORTER_OTLP_PROTOCOL), the sampler from
// OTEL_TRACES_SAMPLER (default parent-based, so Envoy's decision wins), the
// resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. Without
// export configured it is a no-op provider: spans still carry the caller's
// trace id into the logs, at no cost.
func tracing(ctx context.Context) (trace.TracerProvider, func(context.Context) error, error) {
	if !exportConfigured() {
		return noop.NewTracerProvider(), func(context.Context) error { return nil }, nil
	}
	exp, err := autoexport.NewSpanExporter(ctx)
	if err != nil {
		return nil, nil, err
	}
	attrs := []resource.Option{resource.WithTelemetrySDK(), resource.WithFromEnv(), resource.WithProcessRuntimeVersion()}
	if os.Getenv("OTEL_SERVICE_NAME") == "" && !strings.Contains(os.Getenv("OTEL_RESOURCE_ATTRIBUTES"), "service.name=") {
		attrs = append(attrs, resource.WithAttributes(semconv.ServiceName("tokenauthz")))
	}
	attrs = append(attrs, resource.WithAttributes(semconv.ServiceVersion(version())))
	res, err := resource.New(ctx, attrs...)
	if err != nil && !errors.Is(err, resource.ErrPartialResource) {
		return nil, nil, err
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	return tp, tp.Shutdown, nil
}

// metrics are the Prometheus series served at /metrics. Labels are bounded:
// route and issuer come from the config, reasons from a fixed set; never a
// subject, token or path.
type metrics struct {
	reg          *prometheus.Registry
	decisions    *prometheus.CounterVec
	latency      *prometheus.HistogramVec
	keyFetches   *prometheus.CounterVec
	providerReqs *prometheus.CounterVec
	providerTime *prometheus.HistogramVec
	answers      *prometheus.CounterVec
	throttled    *prometheus.CounterVec
	reloads      *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenauthz_decisions_total",
			Help: "Check decisions by decision (allow, deny, error), reason, route, issuer, transport (grpc, http) and dry_run (a dry-run route's would-be decision; the request was allowed)."},
			[]string{"decision", "reason", "route", "issuer", "transport", "dry_run"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "tokenauthz_decision_duration_seconds",
			Help:    "Time to decide one Check, by decision.",
			Buckets: []float64{25e-6, 50e-6, 100e-6, 250e-6, 500e-6, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1}},
			[]string{"decision"}),
		keyFetches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenauthz_keyset_fetches_total",
			Help: "Key set fetches from identity providers, by issuer and result (ok, error)."},
			[]string{"issuer", "result"}),
		providerReqs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenauthz_provider_requests_total",
			Help: "Introspection and userinfo calls, by issuer, endpoint and result (ok, error)."},
			[]string{"issuer", "endpoint", "result"}),
		providerTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "tokenauthz_provider_request_duration_seconds",
			Help:    "Introspection and userinfo call latency, by issuer and endpoint.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}},
			[]string{"issuer", "endpoint"}),
		answers: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenauthz_cache_lookups_total",
			Help: "Key sets (kind keys) and introspection and userinfo answers by the tier that served them (memory and redis are hits, origin a miss)."},
			[]string{"kind", "tier"}),
	}
	m.throttled = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenauthz_provider_throttled_total",
		Help: "Introspection calls not made because the caller's client share or the pod's max_calls_per_second was spent (answered 503; not logged one by one)."},
		[]string{"issuer", "endpoint"})
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tokenauthz_config_reloads_total",
		Help: "Config reloads by result (ok, rejected: the previous config stayed in force)."}, []string{"result"})
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "tokenauthz_build_info", Help: "Version and Go version."},
		[]string{"version", "goversion"})
	build.WithLabelValues(strings.TrimPrefix(version(), "tokenauthz "), runtime.Version()).Set(1)
	// Every result from the start, so alerts and rates need no first event.
	m.reloads.WithLabelValues("ok").Add(0)
	m.reloads.WithLabelValues("rejected").Add(0)
	m.reg.MustRegister(m.reloads, m.decisions, m.latency, m.keyFetches, m.providerReqs, m.providerTime, m.answers, m.throttled, build,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Decision implements authz.Observer.
func (m *metrics) Decision(d authz.DecisionInfo) {
	m.decisions.WithLabelValues(d.Decision, d.Reason, d.Route, d.Issuer, d.Transport, strconv.FormatBool(d.DryRun)).Inc()
	m.latency.WithLabelValues(d.Decision).Observe(d.Took.Seconds())
}

// KeySetFetched, ProviderCalled and Served implement verify.Observer.
func (m *metrics) KeySetFetched(issuer string, err error) {
	m.keyFetches.WithLabelValues(issuer, result(err)).Inc()
}

func (m *metrics) ProviderCalled(issuer, endpoint string, took time.Duration, err error) {
	m.providerReqs.WithLabelValues(issuer, endpoint, result(err)).Inc()
	m.providerTime.WithLabelValues(issuer, endpoint).Observe(took.Seconds())
}

func (m *metrics) Throttled(issuer, endpoint string) {
	m.throttled.WithLabelValues(issuer, endpoint).Inc()
}

func (m *metrics) Served(kind string, src cache.Source) {
	m.answers.WithLabelValues(kind, string(src)).Inc()
}

func result(err error) string {
	if err != nil {
		return "error"
	}
	return "ok"
}

// keySetAges reports each issuer's key set age at scrape time.
type keySetAges struct {
	desc *prometheus.Desc
	ages func() map[string]time.Duration
}

func (k keySetAges) Describe(ch chan<- *prometheus.Desc) { ch <- k.desc }
func (k keySetAges) Collect(ch chan<- prometheus.Metric) {
	for issuer, age := range k.ages() {
		ch <- prometheus.MustNewConstMetric(k.desc, prometheus.GaugeValue, age.Seconds(), issuer)
	}
}

// watchFleet adds the key set ages, and the Redis tier and denylist state.
func (m *metrics) watchFleet(ages func() map[string]time.Duration, shared *cache.Shared, dl *cache.Denylist) {
	m.reg.MustRegister(keySetAges{ages: ages, desc: prometheus.NewDesc("tokenauthz_keyset_age_seconds",
		"Time since the issuer's key set was fetched (by any pod of the fleet).", []string{"issuer"}, nil)})
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tokenauthz_revocations",
		Help: "Revocations held in the denylist."}, func() float64 { return float64(dl.Len()) }))
	if shared == nil {
		return
	}
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "tokenauthz_redis_breaker_state",
			Help: "Redis circuit breaker: 0 closed, 1 half-open, 2 open."}, func() float64 {
			return map[string]float64{"closed": 0, "half-open": 1, "open": 2}[shared.BreakerState()]
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tokenauthz_redis_errors_total",
			Help: "Redis operations that failed or were skipped by the open breaker."},
			func() float64 { return float64(shared.Errors.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tokenauthz_redis_rejected_entries_total",
			Help: "Redis entries ignored because they failed the HMAC check or did not decode."},
			func() float64 { return float64(shared.Rejected.Load()) }),
	)
}

// watchDecisionLog exports the decision log's dropped events.
func (m *metrics) watchDecisionLog(dl *decisionlog.Logger) {
	for cause, n := range map[string]*atomic.Int64{"rate_limit": &dl.RateLimited, "buffer_full": &dl.BufferFull} {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "tokenauthz_decision_log_dropped_total",
			Help:        "Decision events not written: over decision_log.max_per_second, or the buffer full (a slow sink).",
			ConstLabels: prometheus.Labels{"cause": cause}}, func() float64 { return float64(n.Load()) }))
	}
}
