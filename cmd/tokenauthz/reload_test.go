package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// writeAtomically replaces path the way kubelet and editors do: a new file
// renamed over the old one.
func writeAtomically(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// startReloading runs the service on the config file at path, watching it
// for changes, and returns its Check client and HTTP base URL.
func startReloading(t *testing.T, path string) (authv3.AuthorizationClient, string) {
	t.Helper()
	cfg, err := loadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	httpLis, _ := net.Listen("tcp", "127.0.0.1:0")
	c := authv3.NewAuthorizationClient(runService(t, cfg, nil, httpLis, withReload(path, make(chan os.Signal))).conn)
	return c, "http://" + httpLis.Addr().String()
}

// checkCode sends c a GET of path with tok as the bearer token and returns
// the answer's code (Internal for a gRPC error).
func checkCode(c authv3.AuthorizationClient, path, tok string) codes.Code {
	resp, err := c.Check(context.Background(), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: path, Host: "api", Headers: map[string]string{"authorization": "Bearer " + tok}}}}})
	if err != nil {
		return codes.Internal
	}
	return codes.Code(resp.GetStatus().GetCode())
}

// postRevoke posts body to an instance's admin API at base with the admin
// token and returns the HTTP status.
func postRevoke(t *testing.T, base, admin, body string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, base+"/admin/revoke", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+admin)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestReloadUnderLoad(t *testing.T) {
	ka, kb := idptest.NewKey(t, "a", "ES256"), idptest.NewKey(t, "b", "ES256")
	idpA, idpB := idptest.New(t, ka), idptest.New(t, kb)
	issuerA := fmt.Sprintf(`  - { name: a, issuer: "%s", audiences: [api], jwks_uri: "%s", algorithms: [ES256] }`, idpA.URL(), idpA.JWKSURL())
	issuerB := fmt.Sprintf(`  - { name: b, issuer: "%s", audiences: [api], jwks_uri: "%s", algorithms: [ES256] }`, idpB.URL(), idpB.JWKSURL())
	before := "issuers:\n" + issuerA + "\n" + issuerB + "\nroutes:\n  - { name: all, match: { path_prefix: / } }\n"
	after := "issuers:\n" + issuerA + "\nroutes:\n  - { name: new, match: { path_prefix: /new }, scopes: [new:read] }\n  - { name: all, match: { path_prefix: / } }\n"

	dir := t.TempDir()
	path := filepath.Join(dir, "config.yaml")
	writeAtomically(t, path, before)
	cfg, err := loadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	httpLis, _ := net.Listen("tcp", "127.0.0.1:0")
	hup := make(chan os.Signal, 1)
	c := authv3.NewAuthorizationClient(runService(t, cfg, nil, httpLis, withReload(path, hup)).conn)
	check := func(path, tok string) codes.Code { return checkCode(c, path, tok) }
	tokA := idptest.Mint(t, ka, idpA.Claims("api"))
	tokB := idptest.Mint(t, kb, idpB.Claims("api"))
	waitFor(t, func() bool { return check("/orders", tokA) == codes.OK && check("/orders", tokB) == codes.OK })

	// A steady stream: every answer must be the old config's or the new
	// one's; an error or a 503 is a failure of the swap.
	var stop atomic.Bool
	var checks, failures atomic.Int64
	var wg sync.WaitGroup
	firstFailure := make(chan string, 1)
	expect := []struct {
		path, tok string
		ok        []codes.Code
	}{
		{"/orders", tokA, []codes.Code{codes.OK}},
		{"/orders", tokB, []codes.Code{codes.OK, codes.Unauthenticated}}, // issuer b removed
		{"/new/1", tokA, []codes.Code{codes.OK, codes.PermissionDenied}}, // route new added
	}
	for i := range 4 {
		wg.Go(func() {
			for n := i; !stop.Load(); n++ {
				e := expect[n%len(expect)]
				got := check(e.path, e.tok)
				checks.Add(1)
				okay := false
				for _, w := range e.ok {
					okay = okay || got == w
				}
				if !okay {
					failures.Add(1)
					select {
					case firstFailure <- fmt.Sprintf("%s with token of %s: %v", e.path, e.tok[:8], got):
					default:
					}
				}
			}
		})
	}
	hitsA := idpA.JWKSHits.Load()
	writeAtomically(t, path, after)
	waitFor(t, func() bool {
		return check("/orders", tokB) == codes.Unauthenticated && check("/new/1", tokA) == codes.PermissionDenied
	})
	if check("/orders", tokA) != codes.OK {
		t.Fatal("issuer a's tokens fail after the reload")
	}

	// An invalid config is rejected and the one in force stays.
	writeAtomically(t, path, after+"bogus_key: 1\n")
	waitFor(t, func() bool {
		return value(scrape(t, "http://"+httpLis.Addr().String()), "tokenauthz_config_reloads_total", map[string]string{"result": "rejected"}) >= 1
	})
	stop.Store(true)
	wg.Wait()
	select {
	case f := <-firstFailure:
		t.Errorf("%d of %d checks failed during the reloads; first: %s", failures.Load(), checks.Load(), f)
	default:
	}
	t.Logf("%d checks across two reloads, %d failed", checks.Load(), failures.Load())
	if check("/orders", tokB) != codes.Unauthenticated || check("/new/1", tokA) != codes.PermissionDenied || check("/orders", tokA) != codes.OK {
		t.Fatal("the rejected config changed decisions")
	}
	if n := idpA.JWKSHits.Load(); n != hitsA {
		t.Errorf("the unchanged issuer refetched its keys on reload (%d → %d)", hitsA, n)
	}

	// SIGHUP reloads too (here the valid config back).
	writeAtomically(t, path, before)
	hup <- os.Interrupt
	waitFor(t, func() bool { return check("/orders", tokB) == codes.OK })
	if v := value(scrape(t, "http://"+httpLis.Addr().String()), "tokenauthz_config_reloads_total", map[string]string{"result": "ok"}); v < 2 {
		t.Errorf("reloads ok = %v", v)
	}
}

