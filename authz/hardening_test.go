package authz_test

// The security review's classes (issue 20), each through the real Check
// server, each attack next to the legitimate request that must still pass.

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// Class 1: XFCC is parsed by Envoy's grammar; what does not parse is a 401,
// and the client's elements never stand in for the proxy's.
func TestXFCCGrammar(t *testing.T) {
	idp, key, cfg := dpopFixture(t, false)
	cfg.ClientCert = authz.ClientCertConfig{From: "header"}
	c := start(t, cfg, nil)
	victimCert, victimX5T, victim := testCert(t, "victim")
	_, _, attacker := testCert(t, "attacker")
	claims := idp.Claims(aud)
	claims["cnf"] = map[string]any{"x5t#S256": victimX5T}
	tok := idptest.Mint(t, key, claims)
	with := func(xfcc ...string) req {
		r := req{path: "/orders/1", raw: rawHeaders(":method", "GET", ":authority", "api.example.com", ":path", "/orders/1",
			"authorization", "Bearer "+tok)}
		for _, x := range xfcc {
			r.raw = append(r.raw, &corev3.HeaderValue{Key: "x-forwarded-client-cert", RawValue: []byte(x)})
		}
		return r
	}
	joined := func(xfcc string) req {
		return req{path: "/orders/1", headers: map[string]string{"authorization": "Bearer " + tok, "x-forwarded-client-cert": xfcc}}
	}
	// The proxy appends the attacker's own certificate; the client tries
	// to make the victim's Hash (which it sent) read as the last element.
	proxy := "By=spiffe://cluster.local/ns/a/sa/b;Hash=" + attacker
	for _, clientPart := range []string{
		`Hash=` + victim + `;Subject="`,         // unclosed quote swallows the proxy's element
		`Hash=` + victim + `;Subject="x\"`,      // an escaped quote keeps the string open
		`Subject="\\",Hash=` + victim + `;By="`, // escapes that end where a naive split thinks
		`Hash=` + victim + `;Subject="a\z"`,     // an escape Envoy never writes
		`Hash=` + victim + `;Subject=a"b`,       // a quote inside an unquoted value
		`Hash=` + victim + `;Subject=CN=x`,      // "=" unquoted
		`Hash=` + victim + `;Hash=` + victim,    // a key twice in one element
		`Hash=` + victim + `;;`,                 // an empty pair
		`Hash=` + victim + `;Subject`,           // a key without a value
		`Hash=` + victim + `\`,                  // a raw backslash
		"Hash=" + victim + ";Subject=\"a\x01\"", // a control character
	} {
		t.Run(clientPart, func(t *testing.T) {
			denied(t, check(t, c, joined(clientPart+","+proxy)), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
			denied(t, check(t, c, with(clientPart, proxy)), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
		})
	}
	// Two header lines are one list, raw or joined: the last element wins.
	denied(t, check(t, c, with("Hash="+victim, proxy)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "another client certificate")
	denied(t, check(t, c, joined("Hash="+victim+","+proxy)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "another client certificate")
	// Cert and Hash of the last element must agree.
	denied(t, check(t, c, joined(`Hash=`+attacker+`;Cert="`+victimCert+`"`)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "disagree")

	// The legitimate twins: the victim's own requests, as Envoy writes them.
	full := `By=spiffe://cluster.local/ns/a/sa/b;Hash=` + victim + `;Cert="` + victimCert + `";Subject="CN=victim,O=Org \"Q\"";URI=spiffe://x;DNS=a.example;DNS=b.example`
	allowed(t, check(t, c, joined(full)))
	allowed(t, check(t, c, with(full)))
	allowed(t, check(t, c, joined(`By=spiffe://edge;Hash=`+attacker+`;Subject="CN=edge,O=x", `+full)))
	allowed(t, check(t, c, with(`By=spiffe://edge;Hash=`+attacker, full)))
}

// Class 1: the client address header reads the nearest proxy's entry,
// whichever form Envoy sent the header in; an entry that is no address is
// a 400, never a bucket or a request.source of the client's choosing.
func TestClientAddressHeader(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.ClientAddressHeader = "x-forwarded-for"
	cfg.Routes = append([]authz.RouteConfig{{Name: "office", Match: authz.Match{PathPrefix: "/office"},
		When: []authz.WhenRule{{CEL: "request.source == '192.0.2.10'"}}}}, cfg.Routes...)
	c := start(t, cfg, nil)
	tok := idptest.Mint(t, keys["RS256"], idp.Claims(aud))
	raw := func(xff ...string) req {
		r := req{path: "/office", raw: rawHeaders(":method", "GET", ":authority", "api.example.com", ":path", "/office", "authorization", "Bearer "+tok)}
		for _, v := range xff {
			r.raw = append(r.raw, &corev3.HeaderValue{Key: "x-forwarded-for", RawValue: []byte(v)})
		}
		return r
	}
	joined := func(xff string) req {
		return req{path: "/office", headers: map[string]string{"authorization": "Bearer " + tok, "x-forwarded-for": xff}}
	}
	// The nearest proxy appended 192.0.2.10: allowed in every form.
	allowed(t, check(t, c, joined("192.0.2.10")))
	allowed(t, check(t, c, joined("203.0.113.9, 192.0.2.10")))
	allowed(t, check(t, c, raw("203.0.113.9", "192.0.2.10")))
	allowed(t, check(t, c, raw("192.0.2.10:51000")))
	allowed(t, check(t, c, raw("::ffff:192.0.2.10")))
	// The client's own entries are never the address, raw or joined.
	for _, r := range []req{joined("192.0.2.10, 203.0.113.9"), raw("192.0.2.10", "203.0.113.9"), raw("192.0.2.10,203.0.113.9")} {
		denied(t, check(t, c, r), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	}
	for _, bad := range []string{"192.0.2.10, unknown", "192.0.2.10,", "not-an-ip", "192.0.2.10 x", "[::1"} {
		denied(t, check(t, c, joined(bad)), codes.InvalidArgument, typev3.StatusCode_BadRequest)
	}
}

// Class 2: a DPoP proof is used once, across a reload that changes its
// issuer and across a restart, with Redis and without.
func TestDPoPReplayWindowSurvivesReloadAndRestart(t *testing.T) {
	idp, key, cfg := dpopFixture(t, false)
	clk := newClock()
	v, err := verify.New(cfg.Issuers, verify.Options{Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := authz.NewServer(cfg, v, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := serve(t, srv)
	client := newDPoPClient(t)
	claims := claimsAt(idp, clk)
	claims["cnf"] = map[string]any{"jkt": client.jkt}
	tok := idptest.Mint(t, key, claims)
	url := dpopHost + "/orders/1"
	at := func() string {
		return client.proof("GET", url, tok, func(_, cl map[string]any) { cl["iat"] = clk.Unix() })
	}
	p := at()
	allowed(t, check(t, c, dpopReq("GET", "/orders/1", tok, p)))

	// A reload that changes the issuer (its leeway) keeps what was seen.
	changed := *cfg
	changed.Issuers = append([]verify.IssuerConfig(nil), cfg.Issuers...)
	changed.Issuers[0].Leeway = dur(7 * time.Second)
	nv, err := v.Reload(changed.Issuers)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Swap(&changed, nv); err != nil {
		t.Fatal(err)
	}
	denied(t, check(t, c, dpopReq("GET", "/orders/1", tok, p)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "used before")
	allowed(t, check(t, c, dpopReq("GET", "/orders/1", tok, at())))

	// A restart without Redis: the new process cannot know what the old
	// one saw, so a proof made before it started is refused.
	clk.Add(2 * time.Second)
	restarted := start(t, cfg, clk)
	denied(t, check(t, restarted, dpopReq("GET", "/orders/1", tok, p)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "predates")
	allowed(t, check(t, restarted, dpopReq("GET", "/orders/1", tok, at())))

	// With Redis, the fleet remembers: a new pod refuses the replay as used.
	rs := redistest.Start(t)
	rc := &cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 2 * time.Second}
	a := startInstance(t, cfg, rc)
	a.waitReady(t)
	fresh := client.proof("GET", url, tok, nil)
	allowed(t, check(t, a.c, dpopReq("GET", "/orders/1", tok, fresh)))
	b := startInstance(t, cfg, rc)
	b.waitReady(t)
	denied(t, check(t, b.c, dpopReq("GET", "/orders/1", tok, fresh)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "used before")
}

// Class 2: nonce keys. A pod that could not reach Redis when it first
// needed one still accepts the nonces it issued; after Redis lost its data,
// the pods agree on one key again.
func TestDPoPNonceKeysAgree(t *testing.T) {
	rs := redistest.Start(t)
	idp, key, cfg := dpopFixture(t, true)
	rc := &cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 500 * time.Millisecond}
	client := newDPoPClient(t)
	claims := idp.Claims(aud)
	claims["cnf"] = map[string]any{"jkt": client.jkt}
	tok := idptest.Mint(t, key, claims)
	url := dpopHost + "/orders/1"
	withNonce := func(n string) string {
		return client.proof("GET", url, tok, func(_, cl map[string]any) { cl["nonce"] = n })
	}
	nonceFrom := func(in *instance) string {
		t.Helper()
		resp := check(t, in.c, dpopReq("GET", "/orders/1", tok, withNonce("")))
		denied(t, resp, codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="use_dpop_nonce"`)
		return deniedHeader(resp, "dpop-nonce")
	}

	a := startInstance(t, cfg, rc)
	a.waitReady(t)
	rs.Kill()
	n := nonceFrom(a) // issued with a key of a's own: Redis is down
	allowed(t, check(t, a.c, dpopReq("GET", "/orders/1", tok, withNonce(n))))
	rs.Restart()
	// Once Redis is back, a agrees with it and still accepts its own.
	eventually(t, "a accepts its nonces after Redis returned", func() bool {
		return check(t, a.c, dpopReq("GET", "/orders/1", tok, withNonce(n))).GetStatus().GetCode() == 0
	})

	// Redis loses its data; a new pod starts and makes a key; a nonce from
	// either pod is accepted by the other once they have agreed again.
	if err := rs.Client().FlushAll(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	b := startInstance(t, cfg, rc)
	b.waitReady(t)
	eventually(t, "the pods accept each other's nonces", func() bool {
		okAB := check(t, b.c, dpopReq("GET", "/orders/1", tok, withNonce(nonceFrom(a)))).GetStatus().GetCode() == 0
		okBA := check(t, a.c, dpopReq("GET", "/orders/1", tok, withNonce(nonceFrom(b)))).GetStatus().GetCode() == 0
		return okAB && okBA
	})
}

// Class 3: a cnf we cannot check is a refusal, not a bearer token.
func TestUncheckableBindingRefused(t *testing.T) {
	idp, key, cfg := dpopFixture(t, false)
	c := start(t, cfg, nil)
	client := newDPoPClient(t)
	for name, cnf := range map[string]any{
		"empty":         map[string]any{},
		"jwk":           map[string]any{"jwk": client.jwk},
		"kid":           map[string]any{"kid": "k1"},
		"x5t":           map[string]any{"x5t": "abc"},
		"JKT":           map[string]any{"JKT": client.jkt},
		"jkt and jwk":   map[string]any{"jkt": client.jkt, "jwk": client.jwk},
		"null":          nil,
		"string":        client.jkt,
		"jkt not text":  map[string]any{"jkt": 7},
		"x5t#s256 case": map[string]any{"x5t#s256": "abc"},
	} {
		t.Run(name, func(t *testing.T) {
			claims := idp.Claims(aud)
			claims["cnf"] = cnf
			tok := idptest.Mint(t, key, claims)
			denied(t, check(t, c, req{path: "/orders/1", headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_token"`)
			denied(t, check(t, c, req{path: "/payments/1", headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
			// sender_constraint none ignores binding, as it says.
			allowed(t, check(t, c, req{path: "/legacy/1", headers: bearer(tok)}))
		})
	}
	// The twin: an unbound token on an if_bound route.
	allowed(t, check(t, c, req{path: "/orders/1", headers: bearer(idptest.Mint(t, key, idp.Claims(aud)))}))
}

// Class 4: the route an upstream would serve is the route checked.
func TestRouteReadings(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.Routes = append([]authz.RouteConfig{
		{Name: "settings", Match: authz.Match{Path: "/settings"}, Scopes: []string{"admin"}},
		{Name: "reports", Match: authz.Match{PathPrefix: "/reports", Methods: []string{"GET"}}, Scopes: []string{"reports"}},
	}, cfg.Routes...)
	c := start(t, cfg, nil)
	user := idptest.Mint(t, keys["RS256"], idp.Claims(aud)) // no admin or reports scope
	m := idp.Claims(aud)
	m["scope"] = "admin reports"
	m["email_verified"], m["stt"] = true, 1
	admin := idptest.Mint(t, keys["RS256"], m)

	for _, path := range []string{
		"/settings/",         // frameworks that strip the trailing slash serve /settings
		"/adm%C4%B1n",        // dotless i: Java's equalsIgnoreCase reads admin
		"/adm%C4%B0n",        // I with dot above: lower-cases to i
		"/%EF%BD%81dmin",     // fullwidth a: NFKC reads admin
		"/%EF%BC%A1DMIN",     // fullwidth A, upper case: NFKC and case folding
		"/ADMIN",             // plain upper case (ambiguous before, too)
		"/setting%C5%BF",     // LONG S: upper-cases to S, so Java and folding read settings
		"/%EF%BD%93ettings/", // fullwidth s and a trailing slash together
		"/admin%EF%BC%8F",    // fullwidth solidus (refused as confusable)
	} {
		t.Run(path, func(t *testing.T) {
			resp := check(t, c, req{path: path, headers: bearer(user)})
			if resp.GetStatus().GetCode() == 0 {
				t.Fatalf("%s was allowed for a token the route it reads as would refuse", path)
			}
		})
	}
	// HEAD is served by the GET handler: checked as the GET route.
	denied(t, check(t, c, req{method: "HEAD", path: "/reports/1", headers: bearer(user)}), codes.PermissionDenied, typev3.StatusCode_Forbidden, "insufficient_scope")
	allowed(t, check(t, c, req{method: "HEAD", path: "/reports/1", headers: bearer(admin)}))
	// A pattern with a trailing slash: its own path is no ambiguity, the
	// path without it is (a stripping framework serves the route for it).
	slashCfg := *cfg
	slashCfg.Routes = append([]authz.RouteConfig{{Name: "docs", Match: authz.Match{Path: "/docs/"}, Scopes: []string{"admin"}}}, cfg.Routes...)
	sc := start(t, &slashCfg, nil)
	allowed(t, check(t, sc, req{path: "/docs/", headers: bearer(admin)}))
	denied(t, check(t, sc, req{path: "/docs/", headers: bearer(user)}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	denied(t, check(t, sc, req{path: "/docs", headers: bearer(user)}), codes.InvalidArgument, typev3.StatusCode_BadRequest)
	allowed(t, check(t, sc, req{path: "/orders/1", headers: bearer(user)}))
	// The twins: unambiguous paths pass as before.
	allowed(t, check(t, c, req{path: "/settings", headers: bearer(admin)}))
	allowed(t, check(t, c, req{path: "/orders/1/", headers: bearer(user)}))
	allowed(t, check(t, c, req{path: "/caf%C3%A9", headers: bearer(user)}))
	allowed(t, check(t, c, req{path: "/%E2%84%AAelvin", headers: bearer(user)}))
}

// Class 5: one value per name, or a 400, on routes whose CEL reads them.
func TestQueryAndHeadersHaveOneReading(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.Routes = append([]authz.RouteConfig{
		{Name: "tenants", Match: authz.Match{PathPrefix: "/tenants"}, When: []authz.WhenRule{{CEL: "request.query['tenant'] == claims.tid"}}},
		{Name: "nodebug", Match: authz.Match{PathPrefix: "/nodebug"}, When: []authz.WhenRule{{CEL: "!('debug' in request.query) && !('debug_x' in request.query)"}}},
		{Name: "byheader", Match: authz.Match{PathPrefix: "/byheader"}, When: []authz.WhenRule{{CEL: "request.headers['x-tenant'] == claims.tid"}}},
		{Name: "plain", Match: authz.Match{PathPrefix: "/plain"}},
	}, cfg.Routes...)
	c := start(t, cfg, nil)
	m := idp.Claims(aud)
	m["tid"] = "acme"
	tok := idptest.Mint(t, keys["RS256"], m)
	get := func(path string) req { return req{path: path, headers: bearer(tok)} }

	for _, path := range []string{
		"/tenants?tenant=acme&tenant=victim",
		"/tenants?tenant=victim&tenant=acme",
		"/tenants?tenant=acme&TENANT=victim",
		"/tenants?tenant=acme&%74enant=victim",
		"/tenants?tenant=acme;tenant=victim",
		"/tenants?tenant=acme&tenant[]=victim",
		"/tenants?tenant=acme&x=%zz",
		"/nodebug?debug[]=1",
		"/nodebug?debug[x]=1",
		"/nodebug?debug.x=1&debug_x=2",
	} {
		denied(t, check(t, c, get(path)), codes.InvalidArgument, typev3.StatusCode_BadRequest)
	}
	// Names as lenient servers read them are seen by the condition.
	denied(t, check(t, c, get("/nodebug?DEBUG=1")), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	denied(t, check(t, c, get("/nodebug?debug.x=1")), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	denied(t, check(t, c, get("/tenants?TENANT=victim")), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	allowed(t, check(t, c, get("/tenants?tenant=acme")))
	allowed(t, check(t, c, get("/tenants?Tenant=acme&page=2")))
	allowed(t, check(t, c, get("/nodebug?page=1")))
	// Routes whose CEL does not read the query do not mind it.
	allowed(t, check(t, c, get("/plain?a=1&a=2;b[]=3")))

	// Headers: repeated lines are one comma-joined value, raw or not; a
	// name sent with both "_" and "-" is a 400.
	rawReq := func(kv ...string) req {
		return req{path: "/byheader", raw: rawHeaders(append([]string{":method", "GET", ":authority", "api.example.com", ":path", "/byheader",
			"authorization", "Bearer " + tok}, kv...)...)}
	}
	allowed(t, check(t, c, rawReq("x-tenant", "acme")))
	allowed(t, check(t, c, req{path: "/byheader", headers: map[string]string{"authorization": "Bearer " + tok, "x-tenant": "acme"}}))
	denied(t, check(t, c, rawReq("x-tenant", "acme", "x-tenant", "victim")), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	denied(t, check(t, c, rawReq("x-tenant", "victim", "X-Tenant", "acme")), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	denied(t, check(t, c, rawReq("x-tenant", "acme", "x_tenant", "victim")), codes.InvalidArgument, typev3.StatusCode_BadRequest)
	allowed(t, check(t, c, rawReq("x_tenant", "acme")))
}

// Class 6: a header any route sets is never the client's, on any route.
func TestClaimHeadersOfOtherRoutesStripped(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.Headers = authz.ClaimHeaders(map[string]string{"x-user-id": "sub"})
	cfg.Routes = append([]authz.RouteConfig{
		{Name: "tenants", Match: authz.Match{PathPrefix: "/tenants"}, Headers: authz.ClaimHeaders(map[string]string{"x-tenant": "tid"})},
		{Name: "maybe", Match: authz.Match{PathPrefix: "/maybe"}, AllowMissing: true},
		{Name: "quiet", Match: authz.Match{PathPrefix: "/quiet"}, Headers: map[string]*authz.HeaderSource{"x-user-id": nil}},
	}, cfg.Routes...)
	c := start(t, cfg, nil)
	m := idp.Claims(aud)
	m["tid"] = "acme"
	tok := idptest.Mint(t, keys["RS256"], m)
	spoof := map[string]string{"x-tenant": "victim", "x_tenant": "victim", "x-user-id": "root", "X_User_Id": "root"}
	for _, tc := range []struct {
		path  string
		token bool
	}{{"/public/x", false}, {"/maybe/x", false}, {"/maybe/x", true}, {"/orders/1", true}, {"/quiet/1", true}, {"/tenants/1", true}} {
		h := map[string]string{}
		for k, v := range spoof {
			h[k] = v
		}
		if tc.token {
			h["authorization"] = "Bearer " + tok
		}
		set, removed := allowed(t, check(t, c, req{path: tc.path, headers: h}))
		for _, name := range []string{"x-tenant", "x_tenant", "x-user-id", "x_user_id"} {
			if _, isSet := set[name]; !isSet && !contains(removed, name) {
				t.Errorf("%s: the client's %s reaches the upstream (set %v, removed %v)", tc.path, name, set, removed)
			}
		}
		if tc.path == "/tenants/1" && set["x-tenant"] != "acme" {
			t.Errorf("the route's own header: %v", set)
		}
	}
}

// Class 7: over budget is a deny for that caller (429), also where
// undecidable checks become gRPC errors; an IPv6 client is its /64.
func TestOverBudgetIsADeny(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	f.cfg.Issuers[0].Introspection.MaxCallsPerSecond = 10
	f.cfg.Issuers[0].Introspection.MaxCallsPerClientPerSecond = 3
	f.cfg.UndecidableResponse = "grpc_unavailable"
	c, _ := f.start(t)
	from := func(addr, tok string) req { return req{source: addr, headers: bearer(tok)} }
	throttled := 0
	for i := range 20 {
		// Every address in one /64 shares a bucket.
		resp := check(t, c, from(fmt.Sprintf("2001:db8:1:2::%x", i+1), fmt.Sprintf("made-up-%d", i)))
		if codes.Code(resp.GetStatus().GetCode()) == codes.ResourceExhausted {
			denied(t, resp, codes.ResourceExhausted, typev3.StatusCode_TooManyRequests)
			if deniedHeader(resp, "retry-after") == "" {
				t.Fatal("429 without Retry-After")
			}
			throttled++
		}
	}
	if throttled == 0 {
		t.Fatal("20 made-up tokens from one /64 within a second were never throttled (per-client share 3)")
	}
	// Another /64 has its own share: a valid token from it is introspected.
	allowed(t, check(t, c, from("2001:db8:1:3::1", f.opaque(nil))))
}

// Class 8: a DPoP proof with an oversized key costs no signature check, and
// the key is refused; a proof for another key is refused before its
// signature is looked at.
func TestDPoPProofKeyBounds(t *testing.T) {
	idp, key, cfg := dpopFixture(t, false)
	c := start(t, cfg, nil)
	client := newDPoPClient(t)
	claims := idp.Claims(aud)
	claims["cnf"] = map[string]any{"jkt": client.jkt}
	tok := idptest.Mint(t, key, claims)
	url := dpopHost + "/orders/1"
	rsaProof := func(bits int, e int64) string {
		n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), uint(bits)))
		n.SetBit(n, bits-1, 1).SetBit(n, 0, 1)
		jwk := map[string]any{"kty": "RSA", "n": base64.RawURLEncoding.EncodeToString(n.Bytes()),
			"e": base64.RawURLEncoding.EncodeToString(big.NewInt(e).Bytes())}
		h, _ := json.Marshal(map[string]any{"typ": "dpop+jwt", "alg": "PS256", "jwk": jwk})
		p, _ := json.Marshal(map[string]any{"jti": "x", "htm": "GET", "htu": url, "iat": time.Now().Unix()})
		return b64(string(h)) + "." + b64(string(p)) + "." + b64(strings.Repeat("s", bits/8))
	}
	for _, tc := range []struct {
		bits int
		e    int64
	}{{20000, 65537}, {4104, 65537}, {1024, 65537}, {2048, 65536}, {2048, 1}, {2048, 1 << 20}} {
		resp := check(t, c, dpopReq("GET", "/orders/1", tok, rsaProof(tc.bits, tc.e)))
		denied(t, resp, codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_dpop_proof"`)
		if tc.bits != 1024 && !strings.Contains(wwwAuth(resp), "RSA key is outside") {
			t.Errorf("%d bits, e=%d: %s", tc.bits, tc.e, wwwAuth(resp))
		}
	}
	// An Ed25519 key of the wrong length is refused, not a panic (500).
	short, _ := json.Marshal(map[string]any{"typ": "dpop+jwt", "alg": "EdDSA", "jwk": map[string]any{"kty": "OKP", "crv": "Ed25519", "x": b64("short")}})
	body, _ := json.Marshal(map[string]any{"jti": "y", "htm": "GET", "htu": url, "iat": time.Now().Unix()})
	denied(t, check(t, c, dpopReq("GET", "/orders/1", tok, b64(string(short))+"."+b64(string(body))+"."+b64("sig"))),
		codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_dpop_proof"`)
	// Another (well-formed) key: refused as the wrong key, whatever the signature.
	other := newDPoPClient(t)
	forged := other.proof("GET", url, tok, nil)
	forged = forged[:strings.LastIndexByte(forged, '.')+1] + b64("not a signature")
	denied(t, check(t, c, dpopReq("GET", "/orders/1", tok, forged)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "another key")
	// The twin still works.
	allowed(t, check(t, c, dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, nil))))
}
