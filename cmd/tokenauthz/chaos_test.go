//go:build chaos

// The chaos and soak suite: the real service (run, as serve runs it, with
// Redis, introspection and config reload) under a steady concurrent stream
// of checks whose right answers are known, while one fault at a time is
// injected. Run it with
//
//	go test -tags chaos -run 'TestChaos|TestSoak' -v -count=1 ./cmd/tokenauthz
//
// CHAOS_PHASE (default 2s) sets each phase's length and CHAOS_SOAK (default
// 15s) the soak's. .ci/run runs a short version.
package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

func envDuration(name string, def time.Duration) time.Duration {
	if d, err := time.ParseDuration(os.Getenv(name)); err == nil && d > 0 {
		return d
	}
	return def
}

// truth is what a token deserves.
type truth int

const (
	mustAllow truth = iota // a valid token: allow (or, for opaque ones, 503 or 429 while the provider cannot answer)
	mustDeny               // an invalid token: anything but an allow
	eitherWay              // its right answer is changing under the fault (a key being withdrawn)
)

type token struct {
	raw    string
	truth  truth
	opaque bool
}

// phaseStats is one phase's record.
type phaseStats struct {
	mu                                   sync.Mutex
	sent, allows, denies, errs, grpcErrs int
	wrongAllows, wrongDenies, jwtErrors  int
	latencies                            []time.Duration
	firstWrong                           string
}

func (s *phaseStats) record(tk token, code codes.Code, err error, took time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sent++
	s.latencies = append(s.latencies, took)
	wrong := func(what string) {
		if s.firstWrong == "" {
			s.firstWrong = fmt.Sprintf("%s (opaque %v): %v %v", what, tk.opaque, code, err)
		}
	}
	switch {
	case err != nil:
		s.grpcErrs++
		wrong("gRPC error")
	case code == codes.OK:
		s.allows++
		if tk.truth == mustDeny {
			s.wrongAllows++
			wrong("wrong allow")
		}
	case code == codes.Unavailable || code == codes.ResourceExhausted:
		// 503 while the provider cannot answer, or 429 for a caller over
		// its share of provider calls (the flood shares the suite's
		// address): neither is a verdict on the token.
		s.errs++
		if tk.truth == mustAllow && !tk.opaque {
			// Keys stay cached through every fault: a valid JWT must be decided.
			s.jwtErrors++
			wrong("503 for a valid JWT")
		}
	default:
		s.denies++
		if tk.truth == mustAllow {
			s.wrongDenies++
			wrong("wrong deny")
		}
	}
}

func (s *phaseStats) pct(p float64) time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.latencies) == 0 {
		return 0
	}
	l := append([]time.Duration(nil), s.latencies...)
	sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
	return l[int(math.Min(float64(len(l)-1), p*float64(len(l))))]
}

// chaosRig is the service under test with its provider and Redis.
type chaosRig struct {
	t        *testing.T
	idp      *idptest.IdP
	rs       *redistest.Server
	k1, k2   *idptest.Key
	attacker *idptest.Key
	cfgPath  string
	cfgText  string
	// clients are the pods: one process each would be closer to life, but
	// in one test process they share only what pods share, Redis and the
	// provider.
	clients []authv3.AuthorizationClient

	mu   sync.Mutex
	pool []token
}

