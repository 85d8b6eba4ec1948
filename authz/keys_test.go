package authz_test

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

func remoteFixture(t *testing.T, keys verify.KeysConfig, ks ...*idptest.Key) (*idptest.IdP, *authz.Config) {
	t.Helper()
	idp := idptest.New(t, ks...)
	return idp, &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "idp", Issuer: idp.URL(), Audiences: []string{aud},
			JWKSURI: idp.JWKSURL(), Algorithms: []string{"RS256", "ES256"}, Keys: keys}},
		Routes:  []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}}},
		Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub"}),
	}
}

func TestUnknownKidRefetchesOnceThenDenies(t *testing.T) {
	k1 := idptest.NewKey(t, "k1", "RS256")
	idp, cfg := remoteFixture(t, verify.KeysConfig{MinRefreshInterval: time.Hour}, k1)
	clk := newClock()
	c := start(t, cfg, clk)
	allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, idp.Claims(aud)))}))
	if got := idp.JWKSHits.Load(); got != 1 {
		t.Fatalf("initial load: %d fetches", got)
	}
	// A flood of unknown kids, concurrently: one refetch between them.
	stranger := idptest.NewKey(t, "unknown", "RS256")
	var wg sync.WaitGroup
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stranger := &idptest.Key{Kid: "unknown-" + string(rune('a'+i%26)), Alg: "RS256", Private: stranger.Private}
			denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, stranger, idp.Claims(aud)))}),
				codes.Unauthenticated, typev3.StatusCode_Unauthorized, "key id is not in the issuer's key set")
		}()
	}
	wg.Wait()
	if got := idp.JWKSHits.Load(); got != 2 {
		t.Fatalf("after unknown-kid flood: %d fetches, want 2 (one refetch)", got)
	}
	// After the interval, one more refetch is allowed.
	clk.Add(time.Hour + time.Second)
	denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, stranger, idp.Claims(aud)))}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	if got := idp.JWKSHits.Load(); got != 3 {
		t.Fatalf("after the interval: %d fetches, want 3", got)
	}
}

func TestKeyRotation(t *testing.T) {
	k1, k2 := idptest.NewKey(t, "k1", "RS256"), idptest.NewKey(t, "k2", "ES256")
	idp, cfg := remoteFixture(t, verify.KeysConfig{}, k1)
	c := start(t, cfg, nil)
	old := idptest.Mint(t, k1, idp.Claims(aud))
	for range 2 { // kept in the verified-token cache from the second
		allowed(t, check(t, c, req{headers: bearer(old)}))
	}
	idp.SetKeys(k2) // rotate: k2 published, k1 withdrawn
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k2, idp.Claims(aud)))}))
		}()
	}
	wg.Wait()
	if got := idp.JWKSHits.Load(); got != 2 {
		t.Fatalf("rotation took %d fetches, want 2 (load + one refetch)", got)
	}
	// The withdrawn key no longer verifies, not even a token the cache holds.
	denied(t, check(t, c, req{headers: bearer(old)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, idp.Claims(aud)))}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
}

func TestIdPDown(t *testing.T) {
	k1 := idptest.NewKey(t, "k1", "RS256")
	t.Run("with cached keys, still allows until max_stale", func(t *testing.T) {
		idp, cfg := remoteFixture(t, verify.KeysConfig{RefreshInterval: time.Minute, MaxStale: time.Hour}, k1)
		clk := newClock()
		c := start(t, cfg, clk)
		allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, claimsAt(idp, clk)))}))
		idp.SetDown(true)
		clk.Add(30 * time.Minute) // refresh due, IdP down: stale keys keep serving
		allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, claimsAt(idp, clk)))}))
		// An unknown kid tries the IdP, which does not answer: nothing is
		// decided about that token (503, not a 401 that would make the
		// client drop a good token), and the known key still works.
		denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, idptest.NewKey(t, "k9", "RS256"), claimsAt(idp, clk)))}),
			codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
		allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, claimsAt(idp, clk)))}))
		clk.Add(time.Hour) // past refresh + max_stale: no decision possible
		resp := check(t, c, req{headers: bearer(idptest.Mint(t, k1, claimsAt(idp, clk)))})
		denied(t, resp, codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
		if resp.GetDeniedResponse() != nil {
			t.Error("an outage must be an error_response, not a denial")
		}
		idp.SetDown(false)
		clk.Add(time.Minute) // past the failure back-off
		allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, claimsAt(idp, clk)))}))
	})
	t.Run("with no keys, 503 error response and back-off", func(t *testing.T) {
		idp, cfg := remoteFixture(t, verify.KeysConfig{MinRefreshInterval: time.Minute}, k1)
		idp.SetDown(true)
		clk := newClock()
		c := start(t, cfg, clk)
		for i := 0; i < 5; i++ {
			denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, idp.Claims(aud)))}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
		}
		if got := idp.JWKSHits.Load(); got != 1 {
			t.Errorf("%d fetches while down, want 1 (failures back off)", got)
		}
		// A bad token is still refused as such: no key work happens for it.
		denied(t, check(t, c, req{headers: bearer("garbage")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
		idp.SetDown(false)
		clk.Add(time.Minute)
		allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, idp.Claims(aud)))}))
	})
	t.Run("unreachable", func(t *testing.T) {
		_, cfg := remoteFixture(t, verify.KeysConfig{}, k1)
		cfg.Issuers[0].JWKSURI = "http://127.0.0.1:1/jwks" // nothing listens on port 1
		c := start(t, cfg, nil)
		iss := cfg.Issuers[0].Issuer
		tok := idptest.Mint(t, k1, map[string]any{"iss": iss, "aud": aud, "sub": "x", "exp": time.Now().Unix() + 60})
		denied(t, check(t, c, req{headers: bearer(tok)}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
	})
}

func TestBrokenKeySetsKeepOldKeys(t *testing.T) {
	k1 := idptest.NewKey(t, "k1", "RS256")
	idp, cfg := remoteFixture(t, verify.KeysConfig{MaxResponseBytes: 64 << 10}, k1)
	clk := newClock()
	c := start(t, cfg, clk)
	allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, claimsAt(idp, clk)))}))
	for name, body := range map[string][]byte{
		"garbage":   []byte("<html>oops</html>"),
		"empty set": []byte(`{"keys":[]}`),
		"oversized": append(append([]byte(`{"keys":[],"pad":"`), make([]byte, 70<<10)...), '"', '}'),
	} {
		t.Run(name, func(t *testing.T) {
			idp.SetRawJWKS(body)
			clk.Add(time.Hour) // past refresh interval and unknown-kid interval
			// A key set that does not parse is no answer: a new kid is a 503.
			denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, idptest.NewKey(t, "k9", "RS256"), claimsAt(idp, clk)))}),
				codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
			allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, claimsAt(idp, clk)))}))
		})
	}
}

