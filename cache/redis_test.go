package cache_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/proto/cachev1"
)

func TestRedisConfigBuildsTheRightClient(t *testing.T) {
	pw := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pw, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		cfg   cache.RedisConfig
		check func(t *testing.T, c redis.UniversalClient)
	}{
		{"single node", cache.RedisConfig{Addrs: []string{"10.0.0.1:6379"}, DB: 2, Username: "authz", PasswordFile: pw},
			func(t *testing.T, c redis.UniversalClient) {
				o := c.(*redis.Client).Options()
				if o.Addr != "10.0.0.1:6379" || o.DB != 2 || o.Username != "authz" || o.Password != "s3cret" {
					t.Errorf("options %+v", o)
				}
				if o.MaxRetries != 0 || o.ReadTimeout != 100*time.Millisecond {
					t.Errorf("retries %d, read timeout %v: Redis must be quick to give up", o.MaxRetries, o.ReadTimeout)
				}
			}},
		{"cluster by addresses", cache.RedisConfig{Addrs: []string{"a:6379", "b:6379", "c:6379"}},
			func(t *testing.T, c redis.UniversalClient) {
				if o := c.(*redis.ClusterClient).Options(); len(o.Addrs) != 3 {
					t.Errorf("cluster addrs %v", o.Addrs)
				}
			}},
		{"cluster by configuration endpoint", cache.RedisConfig{Addrs: []string{"cfg.cache.example:6379"}, Cluster: true},
			func(t *testing.T, c redis.UniversalClient) { _ = c.(*redis.ClusterClient) }},
		{"sentinel", cache.RedisConfig{Addrs: []string{"s1:26379", "s2:26379"}, MasterName: "mymaster", SentinelPasswordFile: pw},
			func(t *testing.T, c redis.UniversalClient) {
				if o := c.(*redis.Client).Options(); o.Addr != "FailoverClient" {
					t.Errorf("not a Sentinel failover client: %+v", o.Addr)
				}
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o, err := tc.cfg.UniversalOptions()
			if err != nil {
				t.Fatal(err)
			}
			c := redis.NewUniversalClient(o)
			defer c.Close()
			tc.check(t, c)
		})
	}
}

func TestRedisConfigValidation(t *testing.T) {
	short := filepath.Join(t.TempDir(), "short")
	_ = os.WriteFile(short, []byte("too-short"), 0o600)
	cfg := cache.Config{MaxBytes: 10, Redis: &cache.RedisConfig{
		Addrs: []string{"no-port"}, DB: 1, Cluster: true, PasswordFile: "/nonexistent/pw", HMACKeyFile: short,
		TLS: &cache.TLS{CertFile: "x.pem"}, Timeout: -1,
	}}
	got := strings.Join(cfg.Validate(), "\n")
	for _, want := range []string{"cache.max_bytes", "cache.redis.addrs[0]", "cache.redis.db", "cache.redis.password",
		"cache.redis.hmac_key_file: at least 32 bytes", "cache.redis.password_file:", "cache.redis.tls", "cache.redis.timeout"} {
		if !strings.Contains(got, want) {
			t.Errorf("validation lacks %q:\n%s", want, got)
		}
	}
	if p := (&cache.Config{Redis: &cache.RedisConfig{}}).Validate(); len(p) == 0 {
		t.Error("a redis block without addresses passed validation")
	}
}

func TestBreakerSkipsADeadRedisAndRecovers(t *testing.T) {
	rs := redistest.Start(t)
	s, err := cache.NewShared(&cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 2 * time.Second, BreakerFailures: 3, BreakerCooldown: 200 * time.Millisecond}, cache.SharedOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	key := s.Key("k")
	s.Set(ctx, key, []byte("v"), time.Now().Add(time.Minute))
	if p, _, ok := s.Get(ctx, key); !ok || string(p) != "v" {
		t.Fatalf("get after set: %q %v", p, ok)
	}
	rs.Kill()
	for range 3 {
		if _, _, ok := s.Get(ctx, key); ok {
			t.Fatal("a dead Redis answered")
		}
	}
	if s.BreakerState() != "open" {
		t.Fatalf("breaker %s after 3 failures, want open", s.BreakerState())
	}
	errs := s.Errors.Load()
	s.Get(ctx, key)
	if s.BreakerState() != "open" || s.Errors.Load() != errs+1 {
		t.Fatal("an open breaker still sent the command (or did not count it)")
	}
	// A lock cannot be had from a dead Redis: the caller fetches itself.
	if _, state := s.Acquire(ctx, "x"); state != cache.Unreachable {
		t.Fatalf("Acquire with Redis down: %v, want Unreachable (the caller fetches itself)", state)
	}
	rs.Restart()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.Set(ctx, key, []byte("again"), time.Now().Add(time.Minute))
		if p, _, ok := s.Get(ctx, key); ok && string(p) == "again" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after Redis came back; breaker %s", s.BreakerState())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if s.BreakerState() != "closed" {
		t.Fatalf("breaker %s after recovery", s.BreakerState())
	}
}

