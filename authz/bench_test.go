package authz_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace/noop"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/authz/decisionlog"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// benchServer is the README's typical policy for one issuer and algorithm.
func benchServer(b *testing.B, alg string, vo verify.Options) (*authz.Server, *idptest.Key, *idptest.IdP) {
	return benchServerWith(b, alg, vo, nil)
}

// benchServerWith is benchServer with the config changed by mod first.
func benchServerWith(b *testing.B, alg string, vo verify.Options, mod func(*authz.Config)) (*authz.Server, *idptest.Key, *idptest.IdP) {
	b.Helper()
	k := idptest.NewKey(b, "k", alg)
	idp := idptest.New(b, k)
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "idp", Issuer: idp.URL(), Audiences: []string{aud},
			JWKSURI: idp.JWKSURL(), Algorithms: []string{alg}}},
		Routes:               []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}, Scopes: []string{"read"}}},
		Headers:              authz.ClaimHeaders(map[string]string{"x-user-id": "sub", "x-user-scopes": "scope"}),
		ReservedHeaderPrefix: "x-auth-",
	}
	if mod != nil {
		mod(cfg)
	}
	return serverFor(b, cfg, vo), k, idp
}

// serverFor builds cfg's verifier and Check server as serve does without an
// OTLP endpoint configured (the no-op tracer provider for both), unless vo
// names a tracer provider.
func serverFor(b *testing.B, cfg *authz.Config, vo verify.Options) *authz.Server {
	b.Helper()
	if vo.TracerProvider == nil {
		vo.TracerProvider = noop.NewTracerProvider()
	}
	v, err := verify.New(cfg.Issuers, vo)
	if err != nil {
		b.Fatal(err)
	}
	srv, err := authz.NewServer(cfg, v, nil)
	if err != nil {
		b.Fatal(err)
	}
	srv.Observe(authz.Observability{TracerProvider: noop.NewTracerProvider()})
	return srv
}

func benchToken(b *testing.B, k *idptest.Key, idp *idptest.IdP) string {
	c := idp.Claims(aud)
	c["scope"] = "read write"
	return idptest.Mint(b, k, c)
}

func runChecks(b *testing.B, srv *authz.Server, r *authv3.CheckRequest) {
	ctx := context.Background()
	if resp, _ := srv.Check(ctx, r); resp.GetStatus().GetCode() != 0 { // warms keys (and the cache)
		b.Fatal("denied")
	}
	b.ReportAllocs()
	for b.Loop() {
		resp, _ := srv.Check(ctx, r)
		if resp.GetStatus().GetCode() != 0 {
			b.Fatal("denied")
		}
	}
}

// BenchmarkCheckWarm is the common case: a token seen before, answered from
// the verified-token cache; the route checks and the response still run.
func BenchmarkCheckWarm(b *testing.B) {
	srv, k, idp := benchServer(b, "RS256", verify.Options{})
	runChecks(b, srv, req{headers: bearer(benchToken(b, k, idp))}.proto())
}

// BenchmarkCheckWarmCEL is BenchmarkCheckWarm with a route of three `when`
// expressions and two CEL headers: the difference, over five, is the cost
// of one expression.
func BenchmarkCheckWarmCEL(b *testing.B) {
	srv, k, idp := benchServerWith(b, "RS256", verify.Options{}, func(cfg *authz.Config) {
		cfg.Routes[0].When = []authz.WhenRule{
			{CEL: "request.method in ['GET', 'HEAD'] || 'write' in scopes"},
			{CEL: "request.path.startsWith('/orders/')"},
			{CEL: "claims.sub != '' && issuer == 'idp'"},
		}
		cfg.Routes[0].Headers = map[string]*authz.HeaderSource{"x-tenant": {CEL: "claims.tid"}, "x-sub-route": {CEL: "claims.sub + '@' + route"}}
	})
	c := idp.Claims(aud)
	c["scope"], c["tid"] = "read write", "acme"
	runChecks(b, srv, req{headers: bearer(idptest.Mint(b, k, c))}.proto())
}

// BenchmarkCheckDPoP is a warm check of a DPoP-bound token with a fresh
// ES256 proof each time (proofs are signed in batches with the timer
// stopped): compare with BenchmarkCheckWarm plus BenchmarkBare/ES256.
func BenchmarkCheckDPoP(b *testing.B) {
	srv, k, idp := benchServerWith(b, "RS256", verify.Options{}, func(cfg *authz.Config) {
		cfg.Issuers[0].DPoP = &verify.DPoPConfig{}
		cfg.Routes[0].SenderConstraint = "required"
	})
	client := newDPoPClient(b)
	c := idp.Claims(aud)
	c["scope"], c["cnf"] = "read write", map[string]any{"jkt": client.jkt}
	tok := idptest.Mint(b, k, c)
	ctx := context.Background()
	batch := make([]*authv3.CheckRequest, 0, 1000)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if len(batch) == 0 {
			b.StopTimer()
			for range min(1000, b.N-i) {
				batch = append(batch, dpopReq("GET", "/orders/1", tok, client.proof("GET", dpopHost+"/orders/1", tok, nil)).proto())
			}
			b.StartTimer()
		}
		resp, _ := srv.Check(ctx, batch[len(batch)-1])
		batch = batch[:len(batch)-1]
		if resp.GetStatus().GetCode() != 0 {
			b.Fatal("denied: ", resp.GetStatus().GetMessage())
		}
	}
}

