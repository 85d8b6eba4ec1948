package authz_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// onAll checks tok on every pod at once and returns the answers' codes and
// the slowest answer's time.
func onAll(t *testing.T, pods []*instance, tok string) ([]codes.Code, time.Duration) {
	t.Helper()
	got := make([]codes.Code, len(pods))
	var slowest time.Duration
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Go(func() {
			start := time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			resp, err := p.c.Check(ctx, req{headers: bearer(tok)}.proto())
			if err != nil {
				t.Errorf("pod %d: %v", i, err)
				return
			}
			mu.Lock()
			got[i], slowest = codes.Code(resp.GetStatus().GetCode()), max(slowest, time.Since(start))
			mu.Unlock()
		})
	}
	wg.Wait()
	return got, slowest
}

func all(cs []codes.Code, want codes.Code) bool {
	for _, c := range cs {
		if c != want {
			return false
		}
	}
	return true
}

// TestFleetFollowsASlowOrFailingProvider: six pods on one real Redis, with
// a provider slower than lock_wait. Pods that need what another pod is
// fetching follow it for as long as it works, so a rotation costs one key
// fetch and a new opaque token one introspection; when the holder's call
// fails, every pod answers 503 at once, within the provider's time plus a
// margin, instead of waiting out lock_wait and calling the provider
// themselves.
func TestFleetFollowsASlowOrFailingProvider(t *testing.T) {
	rs := redistest.Start(t)
	f := newIntroFixture(t, "client_secret_basic")
	f.cfg.Issuers[0].Introspection.Timeout = 4 * time.Second
	f.cfg.Issuers[0].Keys = verify.KeysConfig{MinRefreshInterval: 100 * time.Millisecond}
	rc := redisConfig(t, rs, fleetKey)
	rc.LockWait = time.Second // the default: shorter than the provider
	var pods []*instance
	for range 6 {
		pods = append(pods, startInstance(t, f.cfg, rc))
	}
	for _, p := range pods {
		p.waitReady(t)
	}
	f.idp.SetJWKSDelay(1500 * time.Millisecond)
	f.idp.SetDelay(1500 * time.Millisecond)

	// A rotation: a token with the new kid on every pod at once.
	k2 := idptest.NewKey(t, "k2", "RS256")
	f.idp.SetKeys(f.key, k2)
	keyHits := f.idp.JWKSHits.Load()
	c := f.idp.Claims(aud)
	c["iat"], c["exp"] = f.clk.Unix(), f.clk.Unix()+3600
	got, took := onAll(t, pods, idptest.Mint(t, k2, c))
	if !all(got, codes.OK) {
		t.Fatalf("new kid on six pods: %v", got)
	}
	if n := f.idp.JWKSHits.Load() - keyHits; n != 1 {
		t.Errorf("one rotation, six pods, a 1.5 s provider: %d key fetches, want 1", n)
	}
	t.Logf("rotation: slowest pod answered after %v", took.Round(time.Millisecond))

	// Five new opaque tokens, each on every pod at once.
	introHits := f.idp.IntrospectionHits.Load()
	var wg sync.WaitGroup
	for range 5 {
		tok := f.opaque(nil)
		wg.Go(func() {
			if got, _ := onAll(t, pods, tok); !all(got, codes.OK) {
				t.Errorf("an opaque token on six pods: %v", got)
			}
		})
	}
	wg.Wait()
	if n := f.idp.IntrospectionHits.Load() - introHits; n != 5 {
		t.Errorf("five tokens, six pods, a 1.5 s provider: %d introspections, want 5", n)
	}

	// The provider fails (slowly): the holder publishes its failure and
	// every pod answers 503 at once.
	f.idp.ForceReply(503, []byte("down"))
	introHits = f.idp.IntrospectionHits.Load()
	got, took = onAll(t, pods, f.opaque(nil))
	if !all(got, codes.Unavailable) {
		t.Fatalf("a failing provider: %v, want 503 everywhere", got)
	}
	if n := f.idp.IntrospectionHits.Load() - introHits; n != 1 {
		t.Errorf("a failing provider was called %d times for one token on six pods, want 1", n)
	}
	// Loose on purpose (noisy machines, -race): the call count above is
	// what tells following from not; this bounds the wait by the
	// provider's time plus a margin.
	if limit := 1500*time.Millisecond + 2*time.Second; took > limit {
		t.Errorf("the slowest pod answered 503 after %v, more than the provider's time plus a margin (%v)", took, limit)
	}
	t.Logf("holder failed: the slowest pod answered 503 after %v", took.Round(time.Millisecond))
}
