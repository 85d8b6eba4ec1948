package decisionlog_test

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/authz/decisionlog"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

type fixture struct {
	srv *authz.Server
	tok string
}

func newFixture(t *testing.T, dl authz.DecisionLogger) *fixture {
	key := idptest.NewKey(t, "k1", "ES256")
	idp := idptest.New(t, key)
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "main", Issuer: idp.URL(), Audiences: []string{"api"}, JWKSURI: idp.JWKSURL(), Algorithms: []string{"ES256"}}},
		Routes: []authz.RouteConfig{
			{Name: "admin", Match: authz.Match{PathPrefix: "/admin"}, When: []authz.WhenRule{{CEL: "'admin' in scopes"}}},
			{Name: "trial", Match: authz.Match{PathPrefix: "/trial"}, Mode: "dry_run", Scopes: []string{"trial"}},
			{Name: "default", Match: authz.Match{PathPrefix: "/"}},
		},
	}
	v, err := verify.New(cfg.Issuers, verify.Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := authz.NewServer(cfg, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv.Observe(authz.Observability{DecisionLog: dl})
	c := idp.Claims("api")
	c["client_id"], c["scope"] = "web", "read"
	return &fixture{srv: srv, tok: idptest.Mint(t, key, c)}
}

func (f *fixture) check(t *testing.T, path string, tok string) bool {
	h := map[string]string{":method": "GET", ":path": path, ":authority": "api.example.com"}
	if tok != "" {
		h["authorization"] = "Bearer " + tok
	}
	resp, err := f.srv.Check(context.Background(), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: path, Host: "api.example.com", Headers: h}},
		Source:  &authv3.AttributeContext_Peer{Address: &corev3.Address{}}}})
	if err != nil {
		t.Fatal(err)
	}
	return resp.GetStatus().GetCode() == 0
}

// syncBuffer is a sink the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) events(t *testing.T) []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(s.b.String()))
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("not a JSON line: %q", sc.Text())
		}
		out = append(out, m)
	}
	return out
}

func ptr(f float64) *float64 { return &f }

// TestDecisionEvents: one event per decision as sampled, with the fields
// an audit needs, masked fields hashed (and correlatable), no token.
func TestDecisionEvents(t *testing.T) {
	var sink syncBuffer
	dl, err := decisionlog.New(context.Background(), decisionlog.Config{Allows: ptr(1), Denies: ptr(1), Mask: []string{"sub"}}, &sink)
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, dl)
	f.check(t, "/orders/1", f.tok) // allow
	f.check(t, "/admin/x", f.tok)  // deny: when false
	f.check(t, "/orders/1", "")    // deny: no token
	f.check(t, "/trial/x", f.tok)  // dry-run would-be deny
	f.check(t, "/orders/2", f.tok) // allow, same subject
	_ = dl.Close(context.Background())
	evs := sink.events(t)
	if len(evs) != 5 {
		t.Fatalf("%d events, want 5", len(evs))
	}
	for _, want := range []struct {
		i                      int
		decision, reason, step string
	}{{0, "allow", "ok", ""}, {1, "deny", "when_false", "when"}, {2, "deny", "missing_token", "credentials"}, {3, "deny", "insufficient_scope", "scopes"}} {
		e := evs[want.i]
		if e["decision"] != want.decision || e["reason"] != want.reason || (want.step != "" && e["failed_step"] != want.step) {
			t.Errorf("event %d: %v", want.i, e)
		}
		if e["decision_id"] == "" || e["time"] == "" || e["transport"] != "grpc" || e["latency_ms"] == nil {
			t.Errorf("event %d lacks its id, time, transport or latency: %v", want.i, e)
		}
	}
	if evs[3]["dry_run"] != true || evs[3]["route"] != "trial" || evs[1]["when"] == nil {
		t.Errorf("dry-run or when results missing: %v / %v", evs[3], evs[1])
	}
	sub, _ := evs[0]["sub"].(string)
	if !strings.HasPrefix(sub, "hmac:") || evs[4]["sub"] != sub || evs[0]["client_id"] != "web" {
		t.Errorf("masking: sub %q and %q, client_id %v", sub, evs[4]["sub"], evs[0]["client_id"])
	}
	all := sink.b.String()
	if strings.Contains(all, f.tok) || strings.Contains(all, strings.Split(f.tok, ".")[2]) {
		t.Error("an event holds the token")
	}
}

// TestDecisionLogSamplingAndLimits: allows sampled at 0 leave no event;
// over max_per_second events are dropped and counted; a sink that never
// reads does not slow Check (the test asserts that every check completes,
// not how fast), and the full buffer's drops are counted.
func TestDecisionLogSamplingAndLimits(t *testing.T) {
	var sink syncBuffer
	dl, _ := decisionlog.New(context.Background(), decisionlog.Config{Allows: ptr(0), Denies: ptr(1), MaxPerSecond: 3}, &sink)
	f := newFixture(t, dl)
	for range 10 {
		f.check(t, "/orders/1", f.tok)
		f.check(t, "/orders/1", "")
	}
	_ = dl.Close(context.Background())
	if n := len(sink.events(t)); n != 3 || dl.RateLimited.Load() != 7 {
		t.Errorf("%d events written, %d rate-limited; want 3 denies and 7 dropped (allows not sampled)", n, dl.RateLimited.Load())
	}

	pr, pw := io.Pipe() // nobody reads: every write blocks
	defer pr.Close()
	blocked, _ := decisionlog.New(context.Background(), decisionlog.Config{Allows: ptr(1), Buffer: 4, MaxPerSecond: 100000}, pw)
	f = newFixture(t, blocked)
	done := make(chan struct{})
	go func() {
		for range 200 {
			f.check(t, "/orders/1", f.tok)
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Check waited for a blocked decision log sink")
	}
	if blocked.BufferFull.Load() < 190 {
		t.Errorf("%d events dropped for a full buffer, want nearly all of 200", blocked.BufferFull.Load())
	}
	if p := (&decisionlog.Config{Mask: []string{"token"}, Allows: ptr(2)}).Validate(); len(p) != 2 {
		t.Errorf("config problems: %v", p)
	}
}
