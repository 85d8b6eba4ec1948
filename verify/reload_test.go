package verify

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

func TestReloadKeepsUnchangedIssuers(t *testing.T) {
	k1, k2 := idptest.NewKey(t, "k1", "RS256"), idptest.NewKey(t, "k2", "ES256")
	idp1, idp2 := idptest.New(t, k1), idptest.New(t, k2)
	secret := filepath.Join(t.TempDir(), "hs")
	if err := os.WriteFile(secret, []byte("0123456789abcdef0123456789abcdef"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgs := []IssuerConfig{
		{Name: "one", Issuer: idp1.URL(), Audiences: []string{"a"}, JWKSURI: idp1.JWKSURL(), Algorithms: []string{"RS256"}},
		{Name: "two", Issuer: idp2.URL(), Audiences: []string{"a"}, JWKSURI: idp2.JWKSURL(), Algorithms: []string{"ES256"}},
		{Name: "hs", Issuer: "https://hs.example", Audiences: []string{"a"}, HMACSecretFile: secret, Algorithms: []string{"HS256"}},
	}
	v, err := New(cfgs, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	v.Start(ctx)
	deadline := time.Now().Add(10 * time.Second)
	for !v.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("keys not loaded")
		}
		time.Sleep(5 * time.Millisecond)
	}

	// Change issuer two, keep one, and rotate hs's secret file in place.
	next := append([]IssuerConfig(nil), cfgs...)
	next[1].Audiences = []string{"b"}
	if err := os.WriteFile(secret, []byte("fedcba9876543210fedcba9876543210"), 0o600); err != nil {
		t.Fatal(err)
	}
	nv, err := v.Reload(next)
	if err != nil {
		t.Fatal(err)
	}
	nv.Start(ctx)
	v.Retire(nv)
	if nv.byName["one"] != v.byName["one"] {
		t.Error("an unchanged issuer was rebuilt: its keys and refresh loop are lost")
	}
	if nv.byName["two"] == v.byName["two"] || nv.byName["hs"] == v.byName["hs"] {
		t.Error("a changed issuer (config or secret file) was kept")
	}
	if v.byName["two"].stop == nil || nv.byName["one"].stop == nil {
		t.Fatal("issuers not started")
	}
	if idp1.JWKSHits.Load() != 1 {
		t.Errorf("the kept issuer fetched its keys %d times", idp1.JWKSHits.Load())
	}
	// The retired issuer's refresh loop is stopped: its context is done.
	if !v.byName["two"].src.(*remoteKeys).stopped(t) {
		t.Error("the replaced issuer's refresh loop still runs")
	}
	if nv.byName["one"].src.(*remoteKeys).stopped(t) {
		t.Error("the kept issuer's refresh loop was stopped")
	}
}

// stopped reports whether r's refresh loop has ended, by waiting briefly
// for run to return.
func (r *remoteKeys) stopped(t *testing.T) bool {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if r.running.Load() == 0 {
			return true
		}
		time.Sleep(5 * time.Millisecond)
	}
	return false
}
