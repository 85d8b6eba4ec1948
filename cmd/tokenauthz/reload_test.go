package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

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
	check := func(path, tok string) codes.Code {
		resp, err := c.Check(context.Background(), &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
				Method: "GET", Path: path, Host: "api", Headers: map[string]string{"authorization": "Bearer " + tok}}}}})
		if err != nil {
			return codes.Internal
		}
		return codes.Code(resp.GetStatus().GetCode())
	}
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