// BenchmarkCheckManyHeaders: a warm allow for a request with 10,000
// headers under the reserved prefix (every one stripped), to show the allow
// path is linear in the number of request headers. Compare ns/op with
// BenchmarkCheckWarm: ~10k times a header's cost, not its square.
func BenchmarkCheckManyHeaders(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			srv, k, idp := benchServer(b, "RS256", verify.Options{})
			r := req{headers: bearer(benchToken(b, k, idp))}
			r.raw = rawHeaders(":method", "GET", ":authority", "api.example.com", ":path", "/orders/1", "authorization", r.headers["authorization"])
			for i := range n {
				r.raw = append(r.raw, &corev3.HeaderValue{Key: fmt.Sprintf("x-auth-h%d", i), RawValue: []byte("v")})
			}
			runChecks(b, srv, r.proto())
		})
	}
}

// BenchmarkCheckCold verifies every time (verified-token cache off): the
// whole decision per algorithm, to compare with BenchmarkBare*.
func BenchmarkCheckCold(b *testing.B) {
	for _, alg := range []string{"RS256", "ES256", "EdDSA"} {
		b.Run(alg, func(b *testing.B) {
			srv, k, idp := benchServer(b, alg, verify.Options{VerifiedTokens: verify.VerifiedCacheOptions{Disabled: true}})
			runChecks(b, srv, req{headers: bearer(benchToken(b, k, idp))}.proto())
		})
	}
}

// BenchmarkCheckNew is every token new, with the verified-token cache full
// of tokens that were used twice (as a pod's is in production): each check
// parses and verifies a token not seen before, while the collector marks
// the cache's entries. HS256 keeps the signature's cost out of the figure;
// the claims are the load script's.
func BenchmarkCheckNew(b *testing.B) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	b.Setenv("BENCH_HMAC_SECRET", string(secret))
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "hs", Issuer: "https://hs.example", Audiences: []string{aud},
			HMACSecretEnv: "BENCH_HMAC_SECRET", Algorithms: []string{"HS256"}}},
		Routes:  []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}, Scopes: []string{"read"}}},
		Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub", "x-user-scopes": "scope"}),
	}
	srv := serverFor(b, cfg, verify.Options{})
	// More distinct tokens than the default cache holds (about 45,000 of
	// these), so that each comes back only after it was evicted.
	const distinct = 200_000
	now := time.Now().Unix()
	reqs := make([]*authv3.CheckRequest, distinct)
	for i := range reqs {
		tok := idptest.Sign(b, "HS256", secret, map[string]any{"alg": "HS256", "typ": "JWT"},
			map[string]any{"iss": "https://hs.example", "aud": aud, "sub": fmt.Sprint("user-", i),
				"scope": "read write", "iat": now, "exp": now + 7200, "jti": fmt.Sprint(i)})
		reqs[i] = req{headers: bearer(tok)}.proto()
	}
	ctx := context.Background()
	for _, r := range reqs[:distinct/2] { // fill the cache
		for range 2 {
			if resp, _ := srv.Check(ctx, r); resp.GetStatus().GetCode() != 0 {
				b.Fatal("denied")
			}
		}
	}
	b.ReportAllocs()
	i := distinct / 2
	for b.Loop() {
		if resp, _ := srv.Check(ctx, reqs[i%distinct]); resp.GetStatus().GetCode() != 0 {
			b.Fatal("denied")
		}
		i++
	}
}

