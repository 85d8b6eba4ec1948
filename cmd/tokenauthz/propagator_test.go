package main

import (
	"context"
	"testing"

	"go.opentelemetry.io/contrib/propagators/b3"
	"go.opentelemetry.io/otel/baggage"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// The propagator reads what the plain composite of W3C, baggage and B3
// reads, for each way Envoy and Istio send a trace (B3 winning when both
// come), and skips B3's no-op extraction when no B3 header came.
func TestPropagatorReadsAsComposite(t *testing.T) {
	plain := propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{},
		b3.New(b3.WithInjectEncoding(b3.B3MultipleHeader)))
	const (
		w3c    = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
		traceB = "80f198ee56343ba864fe8b2a57d3eff7"
		spanB  = "e457b5a2e4d86bd1"
	)
	cases := map[string]propagation.MapCarrier{
		"none":             {},
		"w3c":              {"traceparent": w3c, "tracestate": "k=v", "baggage": "user=alice"},
		"w3c not sampled":  {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"},
		"b3 single":        {"b3": traceB + "-" + spanB + "-1"},
		"b3 multiple":      {"x-b3-traceid": traceB, "x-b3-spanid": spanB, "x-b3-sampled": "0"},
		"b3 debug only":    {"x-b3-flags": "1"},
		"both: b3 wins":    {"traceparent": w3c, "x-b3-traceid": traceB, "x-b3-spanid": spanB},
		"invalid w3c, b3":  {"traceparent": "00-zz", "b3": traceB + "-" + spanB},
		"b3 deferred kept": {"x-b3-traceid": traceB, "x-b3-spanid": spanB},
	}
	ours := propagator()
	for name, c := range cases {
		want, got := plain.Extract(context.Background(), c), ours.Extract(context.Background(), c)
		if w, g := trace.SpanContextFromContext(want), trace.SpanContextFromContext(got); !w.Equal(g) {
			t.Errorf("%s: span context %v, want %v", name, g, w)
		}
		if w, g := baggage.FromContext(want).String(), baggage.FromContext(got).String(); w != g {
			t.Errorf("%s: baggage %q, want %q", name, g, w)
		}
		// What B3 writes onward (its deferred and debug flags live in the
		// context) must not change either.
		wantOut, gotOut := propagation.MapCarrier{}, propagation.MapCarrier{}
		plain.Inject(want, wantOut)
		ours.Inject(got, gotOut)
		if len(wantOut) != len(gotOut) {
			t.Errorf("%s: injects %v, want %v", name, gotOut, wantOut)
		}
		for k, v := range wantOut {
			if gotOut[k] != v {
				t.Errorf("%s: injects %s=%q, want %q", name, k, gotOut[k], v)
			}
		}
	}
	w3cOnly := cases["w3c not sampled"]
	plainAllocs := testing.AllocsPerRun(100, func() { plain.Extract(context.Background(), w3cOnly) })
	ourAllocs := testing.AllocsPerRun(100, func() { ours.Extract(context.Background(), w3cOnly) })
	if ourAllocs > plainAllocs-2 {
		t.Errorf("W3C context only: %v allocations, the plain composite %v: want 2 fewer (no B3 extraction)", ourAllocs, plainAllocs)
	}
}
