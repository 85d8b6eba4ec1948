package authz_test

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
)

// recipeCase is one request against a README recipe and the answer it must
// get.
type recipeCase struct {
	method, path string
	claims       map[string]any
	userinfo     map[string]any
	want         codes.Code
	header       [2]string // a header the allow must set, and its value
}

// TestREADMERecipes runs every "# recipe: NAME" block of docs/policy.md
// Policy section through the real Check server.
func TestREADMERecipes(t *testing.T) {
	readme, err := os.ReadFile("../docs/policy.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := map[string]string{}
	for _, m := range regexp.MustCompile("(?s)```yaml\n# recipe: ([a-z-]+)\n(.*?)```").FindAllStringSubmatch(string(readme), -1) {
		blocks[m[1]] = m[2]
	}
	const tenant, group = "8f3c2a71-5d0e-4b8a-9c61-2e7f4d9a0b13", "0b6d1f3e-4c2a-4e9b-8f7d-1a2b3c4d5e6f"
	ok, deny := codes.OK, codes.PermissionDenied
	cases := map[string][]recipeCase{
		"keycloak-roles": {
			{path: "/admin/x", claims: map[string]any{"realm_access": map[string]any{"roles": []any{"offline_access", "admin"}}}, want: ok},
			{path: "/admin/x", claims: map[string]any{"realm_access": map[string]any{"roles": []any{"user"}}}, want: deny},
			{path: "/admin/x", want: deny},
			{path: "/orders/1", claims: map[string]any{"resource_access": map[string]any{"orders-api": map[string]any{"roles": []any{"orders-reader"}}}}, want: ok},
			{path: "/orders/1", claims: map[string]any{"resource_access": map[string]any{"other-api": map[string]any{"roles": []any{"orders-reader"}}}}, want: deny},
		},
		"entra-groups": {
			{path: "/finance/q3", claims: map[string]any{"tid": tenant, "groups": []any{"x", group}}, want: ok},
			{path: "/finance/q3", claims: map[string]any{"tid": tenant, "groups": []any{}, "roles": []any{"Finance.Read"}}, want: ok},
			{path: "/finance/q3", claims: map[string]any{"tid": "another-tenant", "groups": []any{group}}, want: deny},
			{path: "/finance/q3", claims: map[string]any{"tid": tenant, "groups": []any{"x"}, "roles": []any{}}, want: deny},
		},
		"tenant-in-path": {
			{path: "/tenants/acme/orders", claims: map[string]any{"tid": "acme"}, want: ok},
			{path: "/tenants/acme-evil/orders", claims: map[string]any{"tid": "acme"}, want: deny},
			{path: "/tenants/other/orders", claims: map[string]any{"tid": "acme"}, want: deny},
			{path: "/tenants/acme/orders", want: deny},
		},
		"read-write-by-method": {
			{method: "GET", path: "/orders/1", claims: map[string]any{"scope": "orders:read"}, want: ok},
			{method: "POST", path: "/orders", claims: map[string]any{"scope": "orders:read"}, want: deny},
			{method: "POST", path: "/orders", claims: map[string]any{"scope": "orders:read orders:write"}, want: ok},
			{method: "GET", path: "/orders/1", claims: map[string]any{"scope": "orders:write"}, want: deny},
		},
		"service-clients": {
			{path: "/internal/jobs", claims: map[string]any{"azp": "billing-service"}, want: ok},
			{path: "/internal/jobs", claims: map[string]any{"client_id": "reports-job"}, want: ok},
			{path: "/internal/jobs", claims: map[string]any{"azp": "web-app", "client_id": "billing-service"}, want: deny},
			{path: "/internal/jobs", want: deny},
		},
		"email-verified-or-service": {
			{path: "/x", claims: map[string]any{"email_verified": true}, want: ok},
			{path: "/x", claims: map[string]any{"email_verified": false}, want: deny},
			{path: "/x", want: deny},
			{path: "/x", claims: map[string]any{"gty": "client-credentials"}, want: ok},
			{path: "/x", claims: map[string]any{"sub": "svc-1", "client_id": "svc-1"}, want: ok},
			{path: "/x", claims: map[string]any{"client_id": "web-app", "email_verified": "true"}, want: deny},
		},
		"userinfo-email": {
			{path: "/profile", claims: map[string]any{"email": "old@example.com"}, userinfo: map[string]any{"email": "new@example.com"}, want: ok,
				header: [2]string{"x-user-email", "new@example.com"}},
			{path: "/orders", claims: map[string]any{"email": "old@example.com"}, userinfo: map[string]any{"email": "new@example.com"}, want: ok,
				header: [2]string{"x-user-email", "old@example.com"}},
		},
	}
	for name, block := range blocks {
		// A recipe with issuers of its own (tenant-per-issuer: an issuer
		// template) runs through tokenauthz test in cmd/tokenauthz's
		// TestRecipeSuites, and its class in tenants_test.go.
		if cases[name] == nil && !strings.HasPrefix(block, "issuers:") {
			t.Errorf("README recipe %q has no cases here", name)
		}
	}
	for name, cs := range cases {
		t.Run(name, func(t *testing.T) {
			block, found := blocks[name]
			if !found {
				t.Fatalf("README has no recipe %q", name)
			}
			f := newPolicyFixture(t, block)
			c := serve(t, f.start())
			for i, rc := range cs {
				extra := map[string]any{"jti": name + string(rune('a'+i))}
				for k, v := range rc.claims {
					extra[k] = v
				}
				sub := "user-1"
				if s, ok := extra["sub"].(string); ok {
					sub = s
				}
				f.idp.SetUserinfo(sub, rc.userinfo)
				if rc.userinfo == nil {
					f.idp.SetUserinfo(sub, map[string]any{})
				}
				resp := check(t, c, req{method: rc.method, path: rc.path, headers: bearer(f.token(extra))})
				if got := codes.Code(resp.GetStatus().GetCode()); got != rc.want {
					t.Errorf("case %d %s %s %v: %v (%s), want %v", i, rc.method, rc.path, rc.claims, got, resp.GetStatus().GetMessage(), rc.want)
					continue
				}
				if rc.header[0] != "" {
					set, _ := allowed(t, resp)
					if set[rc.header[0]] != rc.header[1] {
						t.Errorf("case %d: %s = %q, want %q", i, rc.header[0], set[rc.header[0]], rc.header[1])
					}
				}
			}
			if strings.Contains(f.logs.String(), "level=ERROR") {
				t.Errorf("errors logged:\n%s", f.logs)
			}
		})
	}
}
