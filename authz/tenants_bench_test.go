package authz_test

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// BenchmarkTenantsWarm is the warm path with tokens of one tenant and of
// 10,000 tenants of one issuer template (each discovered once, before the
// timer), cycling over 10,000 distinct tokens either way: the difference
// is what a tenant costs a warm check. It also reports the heap held with
// every tenant's key set in memory.
func BenchmarkTenantsWarm(b *testing.B) {
	for _, n := range []int{1, 10000} {
		b.Run(fmt.Sprintf("tenants=%d", n), func(b *testing.B) {
			var before runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			idp := idptest.NewTenants(b)
			cfg := &authz.Config{
				Issuers: []verify.IssuerConfig{{Name: "realms", IssuerTemplate: idp.URL() + "/realms/{tenant}", Discovery: true,
					Tenants: &verify.TenantsConfig{Any: true}, MaxDiscoveriesPerSecond: 1 << 20,
					Audiences: []string{aud}, Algorithms: []string{"ES256"}}},
				Routes:  []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}, Scopes: []string{"read"}}},
				Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub", "x-user-scopes": "scope", "x-tenant": "tenant"}),
			}
			srv := serverFor(b, cfg, verify.Options{VerifiedTokens: verify.VerifiedCacheOptions{MaxBytes: 256 << 20}})
			const tokens = 10000
			reqs := make([]*authv3.CheckRequest, tokens)
			ctx := context.Background()
			for i := range tokens {
				tn := fmt.Sprintf("tenant-%05d", i%n)
				idp.Add(tn)
				reqs[i] = req{headers: bearer(idp.Mint(tn, aud, map[string]any{"scope": "read write", "n": i}))}.proto()
				for range 2 { // the verified-token cache keeps a token from its second verification
					if resp, _ := srv.Check(ctx, reqs[i]); resp.GetStatus().GetCode() != 0 {
						b.Fatalf("%s: %s", tn, resp.GetStatus().GetMessage())
					}
				}
			}
			var after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&after)
			held := float64(after.HeapInuse-min(before.HeapInuse, after.HeapInuse)) / (1 << 20)
			b.ReportAllocs()
			b.ResetTimer()
			i := 0
			for b.Loop() {
				if resp, _ := srv.Check(ctx, reqs[i%tokens]); resp.GetStatus().GetCode() != 0 {
					b.Fatal("denied")
				}
				i++
			}
			b.ReportMetric(held, "MiB-heap-held")
		})
	}
}

// BenchmarkStartManyIssuers is a start with 10,000 static issuers: the
// config validated and compiled, the verifier built and started, until it
// is ready (the key sets of the first 64 loaded; the rest load in the
// background or on first use).
func BenchmarkStartManyIssuers(b *testing.B) {
	idp := idptest.NewTenants(b)
	cfg := &authz.Config{Routes: []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}}}}
	for i := range 10000 {
		tn := fmt.Sprintf("s%05d", i)
		idp.Add(tn)
		cfg.Issuers = append(cfg.Issuers, verify.IssuerConfig{Name: tn, Issuer: idp.Issuer(tn), Discovery: true,
			Audiences: []string{aud}, Algorithms: []string{"ES256"}})
	}
	for b.Loop() {
		if p := cfg.Validate(); len(p) > 0 {
			b.Fatal(p)
		}
		v, err := verify.New(cfg.Issuers, verify.Options{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := authz.NewServer(cfg, v, nil); err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		v.Start(ctx)
		for !v.Ready() {
			time.Sleep(time.Millisecond)
		}
		cancel()
	}
}
