package authz_test

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// policyFixture serves routes (YAML, the routes: list) for one RS256 issuer
// with userinfo, and mints tokens with extra claims.
type policyFixture struct {
	t    *testing.T
	idp  *idptest.IdP
	key  *idptest.Key
	cfg  *authz.Config
	logs *bytes.Buffer
}

func newPolicyFixture(t *testing.T, routesYAML string) *policyFixture {
	t.Helper()
	key := idptest.NewKey(t, "k1", "RS256")
	idp := idptest.New(t, key)
	var routes struct {
		Routes  []authz.RouteConfig            `yaml:"routes"`
		Headers map[string]*authz.HeaderSource `yaml:"headers"`
	}
	dec := yaml.NewDecoder(strings.NewReader(routesYAML))
	dec.KnownFields(true)
	if err := dec.Decode(&routes); err != nil {
		t.Fatal(err)
	}
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "main", Issuer: idp.URL(), Audiences: []string{aud}, JWKSURI: idp.JWKSURL(),
			Algorithms: []string{"RS256"}, Userinfo: &verify.UserinfoConfig{Endpoint: idp.UserinfoURL()}}},
		Routes:  routes.Routes,
		Headers: routes.Headers,
	}
	return &policyFixture{t: t, idp: idp, key: key, cfg: cfg, logs: &bytes.Buffer{}}
}

func (f *policyFixture) start() *authz.Server {
	f.t.Helper()
	log := slog.New(slog.NewTextHandler(f.logs, nil))
	v, err := verify.New(f.cfg.Issuers, verify.Options{Logger: log})
	if err != nil {
		f.t.Fatal(err)
	}
	srv, err := authz.NewServer(f.cfg, v, log)
	if err != nil {
		f.t.Fatal(err)
	}
	return srv
}

func (f *policyFixture) token(extra map[string]any) string {
	c := f.idp.Claims(aud)
	for k, v := range extra {
		c[k] = v
	}
	return idptest.Mint(f.t, f.key, c)
}

