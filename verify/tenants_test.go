package verify

import (
	"context"
	"strings"
	"testing"
	"unsafe"

	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// TestIssuerTemplateShapes: a template puts its one placeholder in the path
// or as a whole host label with a domain after it; nowhere else.
func TestIssuerTemplateShapes(t *testing.T) {
	good := []string{
		"https://login.microsoftonline.com/{tenant}/v2.0",
		"https://sso.example.com/realms/{tenant}",
		"https://{tenant}.auth.example.com/",
		"https://login.{tenant}.example.com",
		"https://{tenant}.example.com:8443/oauth2",
		"https://idp.example.com/t-{tenant}/oauth2",
	}
	for _, tmpl := range good {
		if _, err := parseTemplate(tmpl, ""); err != nil {
			t.Errorf("%s: %v", tmpl, err)
		}
	}
	bad := []string{
		"https://idp.example.com/realms/",                // no placeholder
		"https://idp.example.com/{tenant}/{tenant}",      // two
		"{tenant}://idp.example.com/",                    // scheme
		"https://idp.example.com:{tenant}/",              // port
		"https://{tenant}/realms",                        // the whole host
		"https://{tenant}.com/",                          // a domain under a TLD
		"https://idp.{tenant}/",                          // the TLD
		"https://a{tenant}.example.com/",                 // part of a label
		"https://idp.example.com/realms/{tenant}?x=1",    // query
		"https://idp.example.com/realms/{tenant}#f",      // fragment
		"https://user@idp.example.com/realms/{tenant}",   // user info
		"ftp://idp.example.com/{tenant}",                 // scheme
		"https://idp.example.com/realms/{tenant}%2fkeys", // fine as a URL, but check below
	}
	for _, tmpl := range bad[:len(bad)-1] {
		if _, err := parseTemplate(tmpl, ""); err == nil {
			t.Errorf("%s: accepted", tmpl)
		}
	}
	if _, err := parseTemplate("https://idp.example.com/realms/{tenant}", "[a-z"); err == nil {
		t.Error("a broken tenant_pattern was accepted")
	}
}

// TestTemplateMatchRefusesHostileTenants: whatever iss a token carries,
// the tenant it names keeps to the safe charset, so the URL fetched keeps
// the template's scheme, host, port and path shape.
func TestTemplateMatchRefusesHostileTenants(t *testing.T) {
	path, err := parseTemplate("https://sso.example.com/realms/{tenant}", "")
	if err != nil {
		t.Fatal(err)
	}
	host, err := parseTemplate("https://{tenant}.auth.example.com/", "")
	if err != nil {
		t.Fatal(err)
	}
	guid, err := parseTemplate("https://login.microsoftonline.com/{tenant}/v2.0", "[0-9a-f-]{36}")
	if err != nil {
		t.Fatal(err)
	}
	hostile := []string{"", ".", "..", "../admin", "a/b", "a@b", "a%2fb", "%2e%2e", "a:1", "a?x", "a#x", "a b", "ä",
		"ａｃｍｅ", "a\x00b", "a\nb", "a.b", strings.Repeat("a", 65), strings.Repeat("a", 1<<20), "a\\b", "a;b", "a,b"}
	for _, v := range hostile {
		for _, tm := range []*template{path, host} {
			if got, ok := tm.match(tm.prefix + v + tm.suffix); ok {
				t.Errorf("template %s…%s: tenant %q accepted as %q", tm.prefix, tm.suffix, truncate(v, 20), got)
			}
		}
	}
	for _, v := range []string{"Acme", "a_b", "-acme", "acme-"} {
		if _, ok := host.match(host.prefix + v + host.suffix); ok {
			t.Errorf("host label %q accepted", v)
		}
	}
	for _, c := range []struct {
		tm   *template
		iss  string
		want string
	}{
		{path, "https://sso.example.com/realms/acme", "acme"},
		{path, "https://sso.example.com/realms/Acme_2", "Acme_2"},
		{host, "https://acme.auth.example.com/", "acme"},
		{guid, "https://login.microsoftonline.com/8f3c2a71-5d0e-4b8a-9c61-2e7f4d9a0b13/v2.0", "8f3c2a71-5d0e-4b8a-9c61-2e7f4d9a0b13"},
	} {
		if got, ok := c.tm.match(c.iss); !ok || got != c.want {
			t.Errorf("%s: got %q, %v; want %q", c.iss, got, ok, c.want)
		}
	}
	for _, iss := range []string{
		"https://sso.example.com/realms/acme/", "https://sso.example.com/realms/", "http://sso.example.com/realms/acme",
		"https://sso.example.com.evil.com/realms/acme", "https://acme.auth.example.com", "https://acme.auth.example.com/x",
		"https://login.microsoftonline.com/common/v2.0", "https://login.microsoftonline.com/8F3C2A71-5D0E-4B8A-9C61-2E7F4D9A0B13/v2.0x",
	} {
		for _, tm := range []*template{path, host, guid} {
			if got, ok := tm.match(iss); ok {
				t.Errorf("%s matched %s…%s as %q", iss, tm.prefix, tm.suffix, got)
			}
		}
	}
}

func TestIssuerTemplateValidation(t *testing.T) {
	base := func() IssuerConfig {
		return IssuerConfig{Name: "kc", IssuerTemplate: "https://sso.example.com/realms/{tenant}", Discovery: true,
			Audiences: []string{"api"}, Algorithms: []string{"RS256"}, Tenants: &TenantsConfig{Allow: []string{"acme"}}}
	}
	if p := func() IssuerConfig { return base() }(); len(p.Validate()) > 0 {
		t.Fatalf("valid template refused: %v", p.Validate())
	}
	cases := map[string]func(c *IssuerConfig){
		"issuer: set issuer or issuer_template": func(c *IssuerConfig) { c.Issuer = "https://sso.example.com/realms/acme" },
		"tenants: required":                     func(c *IssuerConfig) { c.Tenants = nil },
		"tenants: set exactly one":              func(c *IssuerConfig) { c.Tenants.Any = true },
		"tenants.allow[1]":                      func(c *IssuerConfig) { c.Tenants.Allow = append(c.Tenants.Allow, "../x") },
		"no key source":                         func(c *IssuerConfig) { c.Discovery = false },
		"issuer_template: a query":              func(c *IssuerConfig) { c.IssuerTemplate += "?a=1" },
		"tenant_pattern":                        func(c *IssuerConfig) { c.TenantPattern = "(" },
		"tenants.file":                          func(c *IssuerConfig) { c.Tenants = &TenantsConfig{File: "/nonexistent/tenants"} },
		"issuer_template: \"http://sso.example.com": func(c *IssuerConfig) {
			c.IssuerTemplate = "http://sso.example.com/realms/{tenant}"
		},
	}
	for want, mod := range cases {
		c := base()
		mod(&c)
		p := strings.Join(c.Validate(), "\n")
		if !strings.Contains(p, want) {
			t.Errorf("want a problem %q, got:\n%s", want, p)
		}
	}
	plain := IssuerConfig{Name: "p", Issuer: "https://idp.example.com", JWKSURI: "https://idp.example.com/jwks",
		Audiences: []string{"api"}, Algorithms: []string{"RS256"}, Tenants: &TenantsConfig{Any: true}}
	if p := strings.Join(plain.Validate(), "\n"); !strings.Contains(p, "tenants: only used with issuer_template") {
		t.Errorf("tenants on a plain issuer: %s", p)
	}
}

// TestTenantKeepsNoTokenBytes: a token's claims are slices of one copy of
// its payload (decodeString), so a tenant's name taken from its iss must be
// copied before the tenant is held: otherwise every tenant would keep its
// first token's bytes for as long as it is held.
func TestTenantKeepsNoTokenBytes(t *testing.T) {
	idp := idptest.NewTenants(t)
	idp.Add("acme")
	v, err := New([]IssuerConfig{{Name: "realms", IssuerTemplate: idp.URL() + "/realms/{tenant}", Discovery: true,
		Tenants: &TenantsConfig{Any: true}, Audiences: []string{"api"}, Algorithms: []string{"ES256"}}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	v.Start(ctx)
	res, err := v.Verify(ctx, idp.Mint("acme", "api", nil), Policy{Issuers: []string{"realms"}})
	if err != nil {
		t.Fatal(err)
	}
	iss := res.Claims.String("iss")
	held := res.Issuer.tenant
	start, end := uintptr(unsafe.Pointer(unsafe.StringData(iss))), uintptr(unsafe.Pointer(unsafe.StringData(iss)))+uintptr(len(iss))
	if p := uintptr(unsafe.Pointer(unsafe.StringData(held))); held != "acme" || p >= start && p < end {
		t.Fatalf("the tenant held (%q) is a slice of the token's iss", held)
	}
}