func TestFleetLockIsExclusiveRenewedAndReleased(t *testing.T) {
	rs := redistest.Start(t)
	s, err := cache.NewShared(&cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 2 * time.Second, LockTTL: 300 * time.Millisecond}, cache.SharedOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	lease, state := s.Acquire(ctx, "fetch")
	if state != cache.Acquired {
		t.Fatal("first Acquire failed")
	}
	if _, state := s.Acquire(ctx, "fetch"); state != cache.HeldElsewhere {
		t.Fatal("the lock was granted twice")
	}
	// A holder that works longer than the lease keeps it.
	time.Sleep(time.Second)
	if _, state := s.Acquire(ctx, "fetch"); state != cache.HeldElsewhere {
		t.Fatal("the lease was not renewed while its holder worked")
	}
	lease.Release()
	l2, state := s.Acquire(ctx, "fetch")
	if state != cache.Acquired {
		t.Fatal("the lock was not released")
	}
	defer l2.Release()
	if ttl := rs.Client().PTTL(ctx, s.Key("lock:fetch")).Val(); ttl <= 0 || ttl > 300*time.Millisecond {
		t.Fatalf("lock TTL %v: a dead holder must not block the fleet for long", ttl)
	}
}

// TestFollowTheHolder: a follower waits as long as the holder works, and
// takes its result, or its published failure, at once.
func TestFollowTheHolder(t *testing.T) {
	rs := redistest.Start(t)
	s, err := cache.NewShared(&cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 2 * time.Second, LockWait: 100 * time.Millisecond,
		LockTTL: 300 * time.Millisecond}, cache.SharedOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	lease, _ := s.Acquire(ctx, "a")
	var result atomic.Bool
	go func() { time.Sleep(700 * time.Millisecond); result.Store(true); lease.Release() }() // slower than lock_wait and the lease
	if err := s.Follow(ctx, "a", 5*time.Second, result.Load); err != nil || !result.Load() {
		t.Fatalf("follow: %v (result %v)", err, result.Load())
	}
	lease, _ = s.Acquire(ctx, "b")
	go func() { s.MarkUnavailable(ctx, "b", "HTTP 503", cache.UnavailableTTL); lease.Release() }()
	var hf *cache.HolderFailed
	if err := s.Follow(ctx, "b", 5*time.Second, func() bool { return false }); !errors.As(err, &hf) || hf.Reason != "HTTP 503" {
		t.Fatalf("follow a failing holder: %v", err)
	}
	if got, ok := s.Unavailable(ctx, "b"); !ok || got.Reason != "HTTP 503" {
		t.Fatal("the failure is not there for pods asking next")
	}
	if err := s.Follow(ctx, "nobody", 5*time.Second, func() bool { return false }); !errors.Is(err, cache.ErrNoHolder) {
		t.Fatalf("follow without a holder: %v", err)
	}
}

