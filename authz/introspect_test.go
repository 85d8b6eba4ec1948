package authz_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// clientSecret has characters that RFC 6749 §2.3.1 form-encoding changes,
// so a client that skips the encoding fails against idptest.
const clientSecret = "s3cret/with+odd&chars:"

type introFixture struct {
	idp *idptest.IdP
	key *idptest.Key
	cfg *authz.Config
	clk *clock
	seq int
}

// newIntroFixture: one IdP with a JWKS, introspection (client authenticated
// with method) and userinfo; routes for each option.
func newIntroFixture(t testing.TB, method string) *introFixture {
	t.Helper()
	key := idptest.NewKey(t, "k1", "RS256")
	idp := idptest.New(t, key)
	idp.RegisterClient(idptest.Client{ID: "tokenauthz", Secret: clientSecret, Method: method})
	secretFile := filepath.Join(t.TempDir(), "client-secret")
	if err := os.WriteFile(secretFile, []byte(clientSecret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{
			Name: "main", Issuer: idp.URL(), Audiences: []string{aud},
			JWKSURI: idp.JWKSURL(), Algorithms: []string{"RS256"}, Leeway: dur(0),
			RequiredClaims: []string{"sub"},
			Introspection: &verify.IntrospectionConfig{
				Endpoint: idp.IntrospectionURL(), ClientID: "tokenauthz", ClientSecretFile: secretFile,
				AuthMethod: method, Timeout: time.Second, MaxResponseBytes: 4096,
			},
			Userinfo: &verify.UserinfoConfig{Endpoint: idp.UserinfoURL()},
		}},
		Routes: []authz.RouteConfig{
			{Name: "payments", Match: authz.Match{PathPrefix: "/payments"}, Introspect: "always"},
			{Name: "profile", Match: authz.Match{PathPrefix: "/profile"}, Userinfo: true,
				Claims: map[string]any{"userinfo.email_verified": true}},
			{Name: "jwt-only", Match: authz.Match{PathPrefix: "/jwt-only"}, Introspect: "never"},
			{Name: "write", Match: authz.Match{PathPrefix: "/orders", Methods: []string{"POST"}}, Scopes: []string{"orders:write"}},
			{Name: "default", Match: authz.Match{PathPrefix: "/"}},
		},
		Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub", "x-client-id": "client_id", "x-user-scopes": "scope",
			"x-user-email": "userinfo.email"}),
	}
	return &introFixture{idp: idp, key: key, cfg: cfg, clk: newClock()}
}

// opaque issues an opaque token valid for an hour of the fixture's clock.
func (f *introFixture) opaque(extra map[string]any) string {
	c := map[string]any{"iss": f.idp.URL(), "sub": "user-1", "aud": aud, "client_id": "web-app",
		"scope": "orders:read", "exp": f.clk.Unix() + 3600}
	for k, v := range extra {
		c[k] = v
	}
	return f.idp.Opaque(c)
}

// jwt mints a JWT with a unique jti (RS256 signatures are deterministic, so
// two tokens minted in one second would otherwise be the same token).
func (f *introFixture) jwt(t testing.TB) string {
	c := f.idp.Claims(aud)
	f.seq++
	c["iat"], c["exp"], c["jti"] = f.clk.Unix(), f.clk.Unix()+3600, fmt.Sprint("jti-", f.seq)
	return idptest.Mint(t, f.key, c)
}

