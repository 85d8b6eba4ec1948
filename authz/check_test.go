package authz_test

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

const aud = "orders-api"

var hmacSecret = []byte("0123456789abcdef0123456789abcdef") // 32 bytes: enough for HS256

func dur(d time.Duration) *time.Duration { return &d }

// mainFixture: one IdP with a key per asymmetric family plus an HMAC secret,
// and the routes of the README's example.
func mainFixture(t *testing.T) (*idptest.IdP, map[string]*idptest.Key, *authz.Config) {
	t.Helper()
	keys := map[string]*idptest.Key{}
	var list []*idptest.Key
	for _, alg := range []string{"RS256", "PS256", "ES256", "ES384", "EdDSA"} {
		k := idptest.NewKey(t, "k-"+alg, alg)
		keys[alg] = k
		list = append(list, k)
	}
	idp := idptest.New(t, list...)
	secretFile := filepath.Join(t.TempDir(), "hmac")
	if err := os.WriteFile(secretFile, append(hmacSecret, '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{
			Name: "main", Issuer: idp.URL(), Audiences: []string{aud, "other-api"},
			JWKSURI: idp.JWKSURL(), HMACSecretFile: secretFile,
			Algorithms:     []string{"RS256", "PS256", "ES256", "ES384", "EdDSA", "HS256"},
			Leeway:         dur(30 * time.Second),
			RequiredClaims: []string{"sub"},
		}},
		Routes: []authz.RouteConfig{
			{Name: "public", Match: authz.Match{PathPrefix: "/public"}, Anonymous: true},
			{Name: "admin", Match: authz.Match{PathPrefix: "/admin"}, Issuers: []string{"main"}, Scopes: []string{"admin"},
				Claims: map[string]any{"email_verified": true, "stt": []any{1, 2}}},
			{Name: "write", Match: authz.Match{PathPrefix: "/orders", Methods: []string{"POST"}}, Scopes: []string{"orders:write"}},
			{Name: "default", Match: authz.Match{PathPrefix: "/"}, Issuers: []string{"main"}},
		},
		Headers:              authz.ClaimHeaders(map[string]string{"x-user-id": "sub", "x-user-email": "email", "x-user-scopes": "scope", "x-auth-groups": "groups", "x-tenant": "org.tenant"}),
		ReservedHeaderPrefix: "x-auth-",
	}
	return idp, keys, cfg
}

