package authz_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/proto/cachev1"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// instance is one tokenauthz pod: a verifier on the shared Redis tier,
// started like serve starts it, behind a real Check server.
type instance struct {
	c      authv3.AuthorizationClient
	v      *verify.Verifier
	shared *cache.Shared
	logs   *logBuffer
}

func startInstance(t *testing.T, cfg *authz.Config, rc *cache.RedisConfig) *instance {
	t.Helper()
	logs := &logBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	shared, err := cache.NewShared(rc, cache.SharedOptions{Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = shared.Close() })
	v, err := verify.New(cfg.Issuers, verify.Options{Shared: shared, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	v.Start(ctx)
	return &instance{c: startWith(t, cfg, v), v: v, shared: shared, logs: logs}
}

func (in *instance) waitReady(t *testing.T) {
	t.Helper()
	eventually(t, "keys loaded", in.v.Ready)
}

// eventually polls cond for up to 10s; it bounds a wait, it does not time
// anything.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 10s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func redisConfig(t *testing.T, rs *redistest.Server, hmacKey string) *cache.RedisConfig {
	// Generous timeouts: these tests count provider calls, and on a loaded
	// machine (-race, packages in parallel) a 100ms Redis timeout would turn
	// a slow answer into a miss and a call. A dead Redis fails fast anyway.
	rc := &cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 2 * time.Second, BreakerCooldown: 300 * time.Millisecond,
		LockWait: 3 * time.Second}
	if hmacKey != "" {
		f := filepath.Join(t.TempDir(), "hmac")
		if err := os.WriteFile(f, []byte(hmacKey), 0o600); err != nil {
			t.Fatal(err)
		}
		rc.HMACKeyFile = f
	}
	return rc
}

const fleetKey = "0123456789abcdef0123456789abcdef-fleet"

func TestFleetSharesKeySetsAndAnswers(t *testing.T) {
	rs := redistest.Start(t)
	f := newIntroFixture(t, "client_secret_basic")
	f.idp.SetJWKSDelay(200 * time.Millisecond) // both pods' first loads overlap
	rc := redisConfig(t, rs, fleetKey)
	a := startInstance(t, f.cfg, rc)
	b := startInstance(t, f.cfg, rc)
	a.waitReady(t)
	b.waitReady(t)
	if n := f.idp.JWKSHits.Load(); n != 1 {
		t.Fatalf("two pods starting together fetched the key set %d times, want 1", n)
	}
	f.idp.SetJWKSDelay(0)
	jwt := f.jwt(t)
	allowed(t, check(t, a.c, req{headers: bearer(jwt)}))
	allowed(t, check(t, b.c, req{headers: bearer(jwt)}))

	tok := f.opaque(nil)
	allowed(t, check(t, a.c, req{headers: bearer(tok)}))
	allowed(t, check(t, b.c, req{headers: bearer(tok)}))
	if n := f.idp.IntrospectionHits.Load(); n != 1 {
		t.Fatalf("one token checked on two pods: %d introspection calls, want 1", n)
	}

	// A new token hit by both pods at once: one pod calls the provider, the
	// other waits for its answer in Redis.
	f.idp.SetDelay(200 * time.Millisecond)
	fresh := f.opaque(nil)
	var wg sync.WaitGroup
	failures := make(chan string, 40)
	for i := range 40 {
		pod := a
		if i%2 == 1 {
			pod = b
		}
		wg.Go(func() {
			resp, err := pod.c.Check(context.Background(), req{headers: bearer(fresh)}.proto())
			if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.OK {
				failures <- resp.GetStatus().GetMessage()
			}
		})
	}
	wg.Wait()
	close(failures)
	for m := range failures {
		t.Errorf("a concurrent check failed: %q", m)
	}
	if n := f.idp.IntrospectionHits.Load(); n != 2 {
		t.Fatalf("40 concurrent checks on two pods: %d introspection calls in all, want 2 (one per token)", n)
	}
	if n := f.idp.JWKSHits.Load(); n != 1 {
		t.Fatalf("key set fetched %d times, want 1", n)
	}
}

func TestRotationSeenByOnePodReachesTheOthers(t *testing.T) {
	rs := redistest.Start(t)
	f := newIntroFixture(t, "client_secret_basic")
	rc := redisConfig(t, rs, "")
	a := startInstance(t, f.cfg, rc)
	a.waitReady(t)
	b := startInstance(t, f.cfg, rc)
	b.waitReady(t)
	if n := f.idp.JWKSHits.Load(); n != 1 {
		t.Fatalf("key set fetched %d times by two pods, want 1", n)
	}

	k2 := idptest.NewKey(t, "k2", "RS256")
	f.idp.SetKeys(f.key, k2)
	c := f.idp.Claims(aud)
	tok := idptest.Mint(t, k2, c)
	allowed(t, check(t, a.c, req{headers: bearer(tok)})) // unknown kid: pod a refetches
	if n := f.idp.JWKSHits.Load(); n != 2 {
		t.Fatalf("rotation: %d fetches, want 2", n)
	}
	allowed(t, check(t, b.c, req{headers: bearer(tok)}))
	if n := f.idp.JWKSHits.Load(); n != 2 {
		t.Fatalf("pod b fetched the rotated set itself (%d fetches); it should have come from redis", n)
	}
}