func TestDiscoveryIssuerMismatch(t *testing.T) {
	k1 := idptest.NewKey(t, "k1", "RS256")
	idp := idptest.New(t, k1)
	idp.SetDiscoveryIssuer("https://someone-else.example")
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "idp", Issuer: idp.URL(), Audiences: []string{aud}, Discovery: true, Algorithms: []string{"RS256"}}},
		Routes:  []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}}},
	}
	c := start(t, cfg, nil)
	denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, idp.Claims(aud)))}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
	if idp.JWKSHits.Load() != 0 {
		t.Error("keys were fetched from a discovery document for another issuer")
	}
}

// claimsAt are valid claims for idp at the test clock's time.
func claimsAt(idp *idptest.IdP, clk *clock) map[string]any {
	m := idp.Claims(aud)
	m["iat"], m["exp"] = clk.Unix(), clk.Unix()+3600
	return m
}

// TestDiscoveryCannotPointElsewhere: endpoints a discovery document names on
// another origin are refused (503, no call to that host) unless the config
// lists the host; the refusal is logged with the endpoint and the reason.
func TestDiscoveryCannotPointElsewhere(t *testing.T) {
	k1 := idptest.NewKey(t, "k1", "RS256")
	idp := idptest.New(t, k1)
	attacker := idptest.New(t, k1) // same key, so only the origin rule can refuse it
	for _, field := range []string{"jwks_uri", "introspection_endpoint", "userinfo_endpoint"} {
		t.Run(field, func(t *testing.T) {
			idp := idptest.New(t, k1)
			target := map[string]string{"jwks_uri": attacker.JWKSURL(), "introspection_endpoint": attacker.IntrospectionURL(),
				"userinfo_endpoint": attacker.UserinfoURL()}[field]
			idp.SetDiscoveryField(field, target)
			logs := &logBuffer{}
			log := slog.New(slog.NewTextHandler(logs, nil))
			cfg := &authz.Config{
				Issuers: []verify.IssuerConfig{{Name: "idp", Issuer: idp.URL(), Audiences: []string{aud}, Discovery: true,
					Algorithms: []string{"RS256"}, Userinfo: &verify.UserinfoConfig{}}},
				Routes: []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}, Userinfo: true}},
			}
			v, err := verify.New(cfg.Issuers, verify.Options{Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			srv, err := authz.NewServer(cfg, v, log)
			if err != nil {
				t.Fatal(err)
			}
			c := serve(t, srv)
			denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, idp.Claims(aud)))}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
			if n := attacker.JWKSHits.Load() + attacker.UserinfoHits.Load(); n != 0 {
				t.Errorf("%d calls went to the host the document named", n)
			}
			if !strings.Contains(logs.String(), field) || !strings.Contains(logs.String(), "discovery_allowed_hosts") {
				t.Errorf("no clear log line: %s", logs.String())
			}
		})
	}
	// Listed, the other host is used.
	idp.SetDiscoveryField("jwks_uri", attacker.JWKSURL())
	host := strings.TrimPrefix(attacker.URL(), "http://")
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "idp", Issuer: idp.URL(), Audiences: []string{aud}, Discovery: true,
			DiscoveryAllowedHosts: []string{host}, Algorithms: []string{"RS256"}}},
		Routes: []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}}},
	}
	allowed(t, check(t, start(t, cfg, nil), req{headers: bearer(idptest.Mint(t, k1, idp.Claims(aud)))}))
	if attacker.JWKSHits.Load() != 1 {
		t.Errorf("the allowed host served %d key fetches, want 1", attacker.JWKSHits.Load())
	}
}