func newChaosRig(t *testing.T) *chaosRig {
	r := &chaosRig{t: t, k1: idptest.NewKey(t, "k1", "ES256"), k2: idptest.NewKey(t, "k2", "ES256"),
		attacker: idptest.NewKey(t, "k1", "ES256")}
	r.idp = idptest.New(t, r.k1)
	r.idp.RegisterClient(idptest.Client{ID: "authz", Secret: "chaos-secret", Method: "client_secret_basic"})
	r.rs = redistest.Start(t)
	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	_ = os.WriteFile(secret, []byte("chaos-secret"), 0o600)
	r.cfgPath = filepath.Join(dir, "config.yaml")
	r.cfgText = fmt.Sprintf(`server: { grpc_addr: "127.0.0.1:0", http_addr: "127.0.0.1:0" }
cache:
  redis: { addrs: ["%s"], timeout: 50ms, breaker_cooldown: 500ms, lock_wait: 300ms }
issuers:
  - name: main
    issuer: "%s"
    audiences: [api]
    jwks_uri: "%s"
    algorithms: [ES256]
    keys: { timeout: 1s, refresh_interval: 2s, min_refresh_interval: 500ms }
    introspection:
      endpoint: "%s"
      client_id: authz
      client_secret_file: "%s"
      timeout: 500ms
      cache_ttl: 3s
      negative_cache_ttl: 1s
      max_calls_per_second: 200
routes:
  - { name: all, match: { path_prefix: / } }
`, r.rs.Addr(), r.idp.URL(), r.idp.JWKSURL(), r.idp.IntrospectionURL(), secret)
	writeAtomically(t, r.cfgPath, r.cfgText)
	pods := 3 // CHAOS_PODS overrides
	if n, err := strconv.Atoi(os.Getenv("CHAOS_PODS")); err == nil && n > 0 {
		pods = n
	}
	for range pods {
		cfg, err := loadConfig(r.cfgPath)
		if err != nil {
			t.Fatal(err)
		}
		r.clients = append(r.clients, authv3.NewAuthorizationClient(runService(t, cfg, nil, nil, withReload(r.cfgPath, nil)).conn))
	}

	claims := func(i int) map[string]any {
		c := r.idp.Claims("api")
		c["sub"], c["jti"] = fmt.Sprintf("user-%d", i), fmt.Sprintf("j-%d", i)
		return c
	}
	for i := range 150 {
		r.pool = append(r.pool, token{raw: idptest.Mint(t, r.k1, claims(i)), truth: mustAllow})
	}
	for i := range 40 {
		r.pool = append(r.pool, token{raw: idptest.Mint(t, r.attacker, claims(i)), truth: mustDeny})
		r.pool = append(r.pool, token{raw: r.idp.Opaque(map[string]any{"sub": fmt.Sprint("svc-", i), "aud": "api",
			"exp": time.Now().Add(time.Hour).Unix()}), truth: mustAllow, opaque: true})
		r.pool = append(r.pool, token{raw: randomToken(), truth: mustDeny, opaque: true})
	}
	return r
}

func randomToken() string {
	b := make([]byte, 24)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

func (r *chaosRig) pick() token {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pool[mrand.IntN(len(r.pool))]
}

func (r *chaosRig) add(ts ...token) { r.mu.Lock(); r.pool = append(r.pool, ts...); r.mu.Unlock() }

// remove drops a fault's extra tokens when it clears.
func (r *chaosRig) remove(match func(token) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	kept := r.pool[:0]
	for _, tk := range r.pool {
		if !match(tk) {
			kept = append(kept, tk)
		}
	}
	r.pool = kept
}

// relabel changes the truth of the pool's tokens that match.
func (r *chaosRig) relabel(match func(token) bool, to truth) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range r.pool {
		if match(r.pool[i]) {
			r.pool[i].truth = to
		}
	}
}

func (r *chaosRig) check(tk token) (codes.Code, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := r.clients[mrand.IntN(len(r.clients))].Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/api", Host: "api",
			Headers: map[string]string{"authorization": "Bearer " + tk.raw}}}}})
	if err != nil {
		return codes.Unknown, err
	}
	return codes.Code(resp.GetStatus().GetCode()), nil
}

// stream sends checks from workers until stop, into whatever phase cur
// points at.
func (r *chaosRig) stream(cur *atomic.Pointer[phaseStats], stop <-chan struct{}) *sync.WaitGroup {
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				tk := r.pick()
				start := time.Now()
				code, err := r.check(tk)
				cur.Load().record(tk, code, err, time.Since(start))
			}
		})
	}
	return &wg
}

type fault struct {
	name   string
	inject func(r *chaosRig)
	clear  func(r *chaosRig)
	// jwksBound and introspectionBound, when set, bound the provider calls
	// during the fault.
	jwksBound, introspectionBound func(d time.Duration) int64
}