// TestWhenSeesEveryVariable: a condition on each CEL variable, true for
// one request and false for another, through the real Check server.
func TestWhenSeesEveryVariable(t *testing.T) {
	f := newPolicyFixture(t, `
routes:
  - { name: method, match: { path_prefix: /method }, when: ["request.method in ['GET', 'HEAD']"] }
  - { name: path, match: { path_prefix: /path }, when: ["request.path.endsWith('/ok')"] }
  - { name: host, match: { path_prefix: /host }, when: ["request.host == 'api.example.com'"] }
  - { name: scheme, match: { path_prefix: /scheme }, when: ["request.scheme == 'https'"] }
  - { name: query, match: { path_prefix: /query }, when: ["request.query['mode'] == 'ro'"] }
  - { name: headers, match: { path_prefix: /headers }, when: ["request.headers['x-team'] == 'blue'"] }
  - { name: source, match: { path_prefix: /source }, when: ["request.source.startsWith('10.')"] }
  - { name: context, match: { path_prefix: /context }, when: ["request.context['tier'] == 'gold'"] }
  - { name: claims, match: { path_prefix: /claims }, when: ["claims.tid == 'acme'"] }
  - { name: userinfo, match: { path_prefix: /userinfo }, userinfo: true, when: ["userinfo.email_verified == true"] }
  - { name: issuer, match: { path_prefix: /issuer }, when: ["issuer == 'main'"] }
  - { name: route, match: { path_prefix: /route }, when: ["route == 'route' && request.path != '/route/no'"] }
  - { name: scopes, match: { path_prefix: /scopes }, when: ["'write' in scopes"] }
  - { name: has, match: { path_prefix: /has }, when: ["!has(claims.absent) && has(claims.tid)"] }
`)
	c := serve(t, f.start())
	f.idp.SetUserinfo("user-1", map[string]any{"email_verified": true})
	tok := f.token(map[string]any{"tid": "acme", "scope": "read write"})
	other := f.token(map[string]any{"tid": "other", "scope": "read", "jti": "2"})
	f.idp.SetUserinfo("user-1", map[string]any{"email_verified": true})
	for _, tc := range []struct {
		name      string
		yes, no   req
		yesT, no2 string
	}{
		{"method", req{path: "/method/x"}, req{method: "POST", path: "/method/x"}, tok, tok},
		{"path", req{path: "/path/ok"}, req{path: "/path/no"}, tok, tok},
		{"host", req{path: "/host"}, req{path: "/host", host: "other.example.com"}, tok, tok},
		{"query", req{path: "/query?mode=ro&x=1"}, req{path: "/query?mode=rw"}, tok, tok},
		{"headers", req{path: "/headers", headers: map[string]string{"x-team": "blue"}}, req{path: "/headers", headers: map[string]string{"x-team": "red"}}, tok, tok},
		{"source", req{path: "/source", source: "10.1.2.3"}, req{path: "/source", source: "192.0.2.1"}, tok, tok},
		{"context", req{path: "/context", ext: map[string]string{"tier": "gold"}}, req{path: "/context", ext: map[string]string{"tier": "free"}}, tok, tok},
		{"claims", req{path: "/claims"}, req{path: "/claims"}, tok, other},
		{"issuer", req{path: "/issuer"}, req{path: "/issuer"}, tok, ""},
		{"route", req{path: "/route/yes"}, req{path: "/route/no"}, tok, tok},
		{"scopes", req{path: "/scopes"}, req{path: "/scopes"}, tok, other},
		{"has", req{path: "/has"}, req{path: "/has"}, tok, f.token(map[string]any{"absent": 1, "tid": "acme"})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.yes.headers = withAuth(tc.yes.headers, tc.yesT)
			allowed(t, check(t, c, tc.yes))
			if tc.no2 == "" {
				return
			}
			tc.no.headers = withAuth(tc.no.headers, tc.no2)
			denied(t, check(t, c, tc.no), codes.PermissionDenied, typev3.StatusCode_Forbidden)
		})
	}
	// scheme: the harness sends https.
	allowed(t, check(t, c, req{path: "/scheme", headers: bearer(tok)}))
	// userinfo: the endpoint's answer, read by the expression.
	allowed(t, check(t, c, req{path: "/userinfo", headers: bearer(tok)}))
	f.idp.SetUserinfo("user-1", map[string]any{"email_verified": false})
	denied(t, check(t, c, req{path: "/userinfo", headers: bearer(f.token(map[string]any{"jti": "3"}))}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
}

func withAuth(h map[string]string, tok string) map[string]string {
	if h == nil {
		h = map[string]string{}
	}
	h["authorization"] = "Bearer " + tok
	return h
}

// TestWhenDeniesWithMessage: a false condition is a 403 whose description
// is its message (or the expression), and the log names it; conditions are
// checked in order.
func TestWhenDeniesWithMessage(t *testing.T) {
	f := newPolicyFixture(t, `
routes:
  - name: tenant-orders
    match: { path_prefix: /tenants }
    claims: { realm_access.roles: admin }
    when:
      - "request.path.startsWith('/tenants/' + claims.tid + '/')"
      - { cel: "request.method in ['GET', 'HEAD'] || 'writer' in claims.roles", message: "writers only" }
`)
	c := serve(t, f.start())
	admin := map[string]any{"realm_access": map[string]any{"roles": []any{"user", "admin"}}, "tid": "acme", "roles": []any{"reader"}}
	tok := f.token(admin)
	allowed(t, check(t, c, req{path: "/tenants/acme/orders", headers: bearer(tok)}))
	resp := check(t, c, req{path: "/tenants/other/orders", headers: bearer(tok)})
	denied(t, resp, codes.PermissionDenied, typev3.StatusCode_Forbidden)
	if msg := resp.GetStatus().GetMessage(); !strings.Contains(msg, "request.path.startsWith") {
		t.Errorf("description %q is not the expression", msg)
	}
	resp = check(t, c, req{method: "POST", path: "/tenants/acme/orders", headers: bearer(tok)})
	denied(t, resp, codes.PermissionDenied, typev3.StatusCode_Forbidden)
	if msg := resp.GetStatus().GetMessage(); msg != "writers only" {
		t.Errorf("description %q, want the message", msg)
	}
	admin["roles"] = []any{"writer"}
	admin["jti"] = "w"
	allowed(t, check(t, c, req{method: "POST", path: "/tenants/acme/orders", headers: bearer(f.token(admin))}))
	// The array claim rule: admin must be among the roles.
	denied(t, check(t, c, req{path: "/tenants/acme/orders", headers: bearer(f.token(map[string]any{
		"realm_access": map[string]any{"roles": []any{"user"}}, "tid": "acme"}))}), codes.PermissionDenied, typev3.StatusCode_Forbidden, "realm_access.roles")
	if !strings.Contains(f.logs.String(), "writers only") || !strings.Contains(f.logs.String(), "when_false") {
		t.Errorf("the log does not name the condition:\n%s", f.logs)
	}
}

// TestWhenRuntimeErrorDenies: an evaluation error (missing key, wrong type,
// the cost limit) is a 403 with the error in the log, never a 5xx and
// never an allow.
func TestWhenRuntimeErrorDenies(t *testing.T) {
	ten := "[0,1,2,3,4,5,6,7,8,9]"
	f := newPolicyFixture(t, `
routes:
  - { name: missing, match: { path_prefix: /missing }, when: ["claims.tid == 'acme'"] }
  - { name: type, match: { path_prefix: /type }, when: ["claims.tid > 3"] }
  - { name: dyn, match: { path_prefix: /dyn }, when: ["claims.flag"] }
  - { name: cost, match: { path_prefix: /cost }, when: ["`+ten+`.all(a, `+ten+`.all(b, `+ten+`.all(c, `+ten+`.all(d, `+ten+`.all(e, a+b+c+d+e >= 0)))))"] }
`)
	c := serve(t, f.start())
	tok := f.token(map[string]any{"tid": "acme", "flag": "yes"})
	for _, p := range []string{"/missing", "/type", "/dyn", "/cost"} {
		resp := check(t, c, req{path: p, headers: bearer(f.token(map[string]any{"flag": "yes", "tid": map[string]any{"x": 1}}))})
		denied(t, resp, codes.PermissionDenied, typev3.StatusCode_Forbidden)
		if p == "/missing" {
			denied(t, check(t, c, req{path: p, headers: bearer(f.token(map[string]any{"jti": "no-tid"}))}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
		}
	}
	allowed(t, check(t, c, req{path: "/missing", headers: bearer(tok)}))
	for _, want := range []string{"when_error", "no such key", "cost limit"} {
		if !strings.Contains(f.logs.String(), want) {
			t.Errorf("the log lacks %q:\n%s", want, f.logs)
		}
	}
}

// TestPolicyConfigErrors: syntax and type errors are config errors at load,
// with the line and column in the expression.
func TestPolicyConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		rc   authz.RouteConfig
		want []string
	}{
		{"syntax", authz.RouteConfig{When: []authz.WhenRule{{CEL: "request.path.startsWith('/a'"}}}, []string{"routes[0].when[0]", "1:"}},
		{"syntax on line 2", authz.RouteConfig{When: []authz.WhenRule{{CEL: "true &&\n  request.method ==="}}}, []string{"routes[0].when[0]", "2:"}},
		{"unknown variable", authz.RouteConfig{When: []authz.WhenRule{{CEL: "requets.method == 'GET'"}}}, []string{"undeclared reference", "requets"}},
		{"not a bool", authz.RouteConfig{When: []authz.WhenRule{{CEL: "request.method"}}}, []string{"string, not bool"}},
		{"wrong operand type", authz.RouteConfig{When: []authz.WhenRule{{CEL: "request.method + 1 == 2"}}}, []string{"no matching overload"}},
		{"header type", authz.RouteConfig{Headers: map[string]*authz.HeaderSource{"x-m": {CEL: "request.headers"}}}, []string{"routes[0].headers.x-m", "map"}},
		{"null for nothing", authz.RouteConfig{Headers: map[string]*authz.HeaderSource{"x-nope": nil}}, []string{"routes[0].headers.x-nope"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.rc.Name, tc.rc.Match = "r", authz.Match{PathPrefix: "/"}
			cfg := &authz.Config{Issuers: []verify.IssuerConfig{{Name: "main", Issuer: "https://idp.example", Audiences: []string{aud},
				JWKS: demoJWKS, Algorithms: []string{"ES256"}}}, Routes: []authz.RouteConfig{tc.rc}}
			got := strings.Join(cfg.Validate(), "\n")
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("problems lack %q:\n%s", w, got)
				}
			}
		})
	}
}

