package main

import (
	"bytes"
	"encoding/xml"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestPolicyTestCommand: tokenauthz test on a passing suite (the demo's)
// and a failing one: exit codes, the failing case's steps, a JUnit file
// that parses, and coverage naming the unexercised rule.
func TestPolicyTestCommand(t *testing.T) {
	var out, errb bytes.Buffer
	if code := cli([]string{"test", "../../deploy/demo"}, &out, &errb); code != 0 {
		t.Fatalf("the demo suite: exit %d\n%s%s", code, out.String(), errb.String())
	}
	if !strings.Contains(out.String(), "8 passed, 0 failed") {
		t.Errorf("summary:\n%s", out.String())
	}

	dir := t.TempDir()
	cfg := `issuers:
  - { name: main, issuer: https://idp.example, audiences: [api], algorithms: [RS256], discovery: true,
      introspection: { endpoint: https://idp.example/introspect, client_id: x, client_secret_file: /nonexistent/s },
      userinfo: { endpoint: https://idp.example/userinfo } }
routes:
  - name: tenants
    match: { path_prefix: /tenants }
    when: ["request.path.startsWith('/tenants/' + claims.tid + '/')"]
  - { name: profile, match: { path_prefix: /me }, userinfo: true, claims: { userinfo.email_verified: true } }
  - { name: unused, match: { path_prefix: /unused } }
headers: { x-user-id: sub, x-email: userinfo.email }
`
	suite := `config: config.yaml
tokens:
  acme: { issuer: main, claims: { sub: u1, tid: acme } }
userinfo: { u1: { email: u1@acme.test, email_verified: true } }
introspection: { "opaque-1": { active: true, sub: u1, aud: api } }
cases:
  - name: own tenant
    request: { path: /tenants/acme/orders, token: acme }
    expect: { decision: allow, headers: { x-user-id: u1 } }
  - name: userinfo from the suite
    request: { path: /me, token: acme }
    expect: { decision: allow, headers: { x-email: u1@acme.test } }
  - name: opaque token introspected
    request: { path: /tenants/acme/x, token: opaque-1 }
    expect: { decision: deny, status: 403, reason: when_error }
  - name: this expectation is wrong
    request: { path: /tenants/other/orders, token: acme }
    expect: { decision: allow }
`
	_ = os.WriteFile(filepath.Join(dir, "config.yaml"), []byte(cfg), 0o600)
	_ = os.WriteFile(filepath.Join(dir, "tenants_test.yaml"), []byte(suite), 0o600)
	junit := filepath.Join(dir, "junit.xml")
	out.Reset()
	errb.Reset()
	code := cli([]string{"test", "--junit", junit, "--coverage", dir}, &out, &errb)
	if code != 1 {
		t.Fatalf("a failing suite: exit %d\n%s%s", code, out.String(), errb.String())
	}
	o := out.String()
	for _, want := range []string{"ok    tenants_test.yaml: own tenant", "ok    tenants_test.yaml: userinfo from the suite",
		"ok    tenants_test.yaml: opaque token introspected",
		"FAIL  tenants_test.yaml: this expectation is wrong: decision deny, want allow",
		"when request.path.startsWith", // the failing case's steps, as check prints them
		"route unused: no case reached it", "3 passed, 1 failed"} {
		if !strings.Contains(o, want) {
			t.Errorf("output lacks %q:\n%s", want, o)
		}
	}
	b, err := os.ReadFile(junit)
	if err != nil {
		t.Fatal(err)
	}
	var js struct {
		Tests    int `xml:"tests,attr"`
		Failures int `xml:"failures,attr"`
		Cases    []struct {
			Name    string `xml:"name,attr"`
			Failure *struct {
				Message string `xml:"message,attr"`
			} `xml:"failure"`
		} `xml:"testcase"`
	}
	if err := xml.Unmarshal(b, &js); err != nil || js.Tests != 4 || js.Failures != 1 || js.Cases[3].Failure == nil {
		t.Errorf("junit: %v %+v\n%s", err, js, b)
	}
}

// TestRecipeSuites: docs/policy.md's recipes are test files that
// tokenauthz test runs: each recipe's block stands unchanged in its
// config in docs/recipes, and every case passes.
func TestRecipeSuites(t *testing.T) {
	doc, err := os.ReadFile("../../docs/policy.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := regexp.MustCompile("(?s)```yaml\n# recipe: ([a-z-]+)\n(.*?)```").FindAllStringSubmatch(string(doc), -1)
	if len(blocks) < 7 {
		t.Fatalf("%d recipes in docs/policy.md", len(blocks))
	}
	for _, b := range blocks {
		cfg, err := os.ReadFile(filepath.Join("../../docs/recipes", b[1]+".yaml"))
		if err != nil || !strings.Contains(string(cfg), b[2]) {
			t.Errorf("docs/recipes/%s.yaml does not hold the recipe as docs/policy.md shows it (%v)", b[1], err)
		}
		if _, err := os.Stat(filepath.Join("../../docs/recipes", b[1]+"_test.yaml")); err != nil {
			t.Errorf("recipe %s has no test file", b[1])
		}
	}
	var out, errb bytes.Buffer
	if code := cli([]string{"test", "../../docs/recipes"}, &out, &errb); code != 0 || !strings.Contains(out.String(), " 0 failed") {
		t.Errorf("the recipes' suites: exit %d\n%s%s", code, out.String(), errb.String())
	}
}
