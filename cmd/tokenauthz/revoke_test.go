package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

const adminToken = "admin-token-0123456789abcdef0123456789"

type pod struct {
	check    func(token string) codes.Code
	adminURL string
}

// startPod runs the service (run, as serve does) on cfgYAML.
func startPod(t *testing.T, cfgYAML string) *pod {
	t.Helper()
	cfg, err := parseConfig([]byte(cfgYAML), "test")
	if err != nil {
		t.Fatal(err)
	}
	httpLis, _ := net.Listen("tcp", "127.0.0.1:0")
	c := authv3.NewAuthorizationClient(runService(t, cfg, nil, httpLis).conn)
	p := &pod{adminURL: "http://" + httpLis.Addr().String()}
	p.check = func(token string) codes.Code {
		resp, err := c.Check(context.Background(), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
				Method: "GET", Path: "/orders", Host: "api", Headers: map[string]string{"authorization": "Bearer " + token}}}}})
		if err != nil {
			t.Fatalf("Check: %v", err)
		}
		return codes.Code(resp.GetStatus().GetCode())
	}
	waitFor(t, func() bool {
		r, err := http.Get(p.adminURL + "/readyz")
		if err == nil {
			r.Body.Close()
		}
		return err == nil && r.StatusCode == 200
	})
	return p
}

func TestFleetWideRevocation(t *testing.T) {
	rs := redistest.Start(t)
	key := idptest.NewKey(t, "k1", "ES256")
	idp := idptest.New(t, key)
	dir := t.TempDir()
	tokFile := filepath.Join(dir, "admin-token")
	if err := os.WriteFile(tokFile, []byte(adminToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`
server: { admin_token_file: %s }
cache:
  redis: { addrs: ["%s"], timeout: 2s }
issuers:
  - { name: main, issuer: "%s", audiences: [api], jwks_uri: "%s", algorithms: [ES256] }
routes:
  - { name: all, match: { path_prefix: / } }
`, tokFile, rs.Addr(), idp.URL(), idp.JWKSURL())
	a, b := startPod(t, cfg), startPod(t, cfg)

	mint := func(sub, jti string, iat int64) string {
		return idptest.Mint(t, key, map[string]any{"iss": idp.URL(), "aud": "api", "sub": sub, "jti": jti,
			"iat": iat, "exp": time.Now().Unix() + 3600})
	}
	now := time.Now().Unix()
	stolen := mint("alice", "j-stolen", now-10)
	aliceOld, aliceOther := mint("alice", "j-1", now-60), mint("alice", "j-2", now-30)
	bob := mint("bob", "j-3", now-10)
	for _, tok := range []string{stolen, aliceOld, aliceOther, bob} {
		for _, p := range []*pod{a, b} {
			if c := p.check(tok); c != codes.OK {
				t.Fatalf("before any revocation: %v", c)
			}
		}
	}

	// revokeOn calls the admin API of pod a, then measures how long until
	// both pods deny (bounded by 10s; the figure is logged, not asserted).
	revokeOn := func(body string, tokens ...string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, a.adminURL+"/admin/revoke", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+adminToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("admin revoke %s: HTTP %d %s", body, resp.StatusCode, out)
		}
		start := time.Now()
		for _, p := range []*pod{a, b} {
			for _, tok := range tokens {
				waitFor(t, func() bool { return p.check(tok) == codes.Unauthenticated })
			}
		}
		t.Logf("%s: denied on both pods %v after the call", body, time.Since(start))
	}
	revokeOn(`{"jti":"j-stolen","issuer":"main"}`, stolen)
	if a.check(aliceOld) != codes.OK || b.check(bob) != codes.OK {
		t.Fatal("a jti revocation took other tokens with it")
	}
	revokeOn(`{"sub":"alice","issuer":"main","ttl":"2h"}`, aliceOld, aliceOther)
	for _, p := range []*pod{a, b} {
		if p.check(bob) != codes.OK {
			t.Fatal("revoking alice took bob's token")
		}
	}
	// alice logs in again: a token issued after the revocation passes.
	if c := b.check(mint("alice", "j-new", time.Now().Unix()+2)); c != codes.OK {
		t.Fatalf("alice's new token: %v", c)
	}

	// The CLI: the token is hashed locally, only the hash is sent.
	var stdout, stderr bytes.Buffer
	t.Setenv("TOKENAUTHZ_ADMIN_TOKEN", adminToken)
	if code := cli([]string{"revoke", "--admin", b.adminURL, "--token", bob}, &stdout, &stderr); code != 0 {
		t.Fatalf("revoke CLI: exit %d: %s", code, stderr.String())
	}
	if !strings.Contains(stdout.String(), `"revoked":"token"`) {
		t.Errorf("CLI output %q", stdout.String())
	}
	waitFor(t, func() bool { return a.check(bob) == codes.Unauthenticated })

	// The admin API refuses a wrong token and malformed requests.
	for _, c := range []struct {
		auth, body string
		want       int
	}{
		{"Bearer wrong", `{"jti":"x","issuer":"main"}`, 401},
		{"", `{"jti":"x","issuer":"main"}`, 401},
		{"Bearer " + adminToken, `{"jti":"x","issuer":"nope"}`, 400},
		{"Bearer " + adminToken, `{"jti":"x","sub":"y","issuer":"main"}`, 400},
		{"Bearer " + adminToken, `{"token_sha256":"not-hex"}`, 400},
		{"Bearer " + adminToken, `{"jti":"x","issuer":"main","ttl":"-1h"}`, 400},
		{"Bearer " + adminToken, `{"jti":"x","issuer":"main","extra":1}`, 400},
	} {
		req, _ := http.NewRequest(http.MethodPost, a.adminURL+"/admin/revoke", strings.NewReader(c.body))
		if c.auth != "" {
			req.Header.Set("Authorization", c.auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Errorf("%q %s: HTTP %d, want %d", c.auth, c.body, resp.StatusCode, c.want)
		}
	}
}