func TestChaos(t *testing.T) {
	phase := envDuration("CHAOS_PHASE", 2*time.Second)
	r := newChaosRig(t)
	waitFor(t, func() bool { c, _ := r.check(r.pool[0]); return c == codes.OK })

	var flapStop chan struct{}
	faults := []fault{
		{name: "provider slow (3s)", inject: func(r *chaosRig) { r.idp.SetDelay(3 * time.Second); r.idp.SetJWKSDelay(3 * time.Second) },
			clear: func(r *chaosRig) { r.idp.SetDelay(0); r.idp.SetJWKSDelay(0) }},
		{name: "provider down", inject: func(r *chaosRig) { r.idp.SetDown(true) }, clear: func(r *chaosRig) { r.idp.SetDown(false) }},
		{name: "provider flapping", inject: func(r *chaosRig) {
			flapStop = make(chan struct{})
			go func(stop chan struct{}) {
				for down := true; ; down = !down {
					r.idp.SetDown(down)
					select {
					case <-stop:
						r.idp.SetDown(false)
						return
					case <-time.After(150 * time.Millisecond):
					}
				}
			}(flapStop)
		}, clear: func(r *chaosRig) { close(flapStop); time.Sleep(50 * time.Millisecond) }},
		{name: "introspection 500s", inject: func(r *chaosRig) { r.idp.ForceReply(500, []byte(`{"error":"x"}`)) },
			clear: func(r *chaosRig) { r.idp.ForceReply(0, nil) }},
		{name: "garbage JWKS + unknown kid flood", inject: func(r *chaosRig) {
			r.idp.SetRawJWKS([]byte(`{"keys":[{"kty":"garbage`))
			for i := range 200 {
				k := &idptest.Key{Kid: fmt.Sprint("flood-", i), Alg: "ES256", Private: r.k1.Private}
				r.add(token{raw: idptest.Mint(r.t, k, r.idp.Claims("api")), truth: mustDeny})
			}
		}, clear: func(r *chaosRig) { r.idp.SetRawJWKS(nil) },
			// Two streams, each at most one fetch per min_refresh_interval
			// (500ms): unknown-kid refetches, and the background refresh
			// retrying the failed (garbage) set.
			jwksBound: func(d time.Duration) int64 { return 2*int64(d/(500*time.Millisecond)) + 3 }},
		{name: "oversized JWKS", inject: func(r *chaosRig) {
			r.idp.SetRawJWKS([]byte(`{"keys":[],"pad":"` + strings.Repeat("x", 600<<10) + `"}`))
		}, clear: func(r *chaosRig) { r.idp.SetRawJWKS(nil) }},
		{name: "key rotation (k2 added)", inject: func(r *chaosRig) {
			// Tokens signed with k2 arrive the moment k2 is published: until
			// the pod has fetched the new set (one unknown-kid refetch per
			// min_refresh_interval, which the previous fault's flood may have
			// just used) the cached keys cannot decide them.
			r.idp.SetKeys(r.k1, r.k2)
			for i := range 50 {
				c := r.idp.Claims("api")
				c["jti"] = fmt.Sprint("k2-", i)
				r.add(token{raw: idptest.Mint(r.t, r.k2, c), truth: eitherWay})
			}
		}, clear: func(r *chaosRig) {
			r.relabel(func(tk token) bool { return tk.truth == eitherWay && kidOf(tk.raw) == "k2" }, mustAllow)
		}},
		{name: "emergency key revocation (k1 withdrawn)", inject: func(r *chaosRig) {
			r.relabel(func(tk token) bool { return !tk.opaque && tk.truth == mustAllow && kidOf(tk.raw) == "k1" }, eitherWay)
			r.idp.SetKeys(r.k2)
		}, clear: func(r *chaosRig) {
			// Within refresh_interval (2s) the pod has the new set: from now on
			// k1's tokens must be refused.
			time.Sleep(2500 * time.Millisecond)
			r.relabel(func(tk token) bool { return tk.truth == eitherWay }, mustDeny)
		}},
		{name: "redis killed", inject: func(r *chaosRig) { r.rs.Kill() }, clear: func(r *chaosRig) { r.rs.Restart() }},
		{name: "redis slow (DEBUG SLEEP 1)", inject: func(r *chaosRig) {
			go func() { _ = r.rs.Client().Do(context.Background(), "DEBUG", "SLEEP", "1").Err() }()
		}, clear: func(r *chaosRig) {}},
		{name: "redis frozen (SIGSTOP, then SIGCONT)", inject: func(r *chaosRig) { r.rs.Freeze() }, clear: func(r *chaosRig) {
			r.rs.Thaw()
			// No lock taken during the freeze outlives it.
			c := r.rs.Client()
			waitFor(r.t, func() bool { return len(c.Keys(context.Background(), "tokenauthz:v1:lock:*").Val()) == 0 })
		}},
		{name: "provider slower than lock_wait (400ms)", inject: func(r *chaosRig) {
			r.idp.SetDelay(400 * time.Millisecond)
			r.idp.SetJWKSDelay(400 * time.Millisecond)
		}, clear: func(r *chaosRig) { r.idp.SetDelay(0); r.idp.SetJWKSDelay(0) }},
		{name: "redis flushed", inject: func(r *chaosRig) { _ = r.rs.Client().FlushAll(context.Background()).Err() }, clear: func(r *chaosRig) {}},
		{name: "config reload (valid)", inject: func(r *chaosRig) {
			writeAtomically(r.t, r.cfgPath, r.cfgText+"  - { name: extra, match: { path: /extra } }\n")
		}, clear: func(r *chaosRig) { writeAtomically(r.t, r.cfgPath, r.cfgText) }},
		{name: "config reload (invalid)", inject: func(r *chaosRig) { writeAtomically(r.t, r.cfgPath, r.cfgText+"nonsense: [\n") },
			clear: func(r *chaosRig) { writeAtomically(r.t, r.cfgPath, r.cfgText) }},
		{name: "distinct made-up opaque token flood", inject: func(r *chaosRig) {
			for range 3000 {
				r.add(token{raw: randomToken(), truth: mustDeny, opaque: true})
			}
		}, clear: func(r *chaosRig) {
			r.remove(func(tk token) bool { return tk.opaque && tk.truth == mustDeny && len(tk.raw) == 32 })
		}, introspectionBound: func(d time.Duration) int64 { return int64(len(r.clients)) * (int64(200*d.Seconds()) + 200 + 10) }}, // per pod
		{name: "distinct garbage JWT flood", inject: func(r *chaosRig) {
			for range 3000 {
				r.add(token{raw: randomToken() + "." + randomToken() + "." + randomToken(), truth: mustDeny})
			}
		}, clear: func(r *chaosRig) {
			r.remove(func(tk token) bool { return strings.Count(tk.raw, ".") == 2 && len(tk.raw) == 98 })
		}},
	}

	var cur atomic.Pointer[phaseStats]
	cur.Store(&phaseStats{})
	stop := make(chan struct{})
	wg := r.stream(&cur, stop)
	type row struct {
		name                  string
		before, during, after *phaseStats
		jwks, introspections  int64
	}
	var rows []row
	for _, f := range faults {
		before, during, after := &phaseStats{}, &phaseStats{}, &phaseStats{}
		cur.Store(before)
		time.Sleep(phase)
		j0, i0 := r.idp.JWKSHits.Load(), r.idp.IntrospectionHits.Load()
		cur.Store(during)
		f.inject(r)
		time.Sleep(phase)
		j1, i1 := r.idp.JWKSHits.Load(), r.idp.IntrospectionHits.Load()
		f.clear(r)
		cur.Store(after)
		time.Sleep(phase)
		rows = append(rows, row{f.name, before, during, after, j1 - j0, i1 - i0})
		if f.jwksBound != nil && j1-j0 > f.jwksBound(phase) {
			t.Errorf("%s: %d key set fetches in %v, bound %d", f.name, j1-j0, phase, f.jwksBound(phase))
		}
		if f.introspectionBound != nil && i1-i0 > f.introspectionBound(phase) {
			t.Errorf("%s: %d introspection calls in %v, bound %d", f.name, i1-i0, phase, f.introspectionBound(phase))
		}
	}
	close(stop)
	wg.Wait()

	var b strings.Builder
	fmt.Fprintf(&b, "\n| fault | sent | wrong allows | wrong denies | 503s (opaque) | p50 before/during/after | p99 before/during/after | provider calls (keys, introspection) |\n|---|---|---|---|---|---|---|---|\n")
	for _, rw := range rows {
		var sent, wa, wd, errs int
		for _, p := range []*phaseStats{rw.before, rw.during, rw.after} {
			sent, wa, wd, errs = sent+p.sent, wa+p.wrongAllows, wd+p.wrongDenies, errs+p.errs
			if p.wrongAllows > 0 || p.wrongDenies > 0 || p.grpcErrs > 0 || p.jwtErrors > 0 {
				t.Errorf("%s: %d wrong allows, %d wrong denies, %d gRPC errors, %d 503s for valid JWTs; first: %s",
					rw.name, p.wrongAllows, p.wrongDenies, p.grpcErrs, p.jwtErrors, p.firstWrong)
			}
		}
		ms := func(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)) }
		fmt.Fprintf(&b, "| %s | %d | %d | %d | %d | %s / %s / %s ms | %s / %s / %s ms | %d, %d |\n", rw.name, sent, wa, wd, errs,
			ms(rw.before.pct(.5)), ms(rw.during.pct(.5)), ms(rw.after.pct(.5)),
			ms(rw.before.pct(.99)), ms(rw.during.pct(.99)), ms(rw.after.pct(.99)), rw.jwks, rw.introspections)
		// Back to normal after the fault: a generous bound, for a noisy
		// shared machine (the figures are in the table).
		if a, bf := rw.after.pct(.99), rw.before.pct(.99); a > 10*bf+200*time.Millisecond {
			t.Errorf("%s: p99 after the fault %v, before %v", rw.name, a, bf)
		}
	}
	t.Log(b.String())
	if path := os.Getenv("CHAOS_REPORT"); path != "" {
		_ = os.WriteFile(path, []byte(b.String()), 0o644)
	}
}