// TestRouteHeaders: per-route headers merge over the top-level ones: claim
// path fallbacks, CEL values, null removal (the client's copy still goes).
func TestRouteHeaders(t *testing.T) {
	f := newPolicyFixture(t, `
headers:
  x-user-id: sub
  x-user-email: email
  x-user-scopes: scope
routes:
  - name: profile
    match: { path_prefix: /profile }
    userinfo: true
    headers:
      x-user-email: [userinfo.email, email]
      x-tenant: { cel: "claims.tid" }
      x-roles: { cel: "claims.roles.filter(r, r != 'internal')" }
      x-level: { cel: "size(claims.roles) * 10" }
      x-user-scopes: null
  - name: fallback
    match: { path_prefix: /fallback }
    headers:
      x-user-email: [userinfo.email, email]
  - { name: default, match: { path_prefix: / } }
`)
	c := serve(t, f.start())
	f.idp.SetUserinfo("user-1", map[string]any{"email": "fresh@example.com"})
	tok := f.token(map[string]any{"email": "token@example.com", "tid": "acme", "roles": []any{"a", "internal", "b"}, "scope": "read"})
	spoof := map[string]string{"x-user-scopes": "admin", "x-tenant": "evil"}
	set, removed := allowed(t, check(t, c, req{path: "/profile", headers: withAuth(spoof, tok)}))
	want := map[string]string{"x-user-id": "user-1", "x-user-email": "fresh@example.com", "x-tenant": "acme", "x-roles": "a,b", "x-level": "30"}
	for h, v := range want {
		if set[h] != v {
			t.Errorf("%s = %q, want %q (all: %v)", h, set[h], v, set)
		}
	}
	if _, ok := set["x-user-scopes"]; ok || !contains(removed, "x-user-scopes") {
		t.Errorf("x-user-scopes is off on this route: set %v removed %v", set, removed)
	}
	// Without userinfo the fallback is the token's claim; elsewhere the
	// top-level header, and the route-only headers are not sent.
	set, _ = allowed(t, check(t, c, req{path: "/fallback", headers: bearer(tok)}))
	if set["x-user-email"] != "token@example.com" {
		t.Errorf("fallback: %v", set)
	}
	set, _ = allowed(t, check(t, c, req{path: "/other", headers: withAuth(map[string]string{"x-tenant": "evil"}, tok)}))
	if set["x-user-email"] != "token@example.com" || set["x-user-scopes"] != "read" || set["x-tenant"] != "" {
		t.Errorf("default route: %v", set)
	}
	// A CEL header that fails to evaluate denies.
	denied(t, check(t, c, req{path: "/profile", headers: bearer(f.token(map[string]any{"jti": "x", "roles": []any{}}))}),
		codes.PermissionDenied, typev3.StatusCode_Forbidden)
}

// TestReloadSwapsPrograms: a new policy's expressions replace the old ones
// in one swap with the rest of the policy.
func TestReloadSwapsPrograms(t *testing.T) {
	f := newPolicyFixture(t, `
routes:
  - { name: r, match: { path_prefix: / }, when: ["request.method == 'GET'"] }
`)
	srv := f.start()
	c := serve(t, srv)
	tok := f.token(nil)
	allowed(t, check(t, c, req{headers: bearer(tok)}))
	f.cfg.Routes[0].When = []authz.WhenRule{{CEL: "request.method == 'POST'"}}
	v, _ := verify.New(f.cfg.Issuers, verify.Options{})
	if err := srv.Swap(f.cfg, v); err != nil {
		t.Fatal(err)
	}
	denied(t, check(t, c, req{headers: bearer(tok)}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
	f.cfg.Routes[0].When = []authz.WhenRule{{CEL: "request.method =="}}
	if err := srv.Swap(f.cfg, v); err == nil {
		t.Fatal("a policy that does not compile was swapped in")
	}
	denied(t, check(t, c, req{headers: bearer(tok)}), codes.PermissionDenied, typev3.StatusCode_Forbidden)
}