// TestRecoveryAfterProviderBlip: a pod that starts while the provider is
// down retries with exponential back-off from a short first delay, so it is
// ready soon after the provider returns, not a min_refresh_interval (30 s)
// later. The bound asserted is loose (noisy machines); the log shows the
// figure.
func TestRecoveryAfterProviderBlip(t *testing.T) {
	k1 := idptest.NewKey(t, "k1", "RS256")
	idp, cfg := remoteFixture(t, verify.KeysConfig{}, k1)
	idp.SetDown(true)
	v, err := verify.New(cfg.Issuers, verify.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	v.Start(ctx)
	time.Sleep(2 * time.Second)
	hitsWhileDown := idp.JWKSHits.Load()
	idp.SetDown(false)
	back := time.Now()
	for !v.Ready() {
		if time.Since(back) > 6*time.Second {
			t.Fatalf("not ready 6 s after the provider returned (%d fetches while it was down)", hitsWhileDown)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("ready %v after the provider returned; %d fetches during the 2 s outage", time.Since(back).Round(10*time.Millisecond), hitsWhileDown)
	if hitsWhileDown > 6 {
		t.Errorf("%d fetches in a 2 s outage: the back-off does not back off", hitsWhileDown)
	}
}

// decisions records DecisionInfos, as a metrics observer would.
type decisions struct {
	mu   sync.Mutex
	list []authz.DecisionInfo
}

func (d *decisions) Decision(i authz.DecisionInfo) {
	d.mu.Lock()
	d.list = append(d.list, i)
	d.mu.Unlock()
}
func (d *decisions) last() (authz.DecisionInfo, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.list) == 0 {
		return authz.DecisionInfo{}, false
	}
	return d.list[len(d.list)-1], true
}

// TestDecisionLabels: a refused token that named a configured issuer is
// counted under that issuer; a check Envoy gave up on is cancelled, not an
// outage.
func TestDecisionLabels(t *testing.T) {
	k1 := idptest.NewKey(t, "k1", "RS256")
	idp, cfg := remoteFixture(t, verify.KeysConfig{}, k1)
	v, err := verify.New(cfg.Issuers, verify.Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := authz.NewServer(cfg, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	obs := &decisions{}
	srv.Observe(authz.Observability{Observer: obs})
	c := serve(t, srv)
	expired := idp.Claims(aud)
	expired["exp"] = time.Now().Unix() - 3600
	denied(t, check(t, c, req{headers: bearer(idptest.Mint(t, k1, expired))}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	if d, _ := obs.last(); d.Reason != "expired" || d.Issuer != cfg.Issuers[0].Name {
		t.Errorf("expired token counted as %+v, want issuer %q", d, cfg.Issuers[0].Name)
	}

	// A new kid while the provider is slow; Envoy's timeout (here the
	// client's deadline) ends the call first.
	idp.SetJWKSDelay(2 * time.Second)
	newKid := req{headers: bearer(idptest.Mint(t, idptest.NewKey(t, "k9", "RS256"), idp.Claims(aud)))}.proto()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	// The server's deadline follows the client's: which side notices first
	// varies (a late answer or DeadlineExceeded); the count is what matters.
	if _, err := c.Check(ctx, newKid); err != nil && status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("want the call to time out, got %v", err)
	}
	eventually(t, "the cancelled check is counted", func() bool { d, _ := obs.last(); return d.Decision == "cancelled" })
	if d, _ := obs.last(); d.Reason != "cancelled" || d.Issuer != cfg.Issuers[0].Name {
		t.Errorf("cancelled check counted as %+v", d)
	}
}

// TestUndecidableResponse: by default an undecidable check is an
// error_response (Envoy 1.37+); with undecidable_response: grpc_unavailable
// it is a gRPC UNAVAILABLE status, which older Envoys map to
// status_on_error and failure_mode_allow. Decided denies stay responses.
func TestUndecidableResponse(t *testing.T) {
	k1 := idptest.NewKey(t, "k1", "RS256")
	idp, cfg := remoteFixture(t, verify.KeysConfig{}, k1)
	idp.SetDown(true)
	tok := idptest.Mint(t, k1, idp.Claims(aud))
	denied(t, check(t, start(t, cfg, nil), req{headers: bearer(tok)}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)

	cfg.UndecidableResponse = "grpc_unavailable"
	c := start(t, cfg, nil)
	_, err := c.Check(context.Background(), req{headers: bearer(tok)}.proto())
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("want a gRPC UNAVAILABLE status, got %v", err)
	}
	denied(t, check(t, c, req{headers: bearer("garbage")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
}
