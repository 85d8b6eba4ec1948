package verify

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// TestProofKeyCacheBounded (issue 20, class 8): proof keys are kept by
// bytes and age, so a flood of distinct keys evicts instead of growing, and
// keys that fail to parse are not kept at all.
func TestProofKeyCacheBounded(t *testing.T) {
	p := newProofs(&DPoPConfig{}, 0, time.Now, nil, "https://idp.example", newDPoPMemory(time.Now))
	n := 20000
	if testing.Short() {
		n = 12000
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range n {
		pub, _, err := ed25519.GenerateKey(nil)
		if err != nil {
			t.Fatal(err)
		}
		raw := fmt.Sprintf(`{"kty":"OKP","crv":"Ed25519","x":%q}`, base64.RawURLEncoding.EncodeToString(pub))
		if _, err := p.key([]byte(raw)); err != nil {
			t.Fatalf("key %d: %v", i, err)
		}
	}
	time.Sleep(100 * time.Millisecond) // otter applies evictions asynchronously
	runtime.GC()
	runtime.ReadMemStats(&after)
	held := p.mem.keys.Stats().Entries
	if limit := proofKeyCacheBytes / (256 + 32 + 64); held > limit+limit/10 {
		t.Errorf("%d distinct keys: %d held, want at most about %d (%d bytes)", n, held, limit, proofKeyCacheBytes)
	}
	if grown := int64(after.HeapAlloc) - int64(before.HeapAlloc); grown > 32<<20 {
		t.Errorf("%d distinct keys grew the heap by %d MiB", n, grown>>20)
	}
	t.Logf("%d distinct proof keys: %d held, heap grew %.1f MiB", n, held, float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/(1<<20))

	// Failures are refused every time and never take a place.
	small := newProofs(&DPoPConfig{}, 0, time.Now, nil, "https://idp.example", newDPoPMemory(time.Now))
	for i := range 100 {
		if _, err := small.key([]byte(fmt.Sprintf(`{"kty":"OKP","crv":"Ed25519","x":"%d"}`, i))); err == nil {
			t.Fatal("a malformed key parsed")
		}
	}
	time.Sleep(50 * time.Millisecond)
	if got := small.mem.keys.Stats().Entries; got != 0 {
		t.Errorf("malformed keys took %d places", got)
	}
}

// TestBucketName (issue 20, class 7): an IPv6 client is charged as its /64,
// so one host cannot take a fresh share with each address of its prefix.
func TestBucketName(t *testing.T) {
	for _, tc := range []struct{ a, b string }{
		{"2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff"},
		{"2001:db8:1:2::1", "2001:db8:1:2::1%eth0"},
		{"192.0.2.1", "192.0.2.1"},
	} {
		if bucketName(tc.a) != bucketName(tc.b) {
			t.Errorf("%s and %s are charged apart: %s, %s", tc.a, tc.b, bucketName(tc.a), bucketName(tc.b))
		}
	}
	for _, tc := range []struct{ a, b string }{
		{"2001:db8:1:2::1", "2001:db8:1:3::1"},
		{"192.0.2.1", "192.0.2.2"},
		{"::ffff:192.0.2.1", "::ffff:192.0.2.2"},
	} {
		if bucketName(tc.a) == bucketName(tc.b) {
			t.Errorf("%s and %s share a bucket: %s", tc.a, tc.b, bucketName(tc.a))
		}
	}
}

// TestCachedTokenNotRescanned (issue 22): a token the verified-token cache
// recognises costs one hash: its syntax is checked on the verifications
// only (the first two: a token is kept from its second), and a token that
// fails it is refused as malformed.
func TestCachedTokenNotRescanned(t *testing.T) {
	key := idptest.NewKey(t, "k", "ES256")
	idp := idptest.New(t, key)
	v, err := New([]IssuerConfig{{Name: "main", Issuer: idp.URL(), Audiences: []string{"api"}, JWKSURI: idp.JWKSURL(), Algorithms: []string{"ES256"}}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	scans := 0
	p := Policy{Issuers: []string{"main"}, Syntax: func(string) bool { scans++; return true }}
	tok := idptest.Mint(t, key, idp.Claims("api"))
	for range 5 {
		if _, err := v.Verify(context.Background(), tok, p); err != nil {
			t.Fatal(err)
		}
	}
	if scans != 2 {
		t.Errorf("the syntax was checked %d times for one token verified 5 times", scans)
	}
	p.Syntax = func(string) bool { return false }
	if _, err := v.Verify(context.Background(), tok+"x", p); AsError(err).Reason != "malformed" {
		t.Errorf("a token failing the syntax: %v", err)
	}
	if _, err := v.Verify(context.Background(), "opaque token", p); AsError(err).Reason != "malformed" {
		t.Errorf("an opaque token failing the syntax: %v", err)
	}
}
