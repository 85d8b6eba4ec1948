package authz_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// tenantConfig is one Keycloak-style issuer template over idp's realms,
// with a route that sends the tenant upstream and a route whose condition
// keeps each tenant to its own paths.
func tenantConfig(idp *idptest.Tenants, tenants verify.TenantsConfig) *authz.Config {
	return &authz.Config{
		Issuers: []verify.IssuerConfig{{
			Name: "realms", IssuerTemplate: idp.URL() + "/realms/{tenant}", Discovery: true, Tenants: &tenants,
			Audiences: []string{"api"}, Algorithms: []string{"ES256"},
		}},
		Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub", "x-tenant": "tenant"}),
		Routes: []authz.RouteConfig{
			{Name: "orders", Match: authz.Match{PathPrefix: "/orders"}, Issuers: []string{"realms"},
				When:    []authz.WhenRule{{CEL: "tenant == 'acme' || request.path.startsWith('/orders/' + tenant + '/')"}},
				Headers: map[string]*authz.HeaderSource{"x-tenant-cel": {CEL: "tenant"}}},
		},
	}
}

func startTenants(t *testing.T, cfg *authz.Config, o verify.Options) (authv3.AuthorizationClient, *verify.Verifier) {
	t.Helper()
	v, err := verify.New(cfg.Issuers, o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	v.Start(ctx)
	return startWith(t, cfg, v), v
}

// TestTenantsDiscoveredOnFirstUse: a tenant's first token discovers its
// issuer and fetches its key set once; later tokens are served from what
// was fetched; the tenant reaches CEL and the claim headers.
func TestTenantsDiscoveredOnFirstUse(t *testing.T) {
	idp := idptest.NewTenants(t)
	idp.Add("acme", "globex", "umbrella")
	c, _ := startTenants(t, tenantConfig(idp, verify.TenantsConfig{Allow: []string{"acme", "globex"}}), verify.Options{})

	for i := range 5 {
		set, _ := allowed(t, check(t, c, req{path: "/orders/acme/1", headers: bearer(idp.Mint("acme", "api", map[string]any{"n": i}))}))
		if set["x-tenant"] != "acme" || set["x-tenant-cel"] != "acme" || set["x-user-id"] != "user@acme" {
			t.Fatalf("headers: %v", set)
		}
	}
	tok := idp.Mint("globex", "api", nil)
	allowed(t, check(t, c, req{path: "/orders/globex/1", headers: bearer(tok)}))
	// The condition reads the tenant from the verified iss: globex's token
	// does not reach acme's paths.
	denied(t, check(t, c, req{path: "/orders/acme/1", headers: bearer(tok)}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	for _, tn := range []string{"acme", "globex"} {
		if d, j := idp.Hits(tn); d != 1 || j != 1 {
			t.Errorf("%s: %d discovery and %d key-set requests, want 1 and 1", tn, d, j)
		}
	}

	// A tenant the provider knows but the config does not list: no request.
	denied(t, check(t, c, req{path: "/orders/umbrella/1", headers: bearer(idp.Mint("umbrella", "api", nil))}),
		codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_token"`)
	if d, j := idp.Hits("umbrella"); d+j != 0 {
		t.Errorf("an unlisted tenant reached the provider: %d requests", d+j)
	}

	// One tenant's key does not sign for another: the key set fetched is
	// the issuer's own.
	forged := idptest.Mint(t, idp.Key("acme"), map[string]any{"iss": idp.Issuer("globex"), "sub": "x", "aud": "api",
		"exp": time.Now().Add(time.Hour).Unix()})
	denied(t, check(t, c, req{path: "/orders/globex/1", headers: bearer(forged)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
}

// TestHostileTenantValuesReachNothing: an iss that fits no template with a
// safe tenant, or names an unlisted one, is a 401 with no request to the
// provider, whatever it carries.
func TestHostileTenantValuesReachNothing(t *testing.T) {
	idp := idptest.NewTenants(t)
	idp.Add("acme")
	for _, tenants := range []verify.TenantsConfig{{Allow: []string{"acme"}}, {Any: true}} {
		c, _ := startTenants(t, tenantConfig(idp, tenants), verify.Options{})
		before := idp.Requests.Load()
		key := idp.Key("acme")
		for _, v := range []string{"..", "../realms/acme", "acme/../acme", "a/b", "acme@evil.example", "acme%2f..", "%2e%2e",
			"acme:443", "acme?x=1", "acme#x", "acmé", "ａｃｍｅ", "acme\u202e", "acme\x00", "", strings.Repeat("a", 1<<20),
			"acme/", "acme/protocol/openid-connect/certs", "acme.evil", "acme\\x"} {
			iss := idp.URL() + "/realms/" + v
			tok := idptest.Mint(t, key, map[string]any{"iss": iss, "sub": "x", "aud": "api", "exp": time.Now().Add(time.Hour).Unix()})
			resp := check(t, c, req{path: "/orders/acme/1", headers: bearer(tok)})
			if codes.Code(resp.GetStatus().GetCode()) == codes.OK {
				t.Fatalf("tenant %q allowed", truncateForLog(v))
			}
			if got := codes.Code(resp.GetStatus().GetCode()); got != codes.Unauthenticated && got != codes.InvalidArgument {
				t.Errorf("tenant %q: %v, want a 401 (or a 400 for a header too large)", truncateForLog(v), got)
			}
		}
		// Other iss shapes: another host, scheme or port, before the
		// template's prefix.
		for _, iss := range []string{"https://evil.example/realms/acme", strings.Replace(idp.URL(), "http://", "https://", 1) + "/realms/acme",
			idp.URL() + "0/realms/acme", idp.URL() + "/realms"} {
			tok := idptest.Mint(t, key, map[string]any{"iss": iss, "sub": "x", "aud": "api", "exp": time.Now().Add(time.Hour).Unix()})
			denied(t, check(t, c, req{path: "/orders/acme/1", headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
		}
		if n := idp.Requests.Load() - before; n != 0 {
			t.Fatalf("%+v: hostile tokens made %d requests to the provider: %q", tenants, n, idp.Paths())
		}
	}
}

func truncateForLog(s string) string {
	if len(s) > 20 {
		return s[:20] + "…"
	}
	return s
}

// TestFailingTenantDoesNotAffectOthers: a tenant whose provider fails
// answers 503 for its own tokens, with back-off; the others go on, and the
// tenant recovers when its provider does.
func TestFailingTenantDoesNotAffectOthers(t *testing.T) {
	idp := idptest.NewTenants(t)
	idp.Add("acme", "globex")
	idp.SetDown("globex", true)
	c, _ := startTenants(t, tenantConfig(idp, verify.TenantsConfig{Any: true}), verify.Options{})
	good, bad := idp.Mint("acme", "api", nil), idp.Mint("globex", "api", nil)
	denied(t, check(t, c, req{path: "/orders/globex/1", headers: bearer(bad)}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
	hits := func() int64 { d, j := idp.Hits("globex"); return d + j }
	after := hits()
	for range 20 {
		denied(t, check(t, c, req{path: "/orders/globex/1", headers: bearer(bad)}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
		allowed(t, check(t, c, req{path: "/orders/acme/1", headers: bearer(good)}))
	}
	if n := hits() - after; n > 5 {
		t.Errorf("a failing tenant's provider was asked %d times for 20 tokens: no back-off", n)
	}
	idp.SetDown("globex", false)
	eventually(t, "the tenant recovers", func() bool {
		return codes.Code(check(t, c, req{path: "/orders/globex/1", headers: bearer(bad)}).GetStatus().GetCode()) == codes.OK
	})
}

// TestTenantsFileReloaded: the tenants file is read again when it changes;
// a tenant taken out is refused at once, even for a token verified before.
func TestTenantsFileReloaded(t *testing.T) {
	idp := idptest.NewTenants(t)
	idp.Add("acme", "globex")
	file := filepath.Join(t.TempDir(), "tenants.txt")
	write := func(s string) {
		t.Helper()
		tmp := file + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, file); err != nil { // as a ConfigMap update swaps it
			t.Fatal(err)
		}
	}
	write("# tenants\nacme\n\n")
	c, _ := startTenants(t, tenantConfig(idp, verify.TenantsConfig{File: file}), verify.Options{})
	acme, globex := idp.Mint("acme", "api", nil), idp.Mint("globex", "api", nil)
	for range 2 { // kept in the verified-token cache from the second
		allowed(t, check(t, c, req{path: "/orders/acme/1", headers: bearer(acme)}))
	}
	denied(t, check(t, c, req{path: "/orders/globex/1", headers: bearer(globex)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)

	write("acme\nglobex\n../bad line\n")
	eventually(t, "globex accepted", func() bool {
		return codes.Code(check(t, c, req{path: "/orders/globex/1", headers: bearer(globex)}).GetStatus().GetCode()) == codes.OK
	})
	write("globex\n")
	eventually(t, "acme refused", func() bool {
		return codes.Code(check(t, c, req{path: "/orders/acme/1", headers: bearer(acme)}).GetStatus().GetCode()) == codes.Unauthenticated
	})
	// A file that cannot be read keeps the tenants last read.
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond) // one poll; no timing is asserted
	allowed(t, check(t, c, req{path: "/orders/globex/1", headers: bearer(globex)}))
}

// TestTenantsSharedAcrossTheFleet: pods on one Redis make one discovery
// and one key-set fetch per tenant, fleet-wide, however the tokens spread.
func TestTenantsSharedAcrossTheFleet(t *testing.T) {
	if testing.Short() {
		t.Skip("fleet test")
	}
	rs := redistest.Start(t)
	idp := idptest.NewTenants(t)
	var tenants []string
	for i := range 12 {
		tenants = append(tenants, fmt.Sprintf("t%02d", i))
	}
	idp.Add(tenants...)
	cfg := tenantConfig(idp, verify.TenantsConfig{Any: true})
	cfg.Routes[0].When = nil
	cfg.Issuers[0].MaxDiscoveriesPerSecond = 1000
	var pods []*instance
	for range 3 {
		pods = append(pods, startInstance(t, cfg, redisConfig(t, rs, fleetKey)))
	}
	toks := map[string]string{}
	for _, tn := range tenants {
		toks[tn] = idp.Mint(tn, "api", nil)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 1000)
	for _, p := range pods {
		for _, tn := range tenants {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 3 {
					resp, err := p.c.Check(context.Background(), req{path: "/orders/" + tn, headers: bearer(toks[tn])}.proto())
					if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.OK {
						errs <- fmt.Sprintf("%s: %v %v", tn, err, resp.GetStatus())
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	for _, tn := range tenants {
		if d, j := idp.Hits(tn); d != 1 || j != 1 {
			t.Errorf("%s: %d discovery and %d key-set requests across 3 pods, want 1 and 1", tn, d, j)
		}
	}
}

// TestNewTenantFloodIsBounded: tokens naming many made-up tenants (with
// any: true) reach the provider at most max_discoveries_per_second,
// counted fleet-wide; a tenant already known is unaffected.
func TestNewTenantFloodIsBounded(t *testing.T) {
	if testing.Short() {
		t.Skip("flood test")
	}
	rs := redistest.Start(t)
	idp := idptest.NewTenants(t)
	idp.Add("acme")
	cfg := tenantConfig(idp, verify.TenantsConfig{Any: true})
	cfg.Issuers[0].MaxDiscoveriesPerSecond = 3
	var pods []*instance
	for range 2 {
		pods = append(pods, startInstance(t, cfg, redisConfig(t, rs, fleetKey)))
	}
	acme := idp.Mint("acme", "api", nil)
	for _, p := range pods {
		allowed(t, check(t, p.c, req{path: "/orders/acme/1", headers: bearer(acme)}))
	}
	before := idp.Requests.Load()
	start := time.Now()
	key := idp.Key("acme")
	var wg sync.WaitGroup
	var mu sync.Mutex
	var known []codes.Code
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 100 {
				p := pods[(w+i)%len(pods)]
				tn := fmt.Sprintf("made-up-%d-%d", w, i)
				tok := idptest.Mint(t, key, map[string]any{"iss": idp.Issuer(tn), "sub": "x", "aud": "api", "exp": time.Now().Add(time.Hour).Unix()})
				resp, err := p.c.Check(context.Background(), req{path: "/orders/" + tn, headers: bearer(tok)}.proto())
				if err != nil || codes.Code(resp.GetStatus().GetCode()) == codes.OK {
					t.Errorf("made-up tenant %s: %v %v", tn, err, resp.GetStatus())
				}
				r, err := p.c.Check(context.Background(), req{path: "/orders/acme/1", headers: bearer(acme)}.proto())
				mu.Lock()
				if err == nil {
					known = append(known, codes.Code(r.GetStatus().GetCode()))
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	// Each admitted discovery is one request (the made-up realms answer
	// 404). The counter is per wall-clock second: bound by the seconds the
	// flood spanned, plus the one it started in.
	windows := int64(elapsed/time.Second) + 2
	if n := idp.Requests.Load() - before; n > 3*windows {
		t.Errorf("400 made-up tenants in %v made %d provider requests; the bound is 3 a second (%d)", elapsed, n, 3*windows)
	} else {
		t.Logf("400 made-up tenants in %v: %d provider requests", elapsed.Round(time.Millisecond), n)
	}
	for _, c := range known {
		if c != codes.OK {
			t.Fatalf("a known tenant was refused during the flood: %v", c)
		}
	}
	if len(known) != 400 {
		t.Fatalf("%d known-tenant checks answered", len(known))
	}
}

// TestManyStaticIssuers: beyond the first issuers, key sets load in the
// background or on first use, readiness does not wait for them, and a
// reload of the same config fetches nothing again.
func TestManyStaticIssuers(t *testing.T) {
	idp := idptest.NewTenants(t)
	cfg := &authz.Config{Routes: []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}}}}
	const n = 150
	for i := range n {
		tn := fmt.Sprintf("s%03d", i)
		idp.Add(tn)
		cfg.Issuers = append(cfg.Issuers, verify.IssuerConfig{Name: tn, Issuer: idp.Issuer(tn), Discovery: true,
			Audiences: []string{"api"}, Algorithms: []string{"ES256"}})
	}
	if p := cfg.Validate(); len(p) > 0 {
		t.Fatal(p)
	}
	// The last issuer's provider is down: readiness does not wait for it.
	idp.SetDown("s149", true)
	c, v := startTenants(t, cfg, verify.Options{})
	eventually(t, "ready", v.Ready)
	for _, tn := range []string{"s000", "s120", "s148"} {
		allowed(t, check(t, c, req{headers: bearer(idp.Mint(tn, "api", nil))}))
	}
	denied(t, check(t, c, req{headers: bearer(idp.Mint("s149", "api", nil))}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
	eventually(t, "background loads done", func() bool {
		for i := range n - 1 {
			if _, j := idp.Hits(fmt.Sprintf("s%03d", i)); j != 1 {
				return false
			}
		}
		return true
	})
	before := idp.Requests.Load()
	nv, err := v.Reload(cfg.Issuers)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	nv.Start(ctx)
	v.Retire(nv)
	c2 := startWith(t, cfg, nv)
	allowed(t, check(t, c2, req{headers: bearer(idp.Mint("s120", "api", nil))}))
	time.Sleep(300 * time.Millisecond) // room for a wrong refetch; nothing is timed
	if got := idp.Requests.Load() - before; got > 3 {
		t.Errorf("a reload of the same config made %d provider requests", got)
	}
}

// TestTenantsAllowListReload: a reload that changes tenants.allow takes
// effect at once and keeps the tenants' keys (nothing is fetched again).
func TestTenantsAllowListReload(t *testing.T) {
	idp := idptest.NewTenants(t)
	idp.Add("acme", "globex")
	cfg := tenantConfig(idp, verify.TenantsConfig{Allow: []string{"acme"}})
	c, v := startTenants(t, cfg, verify.Options{})
	acme, globex := idp.Mint("acme", "api", nil), idp.Mint("globex", "api", nil)
	for range 2 { // kept in the verified-token cache: the reload refuses it all the same
		allowed(t, check(t, c, req{path: "/orders/acme/1", headers: bearer(acme)}))
	}

	next := tenantConfig(idp, verify.TenantsConfig{Allow: []string{"globex"}})
	nv, err := v.Reload(next.Issuers)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	nv.Start(ctx)
	v.Retire(nv)
	c2 := startWith(t, next, nv)
	denied(t, check(t, c2, req{path: "/orders/acme/1", headers: bearer(acme)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	allowed(t, check(t, c2, req{path: "/orders/globex/1", headers: bearer(globex)}))
	// Back: acme's issuer and keys were kept.
	again := tenantConfig(idp, verify.TenantsConfig{Allow: []string{"acme", "globex"}})
	nv2, err := nv.Reload(again.Issuers)
	if err != nil {
		t.Fatal(err)
	}
	nv2.Start(ctx)
	nv.Retire(nv2)
	allowed(t, check(t, startWith(t, again, nv2), req{path: "/orders/acme/1", headers: bearer(acme)}))
	if d, j := idp.Hits("acme"); d != 1 || j != 1 {
		t.Errorf("acme: %d discovery and %d key-set requests over two reloads, want 1 and 1", d, j)
	}
}

// TestNewTenantKeptDuringAFlood: with the pending tenants full of made-up
// ones, a new tenant that works is still kept once its first token
// verifies: its later tokens cost the provider nothing.
func TestNewTenantKeptDuringAFlood(t *testing.T) {
	if testing.Short() {
		t.Skip("flood test")
	}
	idp := idptest.NewTenants(t)
	idp.Add("acme")
	cfg := tenantConfig(idp, verify.TenantsConfig{Any: true})
	cfg.Routes[0].When = nil
	cfg.Issuers[0].MaxDiscoveriesPerSecond = 1 << 20
	c, _ := startTenants(t, cfg, verify.Options{})
	key := idp.Key("acme")
	mint := func(tn string) string {
		return idptest.Mint(t, key, map[string]any{"iss": idp.Issuer(tn), "sub": "x", "aud": "api", "exp": time.Now().Add(time.Hour).Unix()})
	}
	for i := range 4200 { // the pending tenants are full
		if codes.Code(check(t, c, req{path: "/orders/x", headers: bearer(mint(fmt.Sprint("early-", i)))}).GetStatus().GetCode()) == codes.OK {
			t.Fatal("a made-up tenant was allowed")
		}
	}
	// The flood goes on while acme's first key set is fetched (slowly):
	// made-up tenants pass through the pending ones meanwhile.
	idp.JWKSDelay.Store(int64(500 * time.Millisecond))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				tn := fmt.Sprintf("made-up-%d-%d", w, i)
				resp, err := c.Check(context.Background(), req{path: "/orders/x", headers: bearer(mint(tn))}.proto())
				if err != nil || codes.Code(resp.GetStatus().GetCode()) == codes.OK {
					t.Errorf("made-up tenant %s: %v %v", tn, err, resp.GetStatus())
					return
				}
			}
		}()
	}
	time.Sleep(200 * time.Millisecond) // the flood is under way; nothing is timed
	for i := range 5 {
		allowed(t, check(t, c, req{path: "/orders/acme/1", headers: bearer(idp.Mint("acme", "api", map[string]any{"n": i}))}))
		time.Sleep(100 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if d, j := idp.Hits("acme"); d != 1 || j != 1 {
		t.Errorf("acme: %d discovery and %d key-set requests for 5 tokens during a flood, want 1 and 1", d, j)
	}
}

// TestTenantsFirstLoadsConcurrently: the tenants of a family share one
// group of key-fetch flights, keyed by issuer; tenants loading their keys
// for the first time at once each get their own key set, never another
// tenant's flight.
func TestTenantsFirstLoadsConcurrently(t *testing.T) {
	idp := idptest.NewTenants(t)
	cfg := tenantConfig(idp, verify.TenantsConfig{Any: true})
	cfg.Issuers[0].MaxDiscoveriesPerSecond = 1000
	c, _ := startTenants(t, cfg, verify.Options{})
	const tenants = 24
	var wg sync.WaitGroup
	errs := make(chan string, 2*tenants)
	for i := range tenants {
		tn := fmt.Sprintf("t%02d", i)
		idp.Add(tn)
		for range 2 {
			wg.Go(func() {
				resp, err := c.Check(context.Background(), req{path: "/orders/" + tn + "/1",
					headers: bearer(idp.Mint(tn, "api", nil))}.proto())
				switch {
				case err != nil:
					errs <- tn + ": " + err.Error()
				case resp.GetStatus().GetCode() != 0:
					errs <- tn + ": " + resp.GetStatus().GetMessage()
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}