// TestReferencedFilesReload: a change to a file the config names (here a
// key set in another directory, an HMAC secret and the admin token) is put
// in force without SIGHUP, validated like the config: a broken file is
// rejected and the one in force stays.
func TestReferencedFilesReload(t *testing.T) {
	ka, kb := idptest.NewKey(t, "a", "ES256"), idptest.NewKey(t, "b", "ES256")
	jwks := func(k *idptest.Key) string {
		b, err := json.Marshal(map[string]any{"keys": []any{k.JWK(t)}})
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	dir, secrets := t.TempDir(), t.TempDir()
	jwksFile, hmacFile, adminFile := filepath.Join(secrets, "jwks.json"), filepath.Join(secrets, "hmac"), filepath.Join(secrets, "admin")
	writeAtomically(t, jwksFile, jwks(ka))
	writeAtomically(t, hmacFile, strings.Repeat("1", 32))
	writeAtomically(t, adminFile, "first-admin-token-0123456789abcdef")
	path := filepath.Join(dir, "config.yaml")
	writeAtomically(t, path, fmt.Sprintf(`server: { admin_token_file: %q }
issuers:
  - { name: main, issuer: "https://idp.example", audiences: [api], jwks_file: %q, hmac_secret_file: %q, algorithms: [ES256, HS256] }
routes:
  - { name: all, match: { path_prefix: / } }
`, adminFile, jwksFile, hmacFile))
	c, base := startReloading(t, path)
	check := func(tok string) codes.Code { return checkCode(c, "/orders", tok) }
	claims := func() map[string]any {
		return map[string]any{"iss": "https://idp.example", "aud": "api", "sub": "u", "exp": time.Now().Add(time.Hour).Unix()}
	}
	tokA, tokB := idptest.Mint(t, ka, claims()), idptest.Mint(t, kb, claims())
	hs := func(secret string) string {
		return idptest.Sign(t, "HS256", []byte(secret), map[string]any{"alg": "HS256", "typ": "JWT"}, claims())
	}
	revoke := func(admin string) int {
		return postRevoke(t, base, admin, `{"token_sha256":"`+strings.Repeat("a", 64)+`"}`)
	}
	if check(tokA) != codes.OK || check(tokB) != codes.Unauthenticated || check(hs(strings.Repeat("1", 32))) != codes.OK {
		t.Fatal("the initial files are not in force")
	}

	writeAtomically(t, jwksFile, jwks(kb))
	waitFor(t, func() bool { return check(tokB) == codes.OK })
	if check(tokA) != codes.Unauthenticated {
		t.Error("the key set file's old key is still accepted")
	}
	writeAtomically(t, hmacFile, strings.Repeat("2", 32))
	waitFor(t, func() bool { return check(hs(strings.Repeat("2", 32))) == codes.OK })
	writeAtomically(t, adminFile, "second-admin-token-0123456789abcdef")
	waitFor(t, func() bool { return revoke("second-admin-token-0123456789abcdef") == http.StatusOK })
	if got := revoke("first-admin-token-0123456789abcdef"); got != http.StatusUnauthorized {
		t.Errorf("the old admin token answers %d", got)
	}

	// A broken key set, and a secret too short, are rejected: nothing changes.
	for _, bad := range []struct{ file, content string }{{jwksFile, `{"keys": [`}, {hmacFile, "short"}} {
		before := value(scrape(t, base), "tokenauthz_config_reloads_total", map[string]string{"result": "rejected"})
		writeAtomically(t, bad.file, bad.content)
		waitFor(t, func() bool {
			return value(scrape(t, base), "tokenauthz_config_reloads_total", map[string]string{"result": "rejected"}) > before
		})
		if check(tokB) != codes.OK || check(hs(strings.Repeat("2", 32))) != codes.OK {
			t.Fatalf("a rejected %s changed decisions", filepath.Base(bad.file))
		}
	}
}

// TestReadSettled: a file read while a writer is still at it (each read
// differs from the one before) is read until two reads agree, so a
// half-written config that happens to parse is not what gets validated.
func TestReadSettled(t *testing.T) {
	reads := []string{"routes:\n  - a\n", "routes:\n  - a\n  - b\n", "routes:\n  - a\n  - b\n  - c\n", "routes:\n  - a\n  - b\n  - c\n"}
	n, pauses := 0, 0
	got, err := readSettledWith(func() ([]byte, error) { n++; return []byte(reads[min(n, len(reads))-1]), nil }, func() { pauses++ })
	if err != nil || string(got) != reads[3] || n != 4 {
		t.Fatalf("got %q after %d reads (%v), want the complete file after 4", got, n, err)
	}
	// A file that never holds still is given up on after a bound; what is
	// read then is validated like any other.
	n = 0
	if _, err := readSettledWith(func() ([]byte, error) { n++; return []byte(fmt.Sprint(n)), nil }, func() {}); err != nil || n > 41 {
		t.Fatalf("%d reads of a changing file (%v)", n, err)
	}
}

// TestRevocationUsesTheIssuersInForce: after a reload that changes an
// issuer's issuer URL, or adds an issuer, revocations by jti and sub name
// the issuers of the config in force.
func TestRevocationUsesTheIssuersInForce(t *testing.T) {
	k := idptest.NewKey(t, "a", "ES256")
	jwks, err := json.Marshal(map[string]any{"keys": []any{k.JWK(t)}})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	adminFile := filepath.Join(dir, "admin")
	writeAtomically(t, adminFile, adminToken)
	conf := func(issuers ...string) string {
		c := fmt.Sprintf("server: { admin_token_file: %q }\nissuers:\n", adminFile)
		for i, iss := range issuers {
			c += fmt.Sprintf("  - { name: i%d, issuer: %q, audiences: [api], jwks: '%s', algorithms: [ES256] }\n", i, iss, jwks)
		}
		return c + "routes:\n  - { name: all, match: { path_prefix: / } }\n"
	}
	path := filepath.Join(dir, "config.yaml")
	writeAtomically(t, path, conf("https://old.example"))
	c, base := startReloading(t, path)
	tok := func(iss, jti, sub string) string {
		return idptest.Mint(t, k, map[string]any{"iss": iss, "aud": "api", "sub": sub, "jti": jti, "iat": time.Now().Unix() - 10,
			"exp": time.Now().Add(time.Hour).Unix()})
	}
	check := func(tok string) codes.Code { return checkCode(c, "/x", tok) }
	revoke := func(body string) int { return postRevoke(t, base, adminToken, body) }
	// Changed at once, before the watch may even have started: a change
	// between the first read and the watch is not lost either.
	writeAtomically(t, path, conf("https://new.example", "https://added.example"))
	waitFor(t, func() bool { return check(tok("https://added.example", "j0", "u")) == codes.OK })
	if got := revoke(`{"jti":"j1","issuer":"i0"}`); got != http.StatusOK {
		t.Fatalf("revoke by jti: %d", got)
	}
	if got := revoke(`{"sub":"bob","issuer":"i1"}`); got != http.StatusOK {
		t.Fatalf("revoke by sub on an added issuer: %d", got)
	}
	if check(tok("https://new.example", "j1", "u")) != codes.Unauthenticated {
		t.Error("a jti revoked after the reload is still allowed")
	}
	if check(tok("https://added.example", "j2", "bob")) != codes.Unauthenticated {
		t.Error("a subject of an issuer added by reload could not be revoked")
	}
	if check(tok("https://new.example", "j3", "u")) != codes.OK {
		t.Error("an unrevoked token was refused")
	}
}

// TestOperatorSettingsTakeEffect (issue 20, class 9): revocation by jti or
// sub matches claims of any JSON scalar type; an admin token added by a
// reload turns the admin API on at once; a reload that changes a setting
// read only at start is refused and says a restart is needed.
func TestOperatorSettingsTakeEffect(t *testing.T) {
	k := idptest.NewKey(t, "a", "ES256")
	jwks, err := json.Marshal(map[string]any{"keys": []any{k.JWK(t)}})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	adminFile := filepath.Join(dir, "admin")
	writeAtomically(t, adminFile, adminToken)
	conf := func(server string) string {
		return fmt.Sprintf("server: { %s }\nissuers:\n  - { name: main, issuer: https://idp.example, audiences: [api], jwks: '%s', algorithms: [ES256] }\n"+
			"routes:\n  - { name: all, match: { path_prefix: / } }\n", server, jwks)
	}
	path := filepath.Join(dir, "config.yaml")
	writeAtomically(t, path, conf("log_level: info"))
	c, base := startReloading(t, path)
	if got := postRevoke(t, base, adminToken, `{"jti":"7","issuer":"main"}`); got != http.StatusNotFound {
		t.Fatalf("the admin API without a token answers %d, want 404", got)
	}
	writeAtomically(t, path, conf(fmt.Sprintf("log_level: info, admin_token_file: %q", adminFile)))
	waitFor(t, func() bool { return postRevoke(t, base, adminToken, `{"jti":"7","issuer":"main"}`) == http.StatusOK })

	tok := func(jti, sub any) string {
		return idptest.Mint(t, k, map[string]any{"iss": "https://idp.example", "aud": "api", "sub": sub, "jti": jti,
			"iat": time.Now().Unix() - 10, "exp": time.Now().Add(time.Hour).Unix()})
	}
	check := func(tok string) codes.Code { return checkCode(c, "/x", tok) }
	for _, jti := range []any{7, 7.0, json.Number("7e0"), "7"} {
		if got := check(tok(jti, "u")); got != codes.Unauthenticated {
			t.Errorf("jti %v (%T), revoked as \"7\": %v", jti, jti, got)
		}
	}
	if got := postRevoke(t, base, adminToken, `{"sub":"true","issuer":"main"}`); got != http.StatusOK {
		t.Fatalf("revoke by sub: %d", got)
	}
	if check(tok("j1", true)) != codes.Unauthenticated || check(tok("j2", 8)) != codes.OK || check(tok(70, "u")) != codes.OK {
		t.Error("revocation by scalar claims matched the wrong tokens")
	}

	before := value(scrape(t, base), "tokenauthz_config_reloads_total", map[string]string{"result": "rejected"})
	writeAtomically(t, path, conf(fmt.Sprintf("log_level: debug, admin_token_file: %q", adminFile)))
	waitFor(t, func() bool {
		return value(scrape(t, base), "tokenauthz_config_reloads_total", map[string]string{"result": "rejected"}) > before
	})
}
