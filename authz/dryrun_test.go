package authz_test

import (
	"testing"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// TestDryRunRoutes: a dry-run route runs the whole decision and allows;
// its would-be outcome is reported (observer, dynamic metadata); claim
// headers come only from a token that passed verification, and spoofed
// copies are removed as always.
func TestDryRunRoutes(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	cfg.Routes = append([]authz.RouteConfig{
		{Name: "trial", Match: authz.Match{PathPrefix: "/trial"}, Mode: "dry_run", Scopes: []string{"trial:use"},
			When: []authz.WhenRule{{CEL: "request.method == 'GET'"}}},
	}, cfg.Routes...)
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
	tok := idptest.Mint(t, keys["RS256"], idp.Claims(aud)) // no trial:use scope
	spoof := func(h map[string]string) map[string]string { h["x-user-id"] = "root"; return h }

	for _, tc := range []struct {
		name, tok, reason string
		headersFromToken  bool
	}{
		{"missing scope", tok, "insufficient_scope", true},
		{"no token", "", "missing_token", false},
		{"bad token", tok[:len(tok)-4] + "AAAA", "bad_signature", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := spoof(map[string]string{})
			if tc.tok != "" {
				h["authorization"] = "Bearer " + tc.tok
			}
			resp := check(t, c, req{path: "/trial/1", headers: h})
			set, removed := allowed(t, resp)
			if set["x-user-id"] == "root" || (!tc.headersFromToken && (set["x-user-id"] != "" || !contains(removed, "x-user-id"))) {
				t.Errorf("claim headers: set %v, removed %v", set, removed)
			}
			if tc.headersFromToken && set["x-user-id"] != idp.Claims(aud)["sub"] {
				t.Errorf("a verified token's claim headers are sent: %v", set)
			}
			md := resp.GetDynamicMetadata().GetFields()
			if !md["dry_run"].GetBoolValue() || md["dry_run_decision"].GetStringValue() != "deny" {
				t.Errorf("dynamic metadata %v", md)
			}
			info, _ := obs.last()
			if !info.DryRun || info.Decision != "deny" || info.Route != "trial" || (tc.reason != "bad_signature" && info.Reason != tc.reason) {
				t.Errorf("reported %+v, want a dry-run deny for %s", info, tc.reason)
			}
		})
	}
	// A request the route would allow is reported as a dry-run allow.
	m := idp.Claims(aud)
	m["scope"] = "trial:use"
	set, _ := allowed(t, check(t, c, req{path: "/trial/1", headers: bearer(idptest.Mint(t, keys["RS256"], m))}))
	if info, _ := obs.last(); !info.DryRun || info.Decision != "allow" || set["x-user-id"] == "" {
		t.Errorf("would-be allow: %+v, headers %v", info, set)
	}
	// Other routes are enforced as ever.
	if resp := check(t, c, req{path: "/admin/x", headers: bearer(tok)}); resp.GetStatus().GetCode() == 0 {
		t.Error("an enforced route allowed")
	}
	if w := cfg.Warnings(); len(w) == 0 || !contains([]string{w[0]}, "routes[0] (trial): dry_run: decisions are evaluated and logged, not enforced (an open route)") {
		t.Errorf("validate does not name the dry-run route: %v", w)
	}
}