// BenchmarkBare is the floor for a cold check: the signature verification
// alone (SHA-256 of the signing input included), per algorithm.
func BenchmarkBare(b *testing.B) {
	input := []byte("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEiLCJhdWQiOiJvcmRlcnMtYXBpIn0")
	b.Run("RS256", func(b *testing.B) {
		k := idptest.NewKey(b, "k", "RS256").Private.(*rsa.PrivateKey)
		sum := sha256.Sum256(input)
		sig, _ := rsa.SignPKCS1v15(nil, k, crypto.SHA256, sum[:])
		b.ReportAllocs()
		for b.Loop() {
			h := sha256.Sum256(input)
			if rsa.VerifyPKCS1v15(&k.PublicKey, crypto.SHA256, h[:], sig) != nil {
				b.Fatal("verify failed")
			}
		}
	})
	b.Run("ES256", func(b *testing.B) {
		k := idptest.NewKey(b, "k", "ES256").Private.(*ecdsa.PrivateKey)
		sum := sha256.Sum256(input)
		sig, _ := ecdsa.SignASN1(nil, k, sum[:])
		b.ReportAllocs()
		for b.Loop() {
			h := sha256.Sum256(input)
			if !ecdsa.VerifyASN1(&k.PublicKey, h[:], sig) {
				b.Fatal("verify failed")
			}
		}
	})
	b.Run("EdDSA", func(b *testing.B) {
		k := idptest.NewKey(b, "k", "EdDSA").Private.(ed25519.PrivateKey)
		sig := ed25519.Sign(k, input)
		pub := k.Public().(ed25519.PublicKey)
		b.ReportAllocs()
		for b.Loop() {
			if !ed25519.Verify(pub, input, sig) {
				b.Fatal("verify failed")
			}
		}
	})
}

// BenchmarkCheckGRPC is a warm check through the generated client and a
// real gRPC server on loopback (both in this process, sharing the cores).
func BenchmarkCheckGRPC(b *testing.B) {
	srv, k, idp := benchServer(b, "RS256", verify.Options{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer()
	authv3.RegisterAuthorizationServer(gs, srv)
	go func() { _ = gs.Serve(lis) }()
	defer gs.Stop()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	c := authv3.NewAuthorizationClient(conn)
	r := req{headers: bearer(benchToken(b, k, idp))}.proto()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		resp, err := c.Check(ctx, r)
		if err != nil || resp.GetStatus().GetCode() != 0 {
			b.Fatal("denied")
		}
	}
}

// BenchmarkCheckOpaque is a check of an opaque token whose introspection
// answer is cached in this pod's memory. (The Redis path, for a pod that has
// not seen the token, is cache.BenchmarkGetFromRedis.)
func BenchmarkCheckOpaque(b *testing.B) {
	f := newIntroFixture(b, "client_secret_basic")
	v, err := verify.New(f.cfg.Issuers, verify.Options{})
	if err != nil {
		b.Fatal(err)
	}
	srv, err := authz.NewServer(f.cfg, v, nil)
	if err != nil {
		b.Fatal(err)
	}
	srv.Observe(authz.Observability{TracerProvider: noop.NewTracerProvider()})
	runChecks(b, srv, req{headers: bearer(f.opaque(nil))}.proto())
}

// BenchmarkCheckWarmHostPolicies is BenchmarkCheckWarm with 1,000 host
// policies of 10 routes each, across 200 namespaces (issue 21's scale), the
// request matching the last route of one of them: host lookup is O(1) and
// only that policy's routes are matched, so it should cost what
// BenchmarkCheckWarm costs. It reports the heap the compiled policies hold.
func BenchmarkCheckWarmHostPolicies(b *testing.B) {
	var before, after runtime.MemStats
	srv, k, idp := benchServerWith(b, "RS256", verify.Options{}, func(cfg *authz.Config) {
		runtime.GC()
		runtime.ReadMemStats(&before)
		cfg.Routes = nil
		cfg.RoutesFromResources = true
		for i := range 1000 {
			hp := authz.HostPolicy{Name: fmt.Sprintf("team-%d/p%d", i%200, i), Issuers: []string{"idp"},
				Hosts: []string{fmt.Sprintf("app%d.team-%d.svc.cluster.local", i, i%200), fmt.Sprintf("*.app%d.example.com", i)}}
			for r := range 10 {
				hp.Routes = append(hp.Routes, authz.RouteConfig{Name: fmt.Sprintf("r%d", r),
					Match: authz.Match{PathPrefix: fmt.Sprintf("/svc%d", r)}, Scopes: []string{"read"}})
			}
			hp.Routes[9].Match.PathPrefix = "/"
			c, problems := authz.CompileHostPolicy(cfg, hp)
			if len(problems) > 0 {
				b.Fatal(problems)
			}
			cfg.Hosts = append(cfg.Hosts, c)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
	})
	r := req{host: "x.app777.example.com", path: "/orders/1", headers: bearer(benchToken(b, k, idp))}.proto()
	runChecks(b, srv, r)
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "MiB-policies")
}

// BenchmarkCheckWarmDecisionLog is BenchmarkCheckWarm with decision logs at
// their default sampling (1% of allows) into a discarding sink: the cost of
// the sampling and of one event in a hundred.
func BenchmarkCheckWarmDecisionLog(b *testing.B) {
	srv, k, idp := benchServer(b, "RS256", verify.Options{})
	dl, err := decisionlog.New(context.Background(), decisionlog.Config{}, io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	srv.Observe(authz.Observability{TracerProvider: noop.NewTracerProvider(), DecisionLog: dl})
	runChecks(b, srv, req{headers: bearer(benchToken(b, k, idp))}.proto())
}

// BenchmarkCheckWarmTraced is BenchmarkCheckWarm with tracing as production
// configures it: the SDK's tracer provider with the default parent-based
// sampler and a batching exporter (that discards), and Envoy's trace context
// in the call's metadata, sampled or not. Against BenchmarkCheckWarm (no
// exporter) it is the decision span's cost.
//
// sampled-otlp exports through the real OTLP/HTTP exporter to a loopback
// collector that discards: what a sampled check costs the process,
// transform and marshal included.
func BenchmarkCheckWarmTraced(b *testing.B) {
	for _, c := range []struct {
		name  string
		flags string
		otlp  bool
	}{{"sampled", "01", false}, {"not-sampled", "00", false}, {"sampled-otlp", "01", true}} {
		b.Run(c.name, func(b *testing.B) {
			var exp sdktrace.SpanExporter = tracetest.NewNoopExporter()
			if c.otlp {
				sink := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					_, _ = io.Copy(io.Discard, r.Body)
					w.Header().Set("Content-Type", "application/x-protobuf")
				}))
				b.Cleanup(sink.Close)
				var err error
				if exp, err = otlptracehttp.New(context.Background(), otlptracehttp.WithEndpointURL(sink.URL+"/v1/traces")); err != nil {
					b.Fatal(err)
				}
			}
			tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp))
			b.Cleanup(func() { _ = tp.Shutdown(context.Background()) })
			srv, k, idp := benchServer(b, "RS256", verify.Options{TracerProvider: tp})
			srv.Observe(authz.Observability{TracerProvider: tp, Propagator: testProp})
			r := req{headers: bearer(benchToken(b, k, idp))}.proto()
			// The metadata of an ext_authz call from Envoy, as grpc-go hands
			// it to the server.
			ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(
				":authority", "ext-authz", "content-type", "application/grpc", "user-agent", "envoy/1.37.0",
				"grpc-accept-encoding", "identity,deflate,gzip", "x-envoy-expected-rq-timeout-ms", "200",
				"x-request-id", "b0b6c7d4-0a51-4d0b-9a7e-3f6a1c2d9e80",
				"traceparent", "00-"+envoyTrace+"-"+envoySpan+"-"+c.flags))
			if resp, _ := srv.Check(ctx, r); resp.GetStatus().GetCode() != 0 {
				b.Fatal("denied")
			}
			b.ReportAllocs()
			for b.Loop() {
				if resp, _ := srv.Check(ctx, r); resp.GetStatus().GetCode() != 0 {
					b.Fatal("denied")
				}
			}
		})
	}
}