func kidOf(tok string) string {
	h, _, _ := strings.Cut(tok, ".")
	b, _ := base64.RawURLEncoding.DecodeString(h)
	_, rest, _ := strings.Cut(string(b), `"kid":"`)
	kid, _, _ := strings.Cut(rest, `"`)
	return kid
}

// TestSoak streams distinct valid tokens (each one new to the service, and
// sent twice so that the verified-token cache keeps it) and checks that
// memory stays bounded by the caches' configured sizes and that no
// goroutine or file descriptor leaks.
func TestSoak(t *testing.T) {
	d := envDuration("CHAOS_SOAK", 15*time.Second)
	r := newChaosRig(t)
	waitFor(t, func() bool { c, _ := r.check(r.pool[0]); return c == codes.OK })
	type sample struct {
		heapMiB    float64
		goroutines int
		fds        int
		checks     int64
	}
	measure := func(checks int64) sample {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fds, _ := os.ReadDir("/proc/self/fd")
		return sample{float64(ms.HeapInuse) / (1 << 20), runtime.NumGoroutine(), len(fds), checks}
	}
	var checks, bad atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				c := r.idp.Claims("api")
				c["jti"] = fmt.Sprintf("soak-%d-%d", w, i)
				tok := token{raw: idptest.Mint(t, r.k1, c)}
				for range 2 {
					code, err := r.check(tok)
					checks.Add(1)
					if err != nil || code != codes.OK {
						bad.Add(1)
					}
				}
			}
		})
	}
	var samples []sample
	for i := range 4 {
		time.Sleep(d / 4)
		samples = append(samples, measure(checks.Load()))
		_ = i
	}
	close(stop)
	wg.Wait()
	for i, s := range samples {
		t.Logf("soak at %d/4: %d checks, heap in use %.1f MiB, %d goroutines, %d fds", i+1, s.checks, s.heapMiB, s.goroutines, s.fds)
	}
	if bad.Load() > 0 {
		t.Errorf("%d of %d soak checks were not allowed", bad.Load(), checks.Load())
	}
	first, last := samples[1], samples[len(samples)-1]
	// The verified-token cache is bounded at 32 MiB and the answer cache at
	// 64 MiB: past them the heap must not keep growing with the tokens.
	if last.heapMiB > first.heapMiB*1.5+40 {
		t.Errorf("heap grew from %.1f to %.1f MiB", first.heapMiB, last.heapMiB)
	}
	if last.goroutines > first.goroutines+20 || last.fds > first.fds+20 {
		t.Errorf("goroutines %d → %d, fds %d → %d", first.goroutines, last.goroutines, first.fds, last.fds)
	}
}