func TestAlgorithmFamiliesAllow(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	c := start(t, cfg, nil)
	for _, alg := range []string{"RS256", "PS256", "ES256", "ES384", "EdDSA"} {
		t.Run(alg, func(t *testing.T) {
			set, _ := allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, keys[alg], idp.Claims(aud)))}))
			if set["x-user-id"] != "user-1" {
				t.Fatalf("x-user-id = %q", set["x-user-id"])
			}
		})
	}
	t.Run("HS256", func(t *testing.T) {
		tok := idptest.Sign(t, "HS256", hmacSecret, map[string]any{"alg": "HS256", "typ": "JWT"}, idp.Claims(aud))
		allowed(t, check(t, c, req{headers: bearer(tok)}))
	})
	t.Run("HS256 wrong secret", func(t *testing.T) {
		tok := idptest.Sign(t, "HS256", []byte("another-secret-another-secret-xx"), map[string]any{"alg": "HS256"}, idp.Claims(aud))
		denied(t, check(t, c, req{headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_token"`)
	})
}

func TestTokenChecks(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	clk := newClock()
	c := start(t, cfg, clk)
	rs := keys["RS256"]
	now := clk.Unix()
	claims := func(mod func(map[string]any)) map[string]any {
		m := idp.Claims(aud)
		m["iat"], m["exp"] = now, now+600
		mod(m)
		return m
	}
	mint := func(mod func(map[string]any)) string { return idptest.Mint(t, rs, claims(mod)) }
	invalid := func(desc string) []string {
		return []string{`realm="tokenauthz"`, `error="invalid_token"`, `error_description="` + desc}
	}
	cases := []struct {
		name  string
		token string
		allow bool
		desc  string // expected error_description prefix on deny
	}{
		{"valid", mint(func(map[string]any) {}), true, ""},
		{"wrong issuer", mint(func(m map[string]any) { m["iss"] = "https://evil.example" }), false, "token issuer is not trusted"},
		{"issuer with trailing slash", mint(func(m map[string]any) { m["iss"] = idp.URL() + "/" }), false, "token issuer is not trusted"},
		{"issuer upper case", mint(func(m map[string]any) { m["iss"] = strings.ToUpper(idp.URL()) }), false, "token issuer is not trusted"},
		{"wrong audience string", mint(func(m map[string]any) { m["aud"] = "billing-api" }), false, "token audience"},
		{"wrong audience array", mint(func(m map[string]any) { m["aud"] = []any{"billing-api", "x"} }), false, "token audience"},
		{"audience array with ours", mint(func(m map[string]any) { m["aud"] = []any{"billing-api", aud} }), true, ""},
		{"audience wrong type", mint(func(m map[string]any) { m["aud"] = 7 }), false, "token audience"},
		{"no audience", mint(func(m map[string]any) { delete(m, "aud") }), false, "token audience"},
		{"expired", mint(func(m map[string]any) { m["exp"] = now - 3600 }), false, "token expired"},
		{"expired within leeway", mint(func(m map[string]any) { m["exp"] = now - 29 }), true, ""},
		{"expired at leeway edge", mint(func(m map[string]any) { m["exp"] = now - 30 }), false, "token expired"},
		{"no exp", mint(func(m map[string]any) { delete(m, "exp") }), false, "token has no exp"},
		{"exp as string", mint(func(m map[string]any) { m["exp"] = "9999999999" }), false, "exp is not a number"},
		{"exp negative", mint(func(m map[string]any) { m["exp"] = -1 }), false, "exp is out of range"},
		{"not yet valid", mint(func(m map[string]any) { m["nbf"] = now + 3600 }), false, "token is not valid yet"},
		{"nbf within leeway", mint(func(m map[string]any) { m["nbf"] = now + 30 }), true, ""},
		{"nbf past leeway", mint(func(m map[string]any) { m["nbf"] = now + 31 }), false, "token is not valid yet"},
		{"iat in future", mint(func(m map[string]any) { m["iat"] = now + 3600 }), false, "token is issued in the future"},
		{"missing required claim", mint(func(m map[string]any) { delete(m, "sub") }), false, "token lacks required claim sub"},
		{"garbage", "not-a-token", false, "token is not a JWT"},
		{"garbage three segments", "a.b.c", false, "token header"},
		{"empty signature", strings.TrimRightFunc(mint(func(map[string]any) {}), func(r rune) bool { return r != '.' }), false, "token has no signature"},
		{"extra segment", mint(func(map[string]any) {}) + ".x", false, "token is not a JWT"},
		{"tampered payload", tamper(mint(func(map[string]any) {}), idptest.Mint(t, rs, claims(func(m map[string]any) { m["sub"] = "admin" }))), false, "token signature is invalid"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp := check(t, c, req{headers: bearer(tc.token)})
			if tc.allow {
				allowed(t, resp)
				return
			}
			denied(t, resp, codes.Unauthenticated, typev3.StatusCode_Unauthorized, invalid(tc.desc)...)
		})
	}
}

// tamper puts the payload of b under the header and signature of a.
func tamper(a, b string) string {
	pa := strings.Split(a, ".")
	pb := strings.Split(b, ".")
	return pa[0] + "." + pb[1] + "." + pa[2]
}

func TestHostileHeaders(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	c := start(t, cfg, nil)
	rs := keys["RS256"]
	claims := idp.Claims(aud)
	attacker := idptest.NewKey(t, "k-RS256", "RS256") // same kid as the real key
	cases := []struct {
		name, token, desc string
	}{
		{"alg none", noneToken(claims, "none"), "unsigned tokens"},
		{"alg none with a signature", noneToken(claims, "none") + "c2ln", "unsigned tokens"},
		{"alg None", noneToken(claims, "None"), "unsigned tokens"},
		{"alg NONE", noneToken(claims, "NONE"), "unsigned tokens"},
		{"alg not allowed", idptest.Sign(t, "RS512", rs.Private, map[string]any{"alg": "RS512", "kid": rs.Kid}, claims), "token algorithm RS512 is not allowed"},
		{"RS/HS confusion", idptest.Sign(t, "HS256", publicDER(t, rs), map[string]any{"alg": "HS256", "kid": rs.Kid}, claims), "token signature is invalid"},
		{"alg does not fit key", idptest.Sign(t, "ES256", keys["ES256"].Private, map[string]any{"alg": "ES256", "kid": rs.Kid}, claims), "no key of the issuer fits"},
		{"PS token on an RS256-only key", idptest.Sign(t, "PS256", rs.Private, map[string]any{"alg": "PS256", "kid": rs.Kid}, claims), "no key of the issuer fits"},
		{"embedded jwk", idptest.Sign(t, "RS256", attacker.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "jwk": attacker.JWK(t)}, claims), "(jwk)"},
		{"jku", idptest.Sign(t, "RS256", attacker.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "jku": "https://evil.example/jwks"}, claims), "(jku)"},
		{"x5u", idptest.Sign(t, "RS256", attacker.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "x5u": "https://evil.example/cert"}, claims), "(x5u)"},
		{"attacker key same kid", idptest.Sign(t, "RS256", attacker.Private, map[string]any{"alg": "RS256", "kid": rs.Kid}, claims), "token signature is invalid"},
		{"crit", idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "crit": []string{"exp"}, "exp": 1}, claims), "critical header"},
		{"nested JWT", idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "cty": "JWT"}, claims), "nested tokens"},
		{"JWE", "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.a.b.c.d", "token is not a JWT"},
		{"duplicate claim", idptest.SignRaw(t, "RS256", rs.Private, []byte(`{"alg":"RS256","kid":"k-RS256"}`),
			[]byte(strings.Replace(string(mustJSON(claims)), `{`, `{"sub":"admin",`, 1))), "duplicate key"},
		{"padded base64", padded(idptest.Mint(t, rs, claims)), "not base64url"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			denied(t, check(t, c, req{headers: bearer(tc.token)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized,
				`error="invalid_token"`, tc.desc)
		})
	}
}