// logBuffer collects log lines for assertions.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}
func (l *logBuffer) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// start serves the fixture's config and returns the client and the logs.
func (f *introFixture) start(t *testing.T) (authv3.AuthorizationClient, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	v, err := verify.New(f.cfg.Issuers, verify.Options{Now: f.clk.Now, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := authz.NewServer(f.cfg, v, log)
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, srv), logs
}

func TestOpaqueTokenIntrospected(t *testing.T) {
	for _, method := range []string{"client_secret_basic", "client_secret_post"} {
		t.Run(method, func(t *testing.T) {
			f := newIntroFixture(t, method)
			c, _ := f.start(t)
			tok := f.opaque(nil)
			set, removed := allowed(t, check(t, c, req{headers: map[string]string{
				"authorization": "Bearer " + tok, "x-user-id": "spoofed", "x-user-email": "spoofed@evil"}}))
			if set["x-user-id"] != "user-1" || set["x-client-id"] != "web-app" || set["x-user-scopes"] != "orders:read" {
				t.Fatalf("claim headers from introspection: %v", set)
			}
			if !contains(removed, "x-user-email") {
				t.Fatalf("userinfo header not enriched on this route must be removed: %v", removed)
			}
			last := f.idp.LastRequest()
			_, _, hasBasic := last.BasicAuth()
			if hasBasic != (method == "client_secret_basic") {
				t.Fatalf("%s: Basic credentials sent = %v", method, hasBasic)
			}
			if f.idp.IntrospectionHits.Load() != 1 {
				t.Fatalf("introspection calls = %d", f.idp.IntrospectionHits.Load())
			}
		})
	}
}

func TestOpaqueTokenDenials(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	c, _ := f.start(t)

	t.Run("unknown token is inactive", func(t *testing.T) {
		denied(t, check(t, c, req{headers: bearer("not-a-token-the-idp-issued")}), codes.Unauthenticated,
			typev3.StatusCode_Unauthorized, `error="invalid_token"`, "not active")
	})
	t.Run("revoked token", func(t *testing.T) {
		tok := f.opaque(nil)
		f.idp.Revoke(tok)
		denied(t, check(t, c, req{headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_token"`)
	})
	t.Run("scope from introspection is enforced", func(t *testing.T) {
		tok := f.opaque(nil) // orders:read only
		denied(t, check(t, c, req{method: "POST", path: "/orders", headers: bearer(tok)}), codes.PermissionDenied,
			typev3.StatusCode_Forbidden, `error="insufficient_scope"`, `scope="orders:write"`)
		writer := f.opaque(map[string]any{"scope": "orders:read orders:write"})
		allowed(t, check(t, c, req{method: "POST", path: "/orders", headers: bearer(writer)}))
	})
	t.Run("wrong audience in the response", func(t *testing.T) {
		tok := f.opaque(map[string]any{"aud": []any{"billing-api"}})
		denied(t, check(t, c, req{headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "audience")
	})
	t.Run("another issuer in the response", func(t *testing.T) {
		tok := f.opaque(map[string]any{"iss": f.idp.URL() + "/"})
		denied(t, check(t, c, req{headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "issuer")
	})
	t.Run("active but expired by the response's exp", func(t *testing.T) {
		// A provider whose clock lags says active; its exp still counts.
		f.idp.ForceReply(200, fmt.Appendf(nil, `{"active":true,"sub":"user-1","exp":%d}`, f.clk.Unix()-1))
		defer f.idp.ForceReply(0, nil)
		denied(t, check(t, c, req{headers: bearer("lagging-clock")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "expired")
	})
	t.Run("active without a required claim", func(t *testing.T) {
		f.idp.ForceReply(200, []byte(`{"active":true,"client_id":"batch-job"}`))
		defer f.idp.ForceReply(0, nil)
		denied(t, check(t, c, req{headers: bearer("no-sub")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "sub")
	})
	t.Run("a route that takes JWTs only", func(t *testing.T) {
		before := f.idp.IntrospectionHits.Load()
		denied(t, check(t, c, req{path: "/jwt-only", headers: bearer(f.opaque(nil))}), codes.Unauthenticated,
			typev3.StatusCode_Unauthorized, "not a JWT")
		if f.idp.IntrospectionHits.Load() != before {
			t.Fatal("introspect: never still called the provider")
		}
	})
}

func TestRevokedJWTOnIntrospectAlwaysRoute(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	c, _ := f.start(t)
	tok := f.jwt(t)
	allowed(t, check(t, c, req{path: "/payments/1", headers: bearer(tok)}))
	if f.idp.IntrospectionHits.Load() != 1 {
		t.Fatalf("introspect: always made %d calls, want 1", f.idp.IntrospectionHits.Load())
	}
	allowed(t, check(t, c, req{path: "/orders/1", headers: bearer(tok)}))
	if f.idp.IntrospectionHits.Load() != 1 {
		t.Fatal("a route without introspect: always called the provider for a JWT")
	}

	// Revoked at the provider: the answer cached a moment ago still holds
	// (that is the revocation latency, cache_ttl, default 30s)…
	f.idp.Revoke(tok)
	allowed(t, check(t, c, req{path: "/payments/1", headers: bearer(tok)}))
	// …and once it runs out the revoked JWT is refused on the sensitive route
	// while it still passes local verification elsewhere.
	f.clk.Add(30 * time.Second)
	denied(t, check(t, c, req{path: "/payments/1", headers: bearer(tok)}), codes.Unauthenticated,
		typev3.StatusCode_Unauthorized, `error="invalid_token"`, "not active")
	allowed(t, check(t, c, req{path: "/orders/1", headers: bearer(tok)}))

	fresh := f.jwt(t)
	f.idp.Revoke(fresh) // revoked before we ever saw it: refused at once
	denied(t, check(t, c, req{path: "/payments/1", headers: bearer(fresh)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	// A token that fails local verification never reaches the provider.
	before := f.idp.IntrospectionHits.Load()
	denied(t, check(t, c, req{path: "/payments/1", headers: bearer(fresh[:len(fresh)-4] + "AAAA")}),
		codes.Unauthenticated, typev3.StatusCode_Unauthorized, "signature")
	if f.idp.IntrospectionHits.Load() != before {
		t.Fatal("a badly signed JWT was sent to introspection")
	}
}

func TestIntrospectionProviderFailuresAre503(t *testing.T) {
	cases := []struct {
		name    string
		inject  func(f *introFixture)
		logWant string
	}{
		{"wrong client secret", func(f *introFixture) {
			f.idp.RegisterClient(idptest.Client{ID: "tokenauthz", Secret: "rotated", Method: "client_secret_basic"})
		}, "refused our client credentials"},
		{"provider down", func(f *introFixture) { f.idp.SetDown(true) }, "HTTP 503"},
		{"HTTP 500", func(f *introFixture) { f.idp.ForceReply(500, []byte(`{"error":"server_error"}`)) }, "HTTP 500"},
		{"malformed JSON", func(f *introFixture) { f.idp.ForceReply(200, []byte(`{"active":tru`)) }, "not a JSON object"},
		{"active is not a boolean", func(f *introFixture) { f.idp.ForceReply(200, []byte(`{"active":"true"}`)) }, "no boolean active"},
		{"duplicate active", func(f *introFixture) {
			f.idp.ForceReply(200, []byte(`{"active":false,"active":true}`))
		}, "not a JSON object"},
		{"oversized response", func(f *introFixture) {
			f.idp.ForceReply(200, []byte(`{"active":true,"pad":"`+strings.Repeat("x", 5000)+`"}`))
		}, "too large"},
		{"timeout", func(f *introFixture) { f.idp.SetDelay(3 * time.Second) }, "no answer within the 1s timeout"},
		{"redirect", func(f *introFixture) { f.idp.ForceReply(http.StatusFound, nil) }, "HTTP 302"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newIntroFixture(t, "client_secret_basic")
			c, logs := f.start(t)
			tc.inject(f)
			tok := f.opaque(nil)
			denied(t, check(t, c, req{headers: bearer(tok)}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
			out := logs.String()
			if !strings.Contains(out, tc.logWant) || !strings.Contains(out, "issuer=main") {
				t.Fatalf("log lacks the cause %q or the issuer:\n%s", tc.logWant, out)
			}
			if strings.Contains(out, tok) || strings.Contains(out, clientSecret) {
				t.Fatalf("log leaks the token or the client secret:\n%s", out)
			}
			// Failures are not cached: once the provider recovers, so do we.
			f.idp.RegisterClient(idptest.Client{ID: "tokenauthz", Secret: clientSecret, Method: "client_secret_basic"})
			f.idp.SetDown(false)
			f.idp.ForceReply(0, nil)
			f.idp.SetDelay(0)
			allowed(t, check(t, c, req{headers: bearer(tok)}))
		})
	}
}

func TestIntrospectionCache(t *testing.T) {
	f := newIntroFixture(t, "client_secret_post")
	c, _ := f.start(t)

	t.Run("a hit makes no provider call", func(t *testing.T) {
		tok := f.opaque(nil)
		before := f.idp.IntrospectionHits.Load()
		for range 5 {
			allowed(t, check(t, c, req{headers: bearer(tok)}))
		}
		if n := f.idp.IntrospectionHits.Load() - before; n != 1 {
			t.Fatalf("5 checks of one token made %d provider calls, want 1", n)
		}
	})

	t.Run("a cached result never skips a stricter route's checks", func(t *testing.T) {
		tok := f.opaque(nil) // orders:read
		allowed(t, check(t, c, req{headers: bearer(tok)}))
		denied(t, check(t, c, req{method: "POST", path: "/orders", headers: bearer(tok)}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	})

	t.Run("100 concurrent checks of a new token make one call", func(t *testing.T) {
		f.idp.SetDelay(200 * time.Millisecond)
		defer f.idp.SetDelay(0)
		tok := f.opaque(nil)
		before := f.idp.IntrospectionHits.Load()
		var wg sync.WaitGroup
		bad := make(chan string, 100)
		for range 100 {
			wg.Go(func() {
				resp, err := c.Check(t.Context(), req{headers: bearer(tok)}.proto())
				if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.OK {
					bad <- resp.GetStatus().GetMessage()
				}
			})
		}
		wg.Wait()
		close(bad)
		for m := range bad {
			t.Errorf("a concurrent check was not allowed: %q", m)
		}
		if n := f.idp.IntrospectionHits.Load() - before; n != 1 {
			t.Fatalf("100 concurrent checks made %d provider calls, want 1", n)
		}
	})

	t.Run("an inactive answer is cached briefly", func(t *testing.T) {
		before := f.idp.IntrospectionHits.Load()
		for range 3 {
			denied(t, check(t, c, req{headers: bearer("flood-of-garbage")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
		}
		if n := f.idp.IntrospectionHits.Load() - before; n != 1 {
			t.Fatalf("3 checks of an inactive token made %d calls, want 1", n)
		}
		f.clk.Add(5 * time.Second) // negative_cache_ttl default
		denied(t, check(t, c, req{headers: bearer("flood-of-garbage")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
		if n := f.idp.IntrospectionHits.Load() - before; n != 2 {
			t.Fatalf("after negative_cache_ttl: %d calls, want 2", n)
		}
	})

	t.Run("an active result expires at the token's exp", func(t *testing.T) {
		tok := f.opaque(map[string]any{"exp": f.clk.Unix() + 10})
		before := f.idp.IntrospectionHits.Load()
		allowed(t, check(t, c, req{headers: bearer(tok)}))
		f.clk.Add(9 * time.Second)
		allowed(t, check(t, c, req{headers: bearer(tok)}))
		if n := f.idp.IntrospectionHits.Load() - before; n != 1 {
			t.Fatalf("within exp: %d calls, want 1", n)
		}
		f.clk.Add(time.Second)
		denied(t, check(t, c, req{headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "expired")
		if n := f.idp.IntrospectionHits.Load() - before; n != 2 {
			t.Fatalf("at exp the cached answer must be gone: %d calls, want 2", n)
		}
	})
}

func TestUserinfoEnrichment(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	c, _ := f.start(t)
	f.idp.SetUserinfo("user-1", map[string]any{"email": "alice@example.com", "email_verified": true})

	tok := f.jwt(t)
	set, _ := allowed(t, check(t, c, req{path: "/profile", headers: bearer(tok)}))
	if set["x-user-email"] != "alice@example.com" {
		t.Fatalf("x-user-email = %q, want the userinfo email", set["x-user-email"])
	}
	allowed(t, check(t, c, req{path: "/profile", headers: bearer(tok)}))
	if n := f.idp.UserinfoHits.Load(); n != 1 {
		t.Fatalf("two checks made %d userinfo calls, want 1 (cached)", n)
	}
	// Opaque tokens are enriched too.
	set, _ = allowed(t, check(t, c, req{path: "/profile", headers: bearer(f.opaque(nil))}))
	if set["x-user-email"] != "alice@example.com" {
		t.Fatalf("opaque: x-user-email = %q", set["x-user-email"])
	}

	// A userinfo claim rule: email_verified must be true.
	f.idp.SetUserinfo("user-2", map[string]any{"email": "bob@example.com", "email_verified": false})
	bob := f.idp.Claims(aud)
	bob["sub"] = "user-2"
	denied(t, check(t, c, req{path: "/profile", headers: bearer(idptest.Mint(t, f.key, bob))}),
		codes.PermissionDenied, typev3.StatusCode_Forbidden, "insufficient_scope")

	// A token the userinfo endpoint refuses is denied.
	revoked := f.jwt(t)
	f.idp.Revoke(revoked)
	denied(t, check(t, c, req{path: "/profile", headers: bearer(revoked)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)

	// A response about another subject is not used.
	f.idp.ForceReply(200, []byte(`{"sub":"someone-else","email":"x@example.com","email_verified":true}`))
	denied(t, check(t, c, req{path: "/profile", headers: bearer(f.jwt(t))}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "subject")
	// A provider failure is a 503.
	f.idp.ForceReply(502, nil)
	denied(t, check(t, c, req{path: "/profile", headers: bearer(f.jwt(t))}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
}

func TestIntrospectionFromDiscovery(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	is := &f.cfg.Issuers[0]
	is.JWKSURI, is.Discovery = "", true
	is.Introspection.Endpoint, is.Userinfo.Endpoint = "", ""
	c, _ := f.start(t)
	f.idp.SetUserinfo("user-1", map[string]any{"email": "alice@example.com", "email_verified": true})
	set, _ := allowed(t, check(t, c, req{path: "/profile", headers: bearer(f.opaque(nil))}))
	if set["x-user-email"] != "alice@example.com" || f.idp.IntrospectionHits.Load() != 1 {
		t.Fatalf("endpoints from discovery: headers %v, introspection calls %d", set, f.idp.IntrospectionHits.Load())
	}
}

func TestIntrospectionConfigValidation(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	cfg := *f.cfg
	cfg.Issuers = []verify.IssuerConfig{f.cfg.Issuers[0]}
	cfg.Issuers[0].Introspection = &verify.IntrospectionConfig{AuthMethod: "private_key_jwt", Endpoint: "http://idp.example/introspect"}
	cfg.Issuers[0].Userinfo = nil
	got := strings.Join(cfg.Validate(), "\n")
	for _, want := range []string{
		"issuers[0].introspection.client_id: required",
		"issuers[0].introspection.client_secret_file: required",
		"issuers[0].introspection.auth_method",
		"issuers[0].introspection.endpoint", // plain http to a non-loopback host
		"routes[1].userinfo: issuer \"main\" has no userinfo block",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("validation lacks %q:\n%s", want, got)
		}
	}
	cfg.Issuers[0].Introspection = nil
	if got := strings.Join(cfg.Validate(), "\n"); !strings.Contains(got, `routes[0].introspect: always, but issuer "main" has no introspection block`) {
		t.Errorf("introspect: always without an endpoint passed validation:\n%s", got)
	}
}

// TestProviderOutageIsNotHammered: failures are never cached, so without a
// breaker every check of an uncached token would call a provider that is
// down. After 5 consecutive failures calls pause for a second.
func TestProviderOutageIsNotHammered(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	c, logs := f.start(t)
	f.idp.SetDown(true)
	for range 50 {
		denied(t, check(t, c, req{headers: bearer(f.opaque(nil))}), codes.Unavailable, typev3.StatusCode_ServiceUnavailable)
	}
	if n := f.idp.IntrospectionHits.Load(); n != 5 {
		t.Fatalf("50 checks against a provider that is down made %d calls, want 5 (then a pause)", n)
	}
	if !strings.Contains(logs.String(), "calls paused") {
		t.Errorf("the log does not say calls are paused:\n%s", logs)
	}
	f.idp.SetDown(false)
	waitUntil(t, func() bool {
		return check(t, c, req{headers: bearer(f.opaque(nil))}).GetStatus().GetCode() == 0
	})
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("not within 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestIntrospectionFloodIsBounded: made-up opaque tokens are all different,
// so neither the cache nor the breaker (the provider answers fine) stops
// them; max_calls_per_second does.
func TestIntrospectionFloodIsBounded(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	f.cfg.Issuers[0].Introspection.MaxCallsPerSecond = 20
	c, logs := f.start(t)
	var unavailable int
	start := time.Now()
	for i := range 100 {
		resp := check(t, c, req{headers: bearer(fmt.Sprintf("made-up-%d", i))})
		switch codes.Code(resp.GetStatus().GetCode()) {
		case codes.ResourceExhausted:
			// Over budget is a deny for the caller (429), never
			// "undecidable": failure_mode_allow must not let it through.
			denied(t, resp, codes.ResourceExhausted, typev3.StatusCode_TooManyRequests)
			if deniedHeader(resp, "retry-after") == "" {
				t.Fatal("a 429 without Retry-After")
			}
			unavailable++
		case codes.OK:
			t.Fatal("a made-up token was allowed")
		case codes.Unavailable:
			t.Fatal("a caller over budget was answered undecidable (503)")
		}
	}
	// The burst of 20, plus 20 a second for as long as the loop took.
	bound := int64(20 + 20*time.Since(start).Seconds() + 1)
	if n := f.idp.IntrospectionHits.Load(); n > bound || int64(unavailable) < 100-bound {
		t.Fatalf("100 made-up tokens: %d provider calls (bound %d), %d answered 429", n, bound, unavailable)
	}
	// Counted, not logged one by one.
	if strings.Contains(logs.String(), "max_calls") || strings.Contains(logs.String(), "throttled") {
		t.Errorf("calls over the budget were logged one by one:\n%s", logs)
	}
}

// TestIntrospectionFloodSharedFairly: while one client floods made-up
// opaque tokens, fresh valid tokens from other clients are still
// introspected (each client has its share; the flooder only gets the
// surplus), by Envoy's source address or by a configured header.
func TestIntrospectionFloodSharedFairly(t *testing.T) {
	for _, header := range []string{"", "x-forwarded-for"} {
		t.Run("by "+map[string]string{"": "source address", "x-forwarded-for": header}[header], func(t *testing.T) {
			f := newIntroFixture(t, "client_secret_basic")
			f.cfg.Issuers[0].Introspection.MaxCallsPerSecond = 100 // 10 per client
			f.cfg.ClientAddressHeader = header
			c, _ := f.start(t)
			from := func(addr string, r req) req {
				if header == "" {
					r.source = addr
				} else {
					r.source = "10.9.9.9" // the proxy in front
					r.headers[header] = "203.0.113.7, " + addr
				}
				return r
			}
			stop := make(chan struct{})
			var flood sync.WaitGroup
			var floodUnavailable atomic.Int64
			for w := range 4 {
				flood.Add(1)
				go func() {
					defer flood.Done()
					for i := 0; ; i++ {
						select {
						case <-stop:
							return
						default:
						}
						resp := check(t, c, from("198.51.100.66", req{headers: bearer(fmt.Sprintf("made-up-%d-%d", w, i))}))
						if codes.Code(resp.GetStatus().GetCode()) == codes.ResourceExhausted {
							floodUnavailable.Add(1)
						}
					}
				}()
			}
			waitUntil(t, func() bool { return floodUnavailable.Load() > 50 }) // the flood is over its share
			refused := 0
			for i := range 30 {
				resp := check(t, c, from(fmt.Sprintf("192.0.2.%d", i+1), req{headers: bearer(f.opaque(nil))}))
				if codes.Code(resp.GetStatus().GetCode()) != codes.OK {
					refused++
				}
			}
			close(stop)
			flood.Wait()
			if refused > 0 {
				t.Fatalf("%d of 30 fresh valid tokens from other clients refused during the flood", refused)
			}
		})
	}
}

// TestUserinfoClaimsCannotBeForged: "userinfo.<claim>" reads only what the
// userinfo endpoint said. A token carrying a "userinfo" object, or a
// top-level "userinfo.email" claim, is never consulted for it: not for claim
// headers, not for claim rules, on routes that fetch userinfo or not.
func TestUserinfoClaimsCannotBeForged(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	f.cfg.Routes = append([]authz.RouteConfig{{Name: "forge", Match: authz.Match{PathPrefix: "/forge"},
		Claims: map[string]any{"userinfo.email_verified": true}}}, f.cfg.Routes...)
	c, _ := f.start(t)
	f.idp.SetUserinfo("user-1", map[string]any{"email": "real@example.com", "email_verified": false})
	m := f.idp.Claims(aud)
	m["userinfo"] = map[string]any{"email": "forged@example.com", "email_verified": true}
	m["userinfo.email"] = "forged-too@example.com"
	m["userinfo.email_verified"] = true
	tok := idptest.Mint(t, f.key, m)

	// A route without userinfo: the header is not sent, the rule not met.
	set, removed := allowed(t, check(t, c, req{path: "/orders/1", headers: bearer(tok)}))
	if _, sent := set["x-user-email"]; sent || !contains(removed, "x-user-email") {
		t.Errorf("x-user-email from the token: set %v", set)
	}
	denied(t, check(t, c, req{path: "/forge", headers: bearer(tok)}), codes.PermissionDenied, typev3.StatusCode_Forbidden, "userinfo.email_verified")
	// A route with userinfo: the endpoint's answer, not the token's.
	denied(t, check(t, c, req{path: "/profile", headers: bearer(tok)}), codes.PermissionDenied, typev3.StatusCode_Forbidden, "userinfo.email_verified")
	f.idp.SetUserinfo("user-1", map[string]any{"email": "real@example.com", "email_verified": true})
	m["jti"] = "second" // a new token, so no cached userinfo answer
	set, _ = allowed(t, check(t, c, req{path: "/profile", headers: bearer(idptest.Mint(t, f.key, m))}))
	if set["x-user-email"] != "real@example.com" {
		t.Errorf("x-user-email = %q, want the userinfo endpoint's", set["x-user-email"])
	}
}