// TestNoOrphanLockAfterFreeze: a lock taken while Redis is frozen
// (SIGSTOP) times out for its caller; when Redis resumes and the queued SET
// lands, the caller's fenced release removes it.
func TestNoOrphanLockAfterFreeze(t *testing.T) {
	rs := redistest.Start(t)
	s, err := cache.NewShared(&cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 100 * time.Millisecond, LockTTL: 5 * time.Second,
		BreakerFailures: 100}, cache.SharedOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	s.Set(ctx, s.Key("warm"), []byte("x"), time.Now().Add(time.Minute)) // a live connection
	rs.Freeze()
	if _, state := s.Acquire(ctx, "frozen"); state != cache.Unreachable {
		t.Fatalf("Acquire on a frozen Redis: %v, want Unreachable", state)
	}
	rs.Thaw()
	c := rs.Client()
	deadline := time.Now().Add(3 * time.Second) // well within the 5 s lock TTL
	for c.Exists(ctx, s.Key("lock:frozen")).Val() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the lock taken during the freeze is orphaned")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// denylistPod is one pod's denylist on rs, resyncing every interval.
func denylistPod(t *testing.T, rs *redistest.Server, rc cache.RedisConfig, interval time.Duration) *cache.Denylist {
	t.Helper()
	rc.Addrs = []string{rs.Addr()}
	s, err := cache.NewShared(&rc, cache.SharedOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	d := cache.NewDenylist(s, nil)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go d.Run(ctx, interval)
	return d
}

func TestDenylist(t *testing.T) {
	rs := redistest.Start(t)
	newPod := func() *cache.Denylist {
		return denylistPod(t, rs, cache.RedisConfig{Timeout: 2 * time.Second}, time.Hour)
	}
	a := newPod()
	ctx := context.Background()
	iss := "https://idp.example"
	revoked := time.Now().Unix()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(a.Revoke(ctx, &cachev1.Revocation{Kind: cachev1.Revocation_KIND_TOKEN, Id: cache.Hash("tok-1"), RevokedUnix: revoked}, time.Hour))
	must(a.Revoke(ctx, &cachev1.Revocation{Kind: cachev1.Revocation_KIND_SUBJECT, Id: cache.Hash(iss, "alice"), RevokedUnix: revoked}, time.Hour))

	// A pod started later loads what is already there.
	b := newPod()
	token := func(raw, sub, jti string, iat time.Time) cache.Token {
		return cache.Token{TokenHash: func() string { return cache.Hash(raw) }, Issuer: iss, Sub: sub, JTI: jti, IAT: iat}
	}
	before := time.Unix(revoked-60, 0)
	for _, d := range []*cache.Denylist{a, b} {
		eventuallyTrue(t, "revocations loaded", func() bool { return d.Len() == 2 })
		if kind, ok := d.Revoked(token("tok-1", "bob", "", before)); !ok || kind != "token" {
			t.Errorf("revoked token passed: %q %v", kind, ok)
		}
		if _, ok := d.Revoked(token("tok-2", "alice", "", before)); !ok {
			t.Error("a token of a revoked subject issued before the revocation passed")
		}
		if _, ok := d.Revoked(token("tok-3", "alice", "", time.Time{})); !ok {
			t.Error("a token of a revoked subject without iat passed")
		}
		if _, ok := d.Revoked(token("tok-4", "alice", "", time.Unix(revoked+1, 0))); ok {
			t.Error("a token issued after the subject's revocation was refused")
		}
		if _, ok := d.Revoked(token("tok-5", "bob", "", before)); ok {
			t.Error("another user's token was refused")
		}
	}
	// A revocation made while b runs reaches it through the nudge.
	must(a.Revoke(ctx, &cachev1.Revocation{Kind: cachev1.Revocation_KIND_JTI, Id: cache.Hash(iss, "j-9"), RevokedUnix: revoked}, time.Hour))
	eventuallyTrue(t, "jti revocation reached pod b", func() bool { _, ok := b.Revoked(token("t", "bob", "j-9", before)); return ok })
	if _, ok := b.Revoked(cache.Token{Issuer: "https://other.example", JTI: "j-9"}); ok {
		t.Error("a jti revocation spilled over to another issuer")
	}
	if ttl := rs.Client().PTTL(ctx, "tokenauthz:v1:deny:2:"+cache.Hash(iss, "j-9")).Val(); ttl < 59*time.Minute || ttl > time.Hour {
		t.Errorf("revocation TTL in redis %v, want 1h", ttl)
	}
	if err := a.Revoke(ctx, &cachev1.Revocation{Kind: cachev1.Revocation_KIND_TOKEN, Id: "short"}, time.Hour); err == nil {
		t.Error("a malformed revocation was accepted")
	}
}

func eventuallyTrue(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 10s: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// BenchmarkGetFromRedis is a memory miss answered by the Redis tier (a real
// redis-server on loopback): one GET, the envelope check, the decode, and
// the write-back to memory; what a pod pays for an answer another pod
// fetched. The memory entry is dropped before each Get.
func BenchmarkGetFromRedis(b *testing.B) {
	for _, hmacKey := range []string{"", "0123456789abcdef0123456789abcdef"} {
		name := "no-hmac"
		if hmacKey != "" {
			name = "hmac"
		}
		b.Run(name, func(b *testing.B) {
			rs := redistest.Start(b)
			rc := &cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: time.Second}
			if hmacKey != "" {
				b.Setenv("BENCH_HMAC", hmacKey)
				rc.HMACKeyEnv = "BENCH_HMAC"
			}
			s, err := cache.NewShared(rc, cache.SharedOptions{})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			c := cache.New(cache.Options{}, strSize)
			c.Share(s, "bench:", cache.Codec[string]{
				Encode: func(v string) ([]byte, error) { return []byte(v), nil },
				Decode: func(p []byte) (string, error) { return string(p), nil },
			})
			answer := `{"active":true,"sub":"user-1","scope":"orders:read","client_id":"web","exp":1999999999,"aud":"orders-api"}`
			load := func(context.Context) (string, time.Duration, error) { return answer, time.Hour, nil }
			ctx := context.Background()
			if _, src, err := c.Get(ctx, "k", load); err != nil || src != cache.FromOrigin {
				b.Fatalf("first get: %v %v", src, err)
			}
			b.ReportAllocs()
			for b.Loop() {
				c.Delete("k")
				if _, src, err := c.Get(ctx, "k", load); err != nil || src != cache.FromRedis {
					b.Fatalf("get: %v %v", src, err)
				}
			}
		})
	}
}

// TestRevocationsSurviveRedisLosingData: revocations held by running pods
// are written back after Redis loses its data (FLUSHALL, a restart without
// persistence), so a pod started afterwards refuses the revoked tokens; a
// revocation taken while Redis was down reaches Redis when it returns.
func TestRevocationsSurviveRedisLosingData(t *testing.T) {
	rs := redistest.Start(t)
	newPod := func() *cache.Denylist {
		return denylistPod(t, rs, cache.RedisConfig{Timeout: 500 * time.Millisecond, BreakerCooldown: 100 * time.Millisecond}, 100*time.Millisecond)
	}
	ctx := context.Background()
	iss := "https://idp.example"
	rev := func(sub string) *cachev1.Revocation {
		return &cachev1.Revocation{Kind: cachev1.Revocation_KIND_SUBJECT, Id: cache.Hash(iss, sub), RevokedUnix: time.Now().Unix()}
	}
	revoked := func(d *cache.Denylist, sub string) bool {
		_, ok := d.Revoked(cache.Token{Issuer: iss, Sub: sub})
		return ok
	}
	a := newPod()
	if err := a.Revoke(ctx, rev("alice"), time.Hour); err != nil {
		t.Fatal(err)
	}
	keys := func() int { return len(rs.Client().Keys(ctx, "tokenauthz:v1:deny:*").Val()) }

	// FLUSHALL: pod a writes alice back; a new pod loads her.
	rs.Client().FlushAll(ctx)
	eventuallyTrue(t, "alice written back after FLUSHALL", func() bool { return keys() == 1 })
	b := newPod()
	eventuallyTrue(t, "a pod started after FLUSHALL refuses alice", func() bool { return revoked(b, "alice") })

	// A restart without persistence, and a revocation taken while Redis is
	// down (it holds on pod a only, until Redis is back).
	rs.Kill()
	if err := a.Revoke(ctx, rev("bob"), time.Hour); err == nil {
		t.Error("a revocation with Redis down reported that the fleet has it")
	}
	rs.Restart()
	eventuallyTrue(t, "alice and bob written back after the restart", func() bool { return keys() == 2 })
	c := newPod()
	eventuallyTrue(t, "a pod started after the restart refuses alice and bob", func() bool { return revoked(c, "alice") && revoked(c, "bob") })
	// Pod b holds alice too, so after the restart either pod may be the one
	// that writes her back: count both.
	if n := a.WrittenBack.Load() + b.WrittenBack.Load(); n < 3 {
		t.Errorf("written back %d times by pods a and b, want at least 3 (alice twice, bob once)", n)
	}
	// TTLs survive the write-back.
	if ttl := rs.Client().PTTL(ctx, "tokenauthz:v1:deny:3:"+cache.Hash(iss, "bob")).Val(); ttl < 50*time.Minute || ttl > time.Hour {
		t.Errorf("bob's TTL after write-back %v, want about 1h", ttl)
	}
}