func TestRedisOutageKeepsDecisionsFlowing(t *testing.T) {
	rs := redistest.Start(t)
	f := newIntroFixture(t, "client_secret_basic")
	rc := redisConfig(t, rs, fleetKey)
	a := startInstance(t, f.cfg, rc)
	b := startInstance(t, f.cfg, rc)
	a.waitReady(t)
	b.waitReady(t)
	jwt := f.jwt(t)

	var lat []time.Duration
	run := func(n int) {
		for range n {
			for _, tok := range []string{jwt, f.opaque(nil)} {
				start := time.Now()
				resp, err := a.c.Check(context.Background(), req{headers: bearer(tok)}.proto())
				lat = append(lat, time.Since(start))
				if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.OK {
					t.Fatalf("check failed during the outage: %v %v", err, resp.GetStatus())
				}
			}
		}
	}
	run(50)
	rs.Kill()
	run(100) // Redis gone: memory and the provider carry on, no errors
	if st := a.shared.BreakerState(); st != "open" && st != "half-open" {
		t.Errorf("breaker %s after Redis died, want open", st)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	t.Logf("latency across the outage (not asserted): p50 %v, p99 %v, max %v",
		lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1])

	rs.Restart()
	// The tier recovers by itself: once the breaker lets a probe through, a
	// token one pod introspects is served to the other from Redis.
	eventually(t, "redis tier back in use", func() bool {
		tok := f.opaque(nil)
		allowed(t, check(t, a.c, req{headers: bearer(tok)}))
		before := f.idp.IntrospectionHits.Load()
		allowed(t, check(t, b.c, req{headers: bearer(tok)}))
		return f.idp.IntrospectionHits.Load() == before
	})
}