func TestRequiredTokenType(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.Issuers[0].TokenType = "at+jwt"
	c := start(t, cfg, nil)
	rs := keys["RS256"]
	at := idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "typ": "at+jwt"}, idp.Claims(aud))
	allowed(t, check(t, c, req{headers: bearer(at)}))
	at2 := idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "typ": "application/AT+JWT"}, idp.Claims(aud))
	allowed(t, check(t, c, req{headers: bearer(at2)}))
	id := idptest.Mint(t, rs, idp.Claims(aud)) // typ JWT: an ID token
	denied(t, check(t, c, req{headers: bearer(id)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "token type must be at+jwt")
}

func TestRouteRequirements(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	c := start(t, cfg, nil)
	rs := keys["RS256"]
	tok := func(mod func(map[string]any)) string {
		m := idp.Claims(aud)
		m["scope"], m["email_verified"], m["stt"] = "read admin", true, 1
		mod(m)
		return idptest.Mint(t, rs, m)
	}
	admin := req{path: "/admin/users"}
	with := func(r req, token string) req { r.headers = bearer(token); return r }

	allowed(t, check(t, c, with(admin, tok(func(map[string]any) {}))))
	allowed(t, check(t, c, with(admin, tok(func(m map[string]any) { m["stt"] = 2.0 }))))
	allowed(t, check(t, c, with(admin, tok(func(m map[string]any) { delete(m, "scope"); m["scp"] = []any{"admin"} }))))

	forbidden := func(token, desc string, scope bool) {
		t.Helper()
		want := []string{`error="insufficient_scope"`, desc}
		if scope {
			want = append(want, `scope="admin"`)
		}
		denied(t, check(t, c, with(admin, token)), codes.PermissionDenied, typev3.StatusCode_Forbidden, want...)
	}
	forbidden(tok(func(m map[string]any) { m["scope"] = "read" }), "lacks a required scope", true)
	forbidden(tok(func(m map[string]any) { m["scope"] = "administrator" }), "lacks a required scope", true)
	forbidden(tok(func(m map[string]any) { m["email_verified"] = false }), "claim email_verified", false)
	forbidden(tok(func(m map[string]any) { m["email_verified"] = "true" }), "claim email_verified", false)
	forbidden(tok(func(m map[string]any) { delete(m, "email_verified") }), "claim email_verified", false)
	forbidden(tok(func(m map[string]any) { m["stt"] = 3 }), "claim stt", false)
	forbidden(tok(func(m map[string]any) { m["stt"] = "1" }), "claim stt", false)

	// /administrator is not under the /admin prefix: it falls to default.
	allowed(t, check(t, c, req{path: "/administrator", headers: bearer(tok(func(m map[string]any) { m["scope"] = "" }))}))
	// Method matching: POST /orders needs orders:write, GET does not.
	plain := tok(func(map[string]any) {})
	denied(t, check(t, c, req{method: "POST", path: "/orders", headers: bearer(plain)}), codes.PermissionDenied, typev3.StatusCode_Forbidden, `scope="orders:write"`)
	allowed(t, check(t, c, req{method: "GET", path: "/orders?x=1", headers: bearer(plain)}))
}

func TestMissingAndMalformedCredentials(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	c := start(t, cfg, nil)
	good := idptest.Mint(t, keys["ES256"], idp.Claims(aud))

	resp := check(t, c, req{})
	denied(t, resp, codes.Unauthenticated, typev3.StatusCode_Unauthorized, `Bearer realm="tokenauthz"`)
	if strings.Contains(wwwAuth(resp), "error=") {
		t.Errorf("missing token must not carry an error attribute (RFC 6750 §3.1): %q", wwwAuth(resp))
	}
	basic := check(t, c, req{headers: map[string]string{"authorization": "Basic dXNlcjpwYXNz"}})
	denied(t, basic, codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	if strings.Contains(wwwAuth(basic), "error=") {
		t.Errorf("another scheme counts as no bearer token: %q", wwwAuth(basic))
	}

	for _, scheme := range []string{"bearer ", "BEARER ", "Bearer   "} {
		allowed(t, check(t, c, req{headers: map[string]string{"authorization": scheme + good}}))
	}
	for name, h := range map[string]string{
		"empty":             "Bearer ",
		"space inside":      "Bearer " + good[:20] + " " + good[20:],
		"control character": "Bearer " + good + "\x01",
		"too large":         "Bearer " + strings.Repeat("a", 9000),
	} {
		t.Run(name, func(t *testing.T) {
			denied(t, check(t, c, req{headers: map[string]string{"authorization": h}}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_token"`)
		})
	}
	// Envoy joins two Authorization headers with a comma.
	denied(t, check(t, c, req{headers: map[string]string{"authorization": "Bearer " + good + ",Bearer " + good}}),
		codes.InvalidArgument, typev3.StatusCode_BadRequest, `error="invalid_request"`)
	denied(t, check(t, c, req{path: "/orders?access_token=" + good, headers: bearer(good)}),
		codes.InvalidArgument, typev3.StatusCode_BadRequest, "more than one credential")
	denied(t, check(t, c, req{path: "/orders?access_token=" + good}),
		codes.InvalidArgument, typev3.StatusCode_BadRequest, "query string")
	// encode_raw_headers: the same rules over the header list.
	allowed(t, check(t, c, req{raw: rawHeaders("authorization", "Bearer "+good)}))
	denied(t, check(t, c, req{raw: rawHeaders("authorization", "Bearer "+good, "authorization", "Bearer "+good)}),
		codes.InvalidArgument, typev3.StatusCode_BadRequest)
	// Paths that an upstream could resolve differently from a prefix match.
	for _, p := range []string{"/public/../admin", "/public/%2e%2e/admin", "/public/..%2fadmin", `/public\..\admin`} {
		denied(t, check(t, c, req{path: p, headers: bearer(good)}), codes.InvalidArgument, typev3.StatusCode_BadRequest)
	}
}

func TestClaimHeadersCannotBeSpoofed(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	c := start(t, cfg, nil)
	m := idp.Claims(aud)
	m["groups"] = []any{"eng", "ops"}
	m["org"] = map[string]any{"tenant": "acme"}
	tok := idptest.Mint(t, keys["RS256"], m) // no email, no scope
	spoof := map[string]string{
		"authorization": "Bearer " + tok,
		"x-user-id":     "admin", "x-user-email": "ceo@example.com", "x-auth-role": "root", "X-Auth-Other": "1",
	}
	set, removed := allowed(t, check(t, c, req{headers: spoof}))
	if set["x-user-id"] != "user-1" || set["x-auth-groups"] != "eng,ops" || set["x-tenant"] != "acme" {
		t.Errorf("claim headers: %v", set)
	}
	for _, h := range []string{"x-user-email", "x-user-scopes", "x-auth-role", "x-auth-other"} {
		if !contains(removed, h) {
			t.Errorf("%s not in headers_to_remove %v", h, removed)
		}
	}
	if contains(removed, "x-auth-groups") || contains(removed, "x-user-id") {
		t.Errorf("a header that is set must not also be removed: %v", removed)
	}
	// Anonymous routes strip them too and set none.
	set, removed = allowed(t, check(t, c, req{path: "/public/x", headers: spoof}))
	if len(set) != 0 {
		t.Errorf("anonymous route set headers %v", set)
	}
	for _, h := range []string{"x-user-id", "x-user-email", "x-auth-role", "x-auth-groups"} {
		if !contains(removed, h) {
			t.Errorf("anonymous: %s not removed (%v)", h, removed)
		}
	}
}

func TestDynamicMetadata(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.DynamicMetadata = []string{"route", "issuer", "sub", "scope"}
	c := start(t, cfg, nil)
	m := idp.Claims(aud)
	m["scope"] = "read write"
	resp := check(t, c, req{headers: bearer(idptest.Mint(t, keys["RS256"], m))})
	allowed(t, resp)
	f := resp.GetDynamicMetadata().GetFields()
	if f["route"].GetStringValue() != "default" || f["issuer"].GetStringValue() != "main" ||
		f["sub"].GetStringValue() != "user-1" || f["scope"].GetStringValue() != "read write" {
		t.Errorf("dynamic metadata: %v", resp.GetDynamicMetadata())
	}
	// Off by default.
	cfg.DynamicMetadata = nil
	plain := start(t, cfg, nil)
	if md := check(t, plain, req{headers: bearer(idptest.Mint(t, keys["RS256"], m))}).GetDynamicMetadata(); md != nil {
		t.Errorf("dynamic metadata without dynamic_metadata: %v", md)
	}
}

func TestRouteSelection(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.Routes = append([]authz.RouteConfig{
		{Name: "host-only", Match: authz.Match{Host: "*.internal.example"}, Anonymous: true},
	}, cfg.Routes...)
	c := start(t, cfg, nil)
	noToken := req{path: "/orders"}

	denied(t, check(t, c, noToken), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	allowed(t, check(t, c, req{path: "/public/doc"}))
	allowed(t, check(t, c, req{path: "/public"}))
	allowed(t, check(t, c, req{path: "/orders", host: "svc.internal.example:8443"}))
	denied(t, check(t, c, req{path: "/orders", host: "internal.example"}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	// context_extensions beats path matching, both ways.
	allowed(t, check(t, c, req{path: "/orders", ext: map[string]string{"route": "public"}}))
	admin := req{path: "/public/doc", ext: map[string]string{"route": "admin"}, headers: bearer(idptest.Mint(t, keys["RS256"], idp.Claims(aud)))}
	denied(t, check(t, c, admin), codes.PermissionDenied, typev3.StatusCode_Forbidden, `scope="admin"`)
	// An unknown route name, and a request matching no route, are denied.
	denied(t, check(t, c, req{ext: map[string]string{"route": "nope"}}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	cfg.Routes = cfg.Routes[:3]
	c2 := start(t, cfg, nil)
	denied(t, check(t, c2, req{path: "/elsewhere"}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
}

func TestTwoIssuersSideBySide(t *testing.T) {
	k1, k2 := idptest.NewKey(t, "a1", "RS256"), idptest.NewKey(t, "b1", "ES256")
	idp1, idp2 := idptest.New(t, k1), idptest.New(t, k2)
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{
			{Name: "corp", Issuer: idp1.URL(), Audiences: []string{aud}, JWKSURI: idp1.JWKSURL(), Algorithms: []string{"RS256"}},
			{Name: "partners", Issuer: idp2.URL(), Audiences: []string{aud}, Discovery: true, Algorithms: []string{"ES256"}},
		},
		Routes: []authz.RouteConfig{
			{Name: "internal", Match: authz.Match{PathPrefix: "/internal"}, Issuers: []string{"corp"}},
			{Name: "default", Match: authz.Match{PathPrefix: "/"}},
		},
	}
	c := start(t, cfg, nil)
	t1 := idptest.Mint(t, k1, idp1.Claims(aud))
	t2 := idptest.Mint(t, k2, idp2.Claims(aud))
	allowed(t, check(t, c, req{headers: bearer(t1)}))
	allowed(t, check(t, c, req{headers: bearer(t2)}))
	allowed(t, check(t, c, req{path: "/internal/x", headers: bearer(t1)}))
	denied(t, check(t, c, req{path: "/internal/x", headers: bearer(t2)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized,
		"not accepted for this route")
	// The same once t2 is in the verified-token cache (kept from its second
	// verification): a hit is still checked against the route's issuers.
	allowed(t, check(t, c, req{headers: bearer(t2)}))
	denied(t, check(t, c, req{path: "/internal/x", headers: bearer(t2)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized,
		"not accepted for this route")
	// A partner key cannot sign a corp token: iss picks the issuer, and its keys only.
	forged := idptest.Mint(t, &idptest.Key{Kid: "a1", Alg: "ES256", Private: k2.Private}, idp1.Claims(aud))
	denied(t, check(t, c, req{headers: bearer(forged)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	if idp2.DiscoveryHits.Load() != 1 || idp2.JWKSHits.Load() != 1 {
		t.Errorf("discovery issuer: %d discovery and %d JWKS requests, want 1 and 1", idp2.DiscoveryHits.Load(), idp2.JWKSHits.Load())
	}
}

// panicky is a verifier whose bug must not become an allow.
type panicky struct{}

func (panicky) Verify(context.Context, string, verify.Policy) (*verify.Result, error) { panic("bug") }

func TestPanicIsDenied(t *testing.T) {
	_, keys, cfg := mainFixture(t)
	c := startWith(t, cfg, panicky{})
	tok := idptest.Mint(t, keys["RS256"], map[string]any{"iss": "x"})
	denied(t, check(t, c, req{headers: bearer(tok)}), codes.Internal, typev3.StatusCode_InternalServerError)
	// The server is still serving.
	allowed(t, check(t, c, req{path: "/public"}))
}

func publicDER(t *testing.T, k *idptest.Key) []byte {
	b, err := x509.MarshalPKIXPublicKey(k.Private.Public())
	if err != nil {
		t.Fatal(err)
	}
	return b
}
