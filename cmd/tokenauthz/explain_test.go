package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

func TestCheckExplainsEveryDecision(t *testing.T) {
	key := idptest.NewKey(t, "k1", "ES256")
	idp := idptest.New(t, key)
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	_ = os.WriteFile(cfgPath, []byte(fmt.Sprintf(`
issuers:
  - { name: main, issuer: "%s", audiences: [api], jwks_uri: "%s", algorithms: [ES256] }
routes:
  - { name: public, match: { path_prefix: /public }, anonymous: true }
  - { name: admin, match: { path_prefix: /admin, methods: [POST] }, scopes: [admin], claims: { email_verified: true } }
  - name: tenants
    match: { path_prefix: /tenants }
    when:
      - "request.method in ['GET', 'HEAD']"
      - { cel: "request.path.startsWith('/tenants/' + claims.tid + '/')", message: "another tenant" }
  - { name: api, match: { path_prefix: /api } }
headers: { x-user-id: sub }
`, idp.URL(), idp.JWKSURL())), 0o600)
	claims := func(extra map[string]any) string {
		c := idp.Claims("api")
		for k, v := range extra {
			c[k] = v
		}
		return idptest.Mint(t, key, c)
	}
	admin := claims(map[string]any{"scope": "admin", "email_verified": true})
	tokFile := filepath.Join(t.TempDir(), "tok")
	_ = os.WriteFile(tokFile, []byte(admin+"\n"), 0o600)

	cases := []struct {
		name string
		args []string
		exit int
		want []string
	}{
		{"allow", []string{"--token-file", tokFile, "--method", "POST", "--path", "/admin/x", "--header", "x-user-id=spoofed"}, 0,
			[]string{`route "admin": the first whose match fits POST /admin/x`, `token verified: issuer "main"`, `scopes: route needs ["admin"]: all present`,
				"claim email_verified: accepted value", "decision: ALLOW", "set    x-user-id: user-1"}},
		{"anonymous", []string{"--path", "/public/a"}, 0, []string{`route "public" is anonymous`, "decision: ALLOW", "remove x-user-id"}},
		{"no route", []string{"--token", admin, "--path", "/other"}, 1, []string{"no route matches GET /other", "DENY 403"}},
		{"method not matched", []string{"--token", admin, "--path", "/admin/x"}, 1, []string{"no route matches GET /admin/x"}},
		{"missing token", []string{"--path", "/api/x"}, 1, []string{"credentials: a bearer token is required", "DENY 401", `www-authenticate: Bearer realm="tokenauthz"`}},
		{"expired", []string{"--token", claims(map[string]any{"exp": time.Now().Unix() - 3600}), "--path", "/api"}, 1,
			[]string{"token refused (expired)", "DENY 401", `error="invalid_token"`}},
		{"wrong audience", []string{"--token", idptest.Mint(t, key, idp.Claims("billing")), "--path", "/api"}, 1, []string{"token refused (wrong_audience)"}},
		{"unknown issuer", []string{"--token", claims(map[string]any{"iss": "https://evil.example"}), "--path", "/api"}, 1,
			[]string{`iss "https://evil.example"`, "token refused (unknown_issuer)"}},
		{"missing scope", []string{"--token", claims(map[string]any{"scope": "read", "email_verified": true}), "--method", "POST", "--path", "/admin"}, 1,
			[]string{`token has ["read"]: missing ["admin"]`, "DENY 403", `error="insufficient_scope"`}},
		{"claim mismatch", []string{"--token", claims(map[string]any{"scope": "admin", "email_verified": "true"}), "--method", "POST", "--path", "/admin"}, 1,
			[]string{`claim email_verified: is "true" (string), accepted: true (bool)`}},
		{"unnormalized path", []string{"--token", admin, "--path", "/public/../admin"}, 1, []string{"the path has a dot segment", "no single meaning", "DENY 400"}},
		{"when true", []string{"--token", claims(map[string]any{"tid": "acme"}), "--path", "/tenants/acme/x"}, 0,
			[]string{"when request.method in ['GET', 'HEAD']: true", "when request.path.startsWith('/tenants/' + claims.tid + '/'): true", "decision: ALLOW"}},
		{"when false", []string{"--token", claims(map[string]any{"tid": "acme"}), "--path", "/tenants/other/x"}, 1,
			[]string{"when request.method in ['GET', 'HEAD']: true", "'/'): false", `claims = {`, `"tid":"acme"`, `request.path = "/tenants/other/x"`, "DENY 403", "another tenant"}},
		{"when error", []string{"--token", claims(nil), "--path", "/tenants/acme/x"}, 1,
			[]string{"'/'): error: no such key: tid (denied)", "DENY 403"}},
		{"named route", []string{"--token", admin, "--path", "/x", "--route", "api"}, 0, []string{`route "api", named by Envoy's context_extensions`}},
		{"opaque token, no introspection", []string{"--token", "opaque-token", "--path", "/api"}, 1, []string{"opaque (not a compact JWS)", "token refused (malformed)"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := cli(append([]string{"check", "--config", cfgPath}, c.args...), &out, &errOut)
			if code != c.exit {
				t.Errorf("exit %d, want %d; stderr %s", code, c.exit, errOut.String())
			}
			for _, w := range c.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
			if strings.Contains(out.String(), admin) {
				t.Error("the explanation prints the token")
			}
		})
	}
}