func TestTamperedRedisEntriesAreRejected(t *testing.T) {
	rs := redistest.Start(t)
	rdb := rs.Client()
	f := newIntroFixture(t, "client_secret_basic")
	a := startInstance(t, f.cfg, redisConfig(t, rs, fleetKey))
	a.waitReady(t)
	ctx := context.Background()

	// An attacker with write access to Redis plants an active answer for a
	// token of their choosing, and a key set with their own key.
	forged := "attacker-chosen-token"
	plant := func(key string, payload []byte) {
		e, _ := proto.Marshal(&cachev1.Entry{Schema: uint32(cachev1.Schema_SCHEMA_VERSION),
			ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano(), Payload: payload, Mac: make([]byte, 32)})
		if err := rdb.Set(ctx, key, e, time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
	}
	answer, _ := proto.Marshal(&cachev1.ProviderAnswer{Ok: true,
		ClaimsJson: []byte(`{"sub":"admin","aud":"` + aud + `","scope":"orders:write"}`)})
	// The issuer's part of the key is its name and config identity, as a's
	// entries show.
	tok := f.opaque(nil)
	allowed(t, check(t, a.c, req{headers: bearer(tok)}))
	real, _ := rdb.Keys(ctx, "tokenauthz:v1:answer:introspection:main.*:"+cache.Hash(tok)).Result()
	if len(real) != 1 {
		t.Fatalf("answer keys %v", real)
	}
	plant(strings.TrimSuffix(real[0], cache.Hash(tok))+cache.Hash(forged), answer)

	evil := idptest.NewKey(t, "k1", "RS256") // same kid as the real key
	set := jwk.NewSet()
	_ = set.AddKey(evil.JWK(t))
	doc, _ := json.Marshal(set)
	keyNames, _ := rdb.Keys(ctx, "tokenauthz:v1:keys:*").Result()
	if len(keyNames) != 1 {
		t.Fatalf("key sets in redis: %v", keyNames)
	}
	snap, _ := proto.Marshal(&cachev1.KeySetSnapshot{Jwks: doc, FetchedUnixNano: time.Now().Add(time.Minute).UnixNano(),
		RefreshUnixNano: time.Now().Add(time.Hour).UnixNano()})
	plant(keyNames[0], snap)
	evilTok := idptest.Mint(t, evil, f.idp.Claims(aud))

	// The control: a pod without the key takes the planted entries, which is
	// the attack the HMAC key stops.
	c := startInstance(t, f.cfg, redisConfig(t, rs, ""))
	c.waitReady(t)
	allowed(t, check(t, c.c, req{headers: bearer(forged)}))
	allowed(t, check(t, c.c, req{headers: bearer(evilTok)}))

	// A pod with the fleet's HMAC key ignores both and asks the provider.
	b := startInstance(t, f.cfg, redisConfig(t, rs, fleetKey))
	b.waitReady(t)
	denied(t, check(t, b.c, req{headers: bearer(forged)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	denied(t, check(t, b.c, req{headers: bearer(evilTok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	allowed(t, check(t, b.c, req{headers: bearer(f.jwt(t))}))
	if b.shared.Rejected.Load() < 2 || !strings.Contains(b.logs.String(), "HMAC check failed") {
		t.Fatalf("rejections %d, logs:\n%s", b.shared.Rejected.Load(), b.logs.String())
	}
	if strings.Contains(b.logs.String(), forged) {
		t.Fatal("the log names the token")
	}
}

func TestRedisEntriesExpireWithTheirTTL(t *testing.T) {
	rs := redistest.Start(t)
	rdb := rs.Client()
	f := newIntroFixture(t, "client_secret_basic")
	a := startInstance(t, f.cfg, redisConfig(t, rs, ""))
	a.waitReady(t)
	ctx := context.Background()
	pttl := func(tok string) time.Duration {
		keys, err := rdb.Keys(ctx, "tokenauthz:v1:answer:introspection:main.*:"+cache.Hash(tok)).Result()
		if err != nil || len(keys) != 1 {
			t.Fatalf("answer keys %v %v", keys, err)
		}
		d, err := rdb.PTTL(ctx, keys[0]).Result()
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	short := f.idp.Opaque(map[string]any{"iss": f.idp.URL(), "sub": "u", "aud": aud, "exp": time.Now().Unix() + 10})
	long := f.opaque(nil) // exp in an hour: bounded by cache_ttl (30s)
	allowed(t, check(t, a.c, req{headers: bearer(short)}))
	allowed(t, check(t, a.c, req{headers: bearer(long)}))
	denied(t, check(t, a.c, req{headers: bearer("inactive-token")}), codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	for _, c := range []struct {
		name     string
		got      time.Duration
		min, max time.Duration
	}{
		{"exp in 10s", pttl(short), 7 * time.Second, 10 * time.Second},
		{"exp in 1h, cache_ttl 30s", pttl(long), 27 * time.Second, 30 * time.Second},
		{"inactive, negative_cache_ttl 5s", pttl("inactive-token"), 2 * time.Second, 5 * time.Second},
	} {
		if c.got < c.min || c.got > c.max {
			t.Errorf("%s: redis TTL %v, want %v..%v", c.name, c.got, c.min, c.max)
		}
	}
	keyNames, _ := rdb.Keys(ctx, "tokenauthz:v1:keys:*").Result()
	if len(keyNames) != 1 {
		t.Fatalf("key sets in redis: %v", keyNames)
	}
	// refresh_interval 15m + max_stale 24h: kept as long as it may serve.
	if d, _ := rdb.PTTL(ctx, keyNames[0]).Result(); d < 24*time.Hour || d > 24*time.Hour+15*time.Minute {
		t.Errorf("key set TTL %v, want about 24h15m", d)
	}
	// No key holds a raw token.
	all, _ := rdb.Keys(ctx, "*").Result()
	for _, k := range all {
		for _, tok := range []string{short, long, "inactive-token"} {
			if strings.Contains(k, tok) {
				t.Errorf("redis key %q contains a raw token", k)
			}
		}
	}
}

// TestProviderCallsSavedByRedis counts provider calls for one workload on
// four pods, without and with the shared tier: every one of 100 opaque
// tokens and one JWT is checked on every pod. The figures go in the README.
func TestProviderCallsSavedByRedis(t *testing.T) {
	const pods, tokens = 4, 100
	workload := func(shared bool) (jwks, introspections int64) {
		f := newIntroFixture(t, "client_secret_basic")
		var rs *redistest.Server
		if shared {
			rs = redistest.Start(t)
		}
		var fleet []authv3.AuthorizationClient
		for range pods {
			if shared {
				in := startInstance(t, f.cfg, redisConfig(t, rs, fleetKey))
				in.waitReady(t)
				fleet = append(fleet, in.c)
			} else {
				fleet = append(fleet, start(t, f.cfg, nil))
			}
		}
		jwt := f.jwt(t)
		for range tokens {
			tok := f.opaque(nil)
			for _, c := range fleet {
				allowed(t, check(t, c, req{headers: bearer(tok)}))
				allowed(t, check(t, c, req{headers: bearer(jwt)}))
			}
		}
		return f.idp.JWKSHits.Load(), f.idp.IntrospectionHits.Load()
	}
	j0, i0 := workload(false)
	j1, i1 := workload(true)
	t.Logf("%d pods, %d tokens each checked on every pod: in-process only: %d key set fetches, %d introspections; with redis: %d, %d",
		pods, tokens, j0, i0, j1, i1)
	if i0 != pods*tokens || j0 != pods {
		t.Errorf("without redis: %d introspections, %d fetches; want %d, %d", i0, j0, pods*tokens, pods)
	}
	if i1 != tokens || j1 != 1 {
		t.Errorf("with redis: %d introspections, %d fetches; want %d, 1", i1, j1, tokens)
	}
}