// BenchmarkVerifiedCacheMemory checks tokens never seen before, each twice
// so that the verified-token cache keeps it (HS256, so the signature costs
// little), and reports the heap in use (spans holding any
// live object: what RSS follows) and the live heap after 100,000 and after
// 2,000,000 of them: the verified-token cache is bounded by bytes, so memory
// must not grow with the tokens seen. The two differ by fragmentation: the
// cache evicts entries all over the heap.
//
//	go test -run XXX -bench VerifiedCacheMemory -benchtime 1x ./authz
func BenchmarkVerifiedCacheMemory(b *testing.B) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	b.Setenv("BENCH_HMAC_SECRET", string(secret))
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "hs", Issuer: "https://hs.example", Audiences: []string{aud},
			HMACSecretEnv: "BENCH_HMAC_SECRET", Algorithms: []string{"HS256"}}},
		Routes:  []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}}},
		Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub"}),
	}
	srv := serverFor(b, cfg, verify.Options{})
	ctx := context.Background()
	exp := time.Now().Add(time.Hour).Unix()
	heap := func() (inuse, live float64) {
		var m runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&m)
		return float64(m.HeapInuse) / (1 << 20), float64(m.HeapAlloc) / (1 << 20)
	}
	for b.Loop() {
		var at100k, live100k float64
		for i := range 2_000_000 {
			tok := idptest.Sign(b, "HS256", secret, map[string]any{"alg": "HS256", "typ": "JWT"},
				map[string]any{"iss": "https://hs.example", "aud": aud, "sub": fmt.Sprint("user-", i), "exp": exp})
			r := req{headers: bearer(tok)}.proto()
			for range 2 {
				if resp, _ := srv.Check(ctx, r); resp.GetStatus().GetCode() != 0 {
					b.Fatal("denied")
				}
			}
			if i+1 == 100_000 {
				at100k, live100k = heap()
			}
		}
		at2m, live2m := heap()
		b.ReportMetric(at100k, "MiB-heap-100k")
		b.ReportMetric(at2m, "MiB-heap-2M")
		b.ReportMetric(at2m/at100k, "ratio")
		b.ReportMetric(live2m/live100k, "live-ratio")
	}
}
