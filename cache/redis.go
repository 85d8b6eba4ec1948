package cache

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
	"google.golang.org/protobuf/proto"

	"github.com/tokenauthz/tokenauthz/proto/cachev1"
)

// RedisConfig is cache.redis in the configuration file. With none, every
// pod keeps its own in-process cache.
type RedisConfig struct {
	// Addrs: one address for a single node; several for a Cluster; the
	// Sentinels' addresses with MasterName.
	Addrs []string `yaml:"addrs"`
	// Cluster forces a Cluster client for a single configuration endpoint.
	Cluster bool `yaml:"cluster"`
	// MasterName selects Sentinel: Addrs are then the Sentinels.
	MasterName string `yaml:"master_name"`
	// Username is the ACL user (Redis 6+); the password comes from a file or
	// an environment variable, never from the config.
	Username     string `yaml:"username"`
	PasswordFile string `yaml:"password_file"`
	PasswordEnv  string `yaml:"password_env"`
	// SentinelPasswordFile / SentinelPasswordEnv authenticate to Sentinels.
	SentinelPasswordFile string `yaml:"sentinel_password_file"`
	SentinelPasswordEnv  string `yaml:"sentinel_password_env"`
	DB                   int    `yaml:"db"`
	TLS                  *TLS   `yaml:"tls"`
	// KeyPrefix namespaces every key. Default "tokenauthz:".
	KeyPrefix string `yaml:"key_prefix"`
	// Timeout bounds every Redis operation (dial, read, write). Default 100ms:
	// Redis is a shortcut, never worth waiting for longer than the provider.
	Timeout time.Duration `yaml:"timeout"`
	// LockWait is the least a pod waits for another pod's fetch of the same
	// entry: it waits as long as the holder works (its lock renewed), up to
	// the provider's timeout, and takes its result or its failure. Default 1s.
	LockWait time.Duration `yaml:"lock_wait"`
	// LockTTL is the fetch lock's lease: its holder renews it while it works,
	// and a dead holder's lock is gone after at most this long. Default 2s.
	LockTTL time.Duration `yaml:"lock_ttl"`
	// HMACKeyFile / HMACKeyEnv hold a key (32+ bytes) that authenticates
	// every entry; pods skip entries that fail the check. Without it, anyone
	// able to write to Redis can plant signing keys or active answers.
	HMACKeyFile string `yaml:"hmac_key_file"`
	HMACKeyEnv  string `yaml:"hmac_key_env"`
	// BreakerFailures consecutive failures open the breaker; Redis is then
	// skipped for BreakerCooldown. Defaults 3 and 5s.
	BreakerFailures int           `yaml:"breaker_failures"`
	BreakerCooldown time.Duration `yaml:"breaker_cooldown"`
}

// TLS configures TLS to Redis.
type TLS struct {
	CAFile     string `yaml:"ca_file"`
	CertFile   string `yaml:"cert_file"`
	KeyFile    string `yaml:"key_file"`
	ServerName string `yaml:"server_name"`
}

func (c *RedisConfig) withDefaults() RedisConfig {
	r := *c
	if r.KeyPrefix == "" {
		r.KeyPrefix = "tokenauthz:"
	}
	if r.Timeout <= 0 {
		r.Timeout = 100 * time.Millisecond
	}
	if r.LockWait <= 0 {
		r.LockWait = time.Second
	}
	if r.LockTTL <= 0 {
		r.LockTTL = 2 * time.Second
	}
	if r.BreakerFailures <= 0 {
		r.BreakerFailures = 3
	}
	if r.BreakerCooldown <= 0 {
		r.BreakerCooldown = 5 * time.Second
	}
	return r
}

// SecretKey names the key a secret came from: prefix_file when a file was
// named, else prefix_env, so a message names a key the config has.
func SecretKey(prefix, file string) string {
	if file != "" {
		return prefix + "_file"
	}
	return prefix + "_env"
}

func secretKey(prefix, file string) string { return SecretKey(prefix, file) }

func (c *RedisConfig) validate() []string {
	var p []string
	if len(c.Addrs) == 0 {
		p = append(p, "cache.redis.addrs: at least one host:port")
	}
	for i, a := range c.Addrs {
		if !strings.Contains(a, ":") {
			p = append(p, fmt.Sprintf("cache.redis.addrs[%d]: %q is not host:port", i, a))
		}
	}
	if c.MasterName == "" && c.Cluster && len(c.Addrs) == 0 {
		p = append(p, "cache.redis.cluster: needs an address")
	}
	if c.DB != 0 && (c.Cluster || len(c.Addrs) > 1 && c.MasterName == "") {
		p = append(p, "cache.redis.db: a Redis Cluster has only database 0")
	}
	if c.PasswordFile != "" && c.PasswordEnv != "" {
		p = append(p, "cache.redis.password_file: set only one of password_file, password_env")
	} else if _, err := ReadSecret(c.PasswordFile, c.PasswordEnv); err != nil {
		p = append(p, secretKey("cache.redis.password", c.PasswordFile)+": "+err.Error())
	}
	if _, err := ReadSecret(c.SentinelPasswordFile, c.SentinelPasswordEnv); err != nil {
		p = append(p, secretKey("cache.redis.sentinel_password", c.SentinelPasswordFile)+": "+err.Error())
	}
	if c.HMACKeyFile != "" && c.HMACKeyEnv != "" {
		p = append(p, "cache.redis.hmac_key_file: set only one of hmac_key_file, hmac_key_env")
	} else if k, err := ReadSecret(c.HMACKeyFile, c.HMACKeyEnv); err != nil {
		p = append(p, secretKey("cache.redis.hmac_key", c.HMACKeyFile)+": "+err.Error())
	} else if k != nil && len(k) < 32 {
		p = append(p, fmt.Sprintf("%s: at least 32 bytes, have %d", secretKey("cache.redis.hmac_key", c.HMACKeyFile), len(k)))
	}
	if c.TLS != nil {
		if _, err := c.TLS.config(); err != nil {
			p = append(p, "cache.redis.tls: "+err.Error())
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"timeout", c.Timeout}, {"lock_wait", c.LockWait}, {"lock_ttl", c.LockTTL}, {"breaker_cooldown", c.BreakerCooldown}} {
		if d.v < 0 {
			p = append(p, "cache.redis."+d.name+": must be positive")
		}
	}
	return p
}

func (t *TLS) config() (*tls.Config, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, err
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no PEM certificates", t.CAFile)
		}
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		return nil, errors.New("cert_file and key_file go together")
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, err
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}

// UniversalOptions maps the config onto go-redis, which picks the client:
// Sentinel when MasterName is set, Cluster for several addresses or Cluster,
// a single node otherwise. Retries are off and every timeout is short: a
// slow Redis must cost a miss, not a stalled request.
func (c *RedisConfig) UniversalOptions() (*redis.UniversalOptions, error) {
	r := c.withDefaults()
	pw, err := ReadSecret(r.PasswordFile, r.PasswordEnv)
	if err != nil {
		return nil, fmt.Errorf("redis password: %w", err)
	}
	spw, err := ReadSecret(r.SentinelPasswordFile, r.SentinelPasswordEnv)
	if err != nil {
		return nil, fmt.Errorf("redis sentinel password: %w", err)
	}
	o := &redis.UniversalOptions{
		Addrs: r.Addrs, MasterName: r.MasterName, IsClusterMode: r.Cluster,
		Username: r.Username, Password: string(pw), SentinelPassword: string(spw), DB: r.DB,
		ClientName: "tokenauthz", DialTimeout: r.Timeout, ReadTimeout: r.Timeout, WriteTimeout: r.Timeout,
		ContextTimeoutEnabled: true, MaxRetries: -1, DialerRetries: 1,
	}
	if r.PasswordFile != "" {
		// Read again for every new connection, so a rotated password file
		// applies without a restart; an unreadable or empty file keeps the
		// last good password.
		var mu sync.Mutex
		cur := string(pw)
		o.CredentialsProvider = func() (string, string) {
			mu.Lock()
			defer mu.Unlock()
			if p, err := ReadSecret(r.PasswordFile, ""); err == nil && len(p) > 0 {
				cur = string(p)
			}
			return r.Username, cur
		}
	}
	if r.TLS != nil {
		if o.TLSConfig, err = r.TLS.config(); err != nil {
			return nil, err
		}
	}
	return o, nil
}

// Source says where a value came from.
type Source string

const (
	FromMemory Source = "memory"
	FromRedis  Source = "redis"
	FromOrigin Source = "origin"
)

// Shared is the Redis tier every pod of a fleet reads and writes. Redis is
// a shortcut, never a dependency: every operation is bounded by a short
// timeout, a circuit breaker skips Redis for a while after repeated
// failures, and every failure is a miss. A Redis problem can cost a provider
// call, never a wrong decision.
type Shared struct {
	rdb      redis.UniversalClient
	prefix   string                  // KeyPrefix + schema, e.g. "tokenauthz:v1:"
	mac      atomic.Pointer[macKeys] // nil: no HMAC
	timeout  time.Duration
	lockWait time.Duration
	lockTTL  time.Duration
	br       *gobreaker.CircuitBreaker[any]
	log      *slog.Logger
	now      func() time.Time

	// Rejected counts entries that failed the HMAC check or did not decode.
	Rejected atomic.Int64
	// Errors counts failed Redis operations (breaker-skipped ones included).
	Errors atomic.Int64
}

// SharedOptions are the dependencies of a Shared tier.
type SharedOptions struct {
	Logger *slog.Logger
	Now    func() time.Time
}

// NewShared connects the Redis tier (lazily: a Redis that is down at start
// is retried by every later operation).
func NewShared(cfg *RedisConfig, o SharedOptions) (*Shared, error) {
	if p := cfg.validate(); len(p) > 0 {
		return nil, errors.New(strings.Join(p, "; "))
	}
	opts, err := cfg.UniversalOptions()
	if err != nil {
		return nil, err
	}
	return newShared(cfg, redis.NewUniversalClient(opts), o)
}

func newShared(cfg *RedisConfig, rdb redis.UniversalClient, o SharedOptions) (*Shared, error) {
	r := cfg.withDefaults()
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	mac, err := ReadSecret(r.HMACKeyFile, r.HMACKeyEnv)
	if err != nil {
		return nil, fmt.Errorf("redis hmac key: %w", err)
	}
	s := &Shared{
		rdb: rdb, prefix: fmt.Sprintf("%sv%d:", r.KeyPrefix, cachev1.Schema_SCHEMA_VERSION),
		timeout: r.Timeout, lockWait: r.LockWait, lockTTL: r.LockTTL, log: o.Logger.With("component", "redis"), now: o.Now,
	}
	if mac != nil {
		s.mac.Store(&macKeys{cur: mac})
	}
	failures := uint32(r.BreakerFailures)
	s.br = gobreaker.NewCircuitBreaker[any](gobreaker.Settings{
		Name:        "redis",
		Timeout:     r.BreakerCooldown,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= failures },
		// A miss is an answer, not a failure.
		IsSuccessful: func(err error) bool { return err == nil || errors.Is(err, redis.Nil) },
		OnStateChange: func(_ string, from, to gobreaker.State) {
			s.log.Warn("redis circuit breaker", "from", from.String(), "to", to.String())
		},
	})
	return s, nil
}

// Client is the underlying go-redis client.
func (s *Shared) Client() redis.UniversalClient { return s.rdb }

// BreakerState is closed, half-open or open.
func (s *Shared) BreakerState() string { return s.br.State().String() }

// Close closes the connections.
func (s *Shared) Close() error { return s.rdb.Close() }

// Key namespaces name under the prefix and schema version.
func (s *Shared) Key(name string) string { return s.prefix + name }

// do runs op through the breaker with the operation timeout.
func (s *Shared) do(ctx context.Context, op func(ctx context.Context) error) error {
	_, err := s.br.Execute(func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.timeout)
		defer cancel()
		return nil, op(ctx)
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		s.Errors.Add(1)
	}
	return err
}

// Get reads the entry under key (from Key). ok is false on a miss, an
// expired or rejected entry, and any Redis failure.
func (s *Shared) Get(ctx context.Context, key string) (payload []byte, expires time.Time, ok bool) {
	var raw []byte
	err := s.do(ctx, func(ctx context.Context) error {
		var err error
		raw, err = s.rdb.Get(ctx, key).Bytes()
		return err
	})
	if err != nil {
		if !errors.Is(err, redis.Nil) && !errors.Is(err, gobreaker.ErrOpenState) {
			s.log.Debug("redis get failed", "error", err)
		}
		return nil, time.Time{}, false
	}
	var e cachev1.Entry
	if err := proto.Unmarshal(raw, &e); err != nil || e.GetSchema() != uint32(cachev1.Schema_SCHEMA_VERSION) {
		s.reject(key, "undecodable entry")
		return nil, time.Time{}, false
	}
	if keys := s.mac.Load(); keys != nil && !hmac.Equal(e.GetMac(), sum(keys.cur, key, &e)) &&
		(keys.prev == nil || !hmac.Equal(e.GetMac(), sum(keys.prev, key, &e))) {
		s.reject(key, "HMAC check failed")
		return nil, time.Time{}, false
	}
	expires = time.Unix(0, e.GetExpiresUnixNano())
	if !s.now().Before(expires) {
		return nil, time.Time{}, false
	}
	return e.GetPayload(), expires, true
}

func (s *Shared) reject(key, why string) {
	s.Rejected.Add(1)
	// The key holds only hashes, so it is safe to log.
	s.log.Warn("redis entry rejected", "key", key, "reason", why)
}

// Set writes payload under key until expires (also the Redis TTL).
func (s *Shared) Set(ctx context.Context, key string, payload []byte, expires time.Time) {
	ttl := expires.Sub(s.now())
	if ttl <= 0 {
		return
	}
	e := &cachev1.Entry{Schema: uint32(cachev1.Schema_SCHEMA_VERSION), ExpiresUnixNano: expires.UnixNano(), Payload: payload}
	if keys := s.mac.Load(); keys != nil {
		e.Mac = sum(keys.cur, key, e)
	}
	raw, err := proto.Marshal(e)
	if err != nil {
		return
	}
	if err := s.do(ctx, func(ctx context.Context) error { return s.rdb.Set(ctx, key, raw, ttl).Err() }); err != nil &&
		!errors.Is(err, gobreaker.ErrOpenState) {
		s.log.Debug("redis set failed", "error", err)
	}
}

// Delete removes key.
func (s *Shared) Delete(ctx context.Context, key string) error {
	return s.do(ctx, func(ctx context.Context) error { return s.rdb.Del(ctx, key).Err() })
}

// sum is the entry's HMAC: it binds the payload to its key, schema and
// expiry, so an entry cannot be replayed under another key or kept alive.
func sum(mac []byte, key string, e *cachev1.Entry) []byte {
	m := hmac.New(sha256.New, mac)
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(key)))
	m.Write(n[:])
	m.Write([]byte(key))
	binary.BigEndian.PutUint32(n[:4], e.GetSchema())
	m.Write(n[:4])
	binary.BigEndian.PutUint64(n[:], uint64(e.GetExpiresUnixNano()))
	m.Write(n[:])
	m.Write(e.GetPayload())
	return m.Sum(nil)
}

// unlockScript deletes the lock only if we still hold it, so a holder whose
// lock expired cannot release another pod's.
var unlockScript = redis.NewScript(`if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end return 0`)

// extendScript renews the lock's lease only if we still hold it.
var extendScript = redis.NewScript(`if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("pexpire", KEYS[1], ARGV[2]) end return 0`)

// LockState is what Acquire found.
type LockState int

const (
	// Acquired: this pod holds the lock and should do the work.
	Acquired LockState = iota
	// HeldElsewhere: another pod holds it; Follow it.
	HeldElsewhere
	// Unreachable: Redis could not be asked; work without coordination
	// (it costs provider calls, never availability).
	Unreachable
)

// Lease is a held fleet lock. It is renewed while its holder works (every
// LockTTL/3), so followers can wait for a slow provider as long as the
// holder is alive, and a dead holder's lock is gone within LockTTL.
type Lease struct {
	s          *Shared
	key, token string
	stop, done chan struct{}
}

// Acquire tries to take the fleet lock for name. A Redis error (a timeout,
// when Redis is frozen) counts as not taken: the SET may still land later,
// so its fenced release is retried in the background until it is sure no
// late lock of ours is left to orphan.
func (s *Shared) Acquire(ctx context.Context, name string) (*Lease, LockState) {
	key := s.Key("lock:" + name)
	tok := make([]byte, 16)
	_, _ = rand.Read(tok)
	val := hex.EncodeToString(tok)
	var got bool
	err := s.do(ctx, func(ctx context.Context) error {
		var err error
		got, err = s.rdb.SetNX(ctx, key, val, s.lockTTL).Result()
		return err
	})
	switch {
	case err != nil:
		if !errors.Is(err, gobreaker.ErrOpenState) {
			go s.releaseLate(key, val)
		}
		return nil, Unreachable
	case !got:
		return nil, HeldElsewhere
	}
	l := &Lease{s: s, key: key, token: val, stop: make(chan struct{}), done: make(chan struct{})}
	go l.renew()
	return l, Acquired
}

func (l *Lease) renew() {
	defer close(l.done)
	t := time.NewTicker(l.s.lockTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			_ = l.s.do(context.Background(), func(ctx context.Context) error {
				return extendScript.Run(ctx, l.s.rdb, []string{l.key}, l.token, l.s.lockTTL.Milliseconds()).Err()
			})
		}
	}
}

// Release stops the renewal and deletes the lock if it is still ours.
func (l *Lease) Release() {
	close(l.stop)
	<-l.done
	_ = l.s.do(context.Background(), func(ctx context.Context) error {
		return unlockScript.Run(ctx, l.s.rdb, []string{l.key}, l.token).Err()
	})
}

// releaseLate deletes a lock whose SET timed out, should it land: fenced by
// its token, retried for the lock's whole lifetime (a command queued in a
// frozen Redis runs when it resumes, possibly after our first DEL).
func (s *Shared) releaseLate(key, token string) {
	deadline := time.Now().Add(s.lockTTL + s.timeout)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
		_ = unlockScript.Run(ctx, s.rdb, []string{key}, token).Err()
		cancel()
		time.Sleep(s.lockTTL / 10)
	}
}

// ErrLocal marks a load failure that is this pod's own (its call budget,
// say), not the provider's: it is not published to the fleet.
var ErrLocal = errors.New("this pod's own limit")

// Follow errors.
var (
	// ErrNoHolder: the lock went away without a result (its holder died, or
	// finished just now without storing one): try again.
	ErrNoHolder = errors.New("the fleet lock was released without a result")
	// ErrFollowTimeout: the holder outlived the bound.
	ErrFollowTimeout = errors.New("the fleet lock holder took too long")
)

// HolderFailed is the failure the lock holder published: every pod answers
// with it at once instead of trying the provider again.
type HolderFailed struct{ Reason string }

func (e *HolderFailed) Error() string {
	return "another pod's call to the provider failed: " + e.Reason
}

// Follow waits while another pod holds name's lock: until done reports its
// result, the holder publishes a failure (*HolderFailed), the lock goes away
// without a result (ErrNoHolder), Redis cannot be asked, or bound passes.
// The holder renews its lock while it works, so a slow provider is waited
// for, not raced.
func (s *Shared) Follow(ctx context.Context, name string, bound time.Duration, done func() bool) error {
	lock, fail := s.Key("lock:"+name), s.Key("unavailable:"+name)
	deadline := time.Now().Add(max(bound, s.lockWait))
	for wait := 5 * time.Millisecond; ; wait = min(wait*2, 50*time.Millisecond) {
		if done() {
			return nil
		}
		var held int64
		var reason string
		err := s.do(ctx, func(ctx context.Context) error {
			p := s.rdb.Pipeline()
			h := p.Exists(ctx, lock)
			r := p.Get(ctx, fail)
			_, _ = p.Exec(ctx)
			if err := h.Err(); err != nil {
				return err
			}
			held, reason = h.Val(), r.Val()
			return nil
		})
		switch {
		case err != nil:
			return err
		case reason != "":
			return &HolderFailed{Reason: reason}
		case held == 0:
			if done() {
				return nil
			}
			return ErrNoHolder
		case time.Now().After(deadline):
			return ErrFollowTimeout
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

// MarkUnavailable publishes the holder's failure for name for ttl, so the
// pods following it, and those asking within ttl, answer with it at once.
func (s *Shared) MarkUnavailable(ctx context.Context, name, reason string, ttl time.Duration) {
	_ = s.do(ctx, func(ctx context.Context) error {
		return s.rdb.Set(ctx, s.Key("unavailable:"+name), truncateReason(reason), ttl).Err()
	})
}

// Unavailable returns a failure published for name within its ttl.
func (s *Shared) Unavailable(ctx context.Context, name string) (*HolderFailed, bool) {
	var reason string
	err := s.do(ctx, func(ctx context.Context) error {
		v, err := s.rdb.Get(ctx, s.Key("unavailable:"+name)).Result()
		if errors.Is(err, redis.Nil) {
			return nil
		}
		reason = v
		return err
	})
	if err != nil || reason == "" {
		return nil, false
	}
	return &HolderFailed{Reason: reason}, true
}

// UnavailableTTL is how long a published failure stands: long enough for
// every follower to see it, short enough that the next try comes soon.
const UnavailableTTL = time.Second

func truncateReason(s string) string {
	if len(s) > 300 {
		s = s[:300]
	}
	return strings.ToValidUTF8(s, "?")
}

// Claim sets name for ttl unless it is set: first is true for the one
// caller, fleet-wide, that set it (a DPoP proof's jti, used once). An error
// means Redis could not be asked.
func (s *Shared) Claim(ctx context.Context, name string, ttl time.Duration) (first bool, err error) {
	key := s.Key(name)
	err = s.do(ctx, func(ctx context.Context) error {
		var e error
		first, e = s.rdb.SetNX(ctx, key, 1, ttl).Result()
		return e
	})
	return first, err
}

// Tick counts one event under name in the current second, fleet-wide,
// and returns the count of this second so far: a rate limit shared by
// every pod. An error means Redis could not be asked.
func (s *Shared) Tick(ctx context.Context, name string, now time.Time) (int64, error) {
	key := s.Key(name + ":" + strconv.FormatInt(now.Unix(), 10))
	var n int64
	err := s.do(ctx, func(ctx context.Context) error {
		var incr *redis.IntCmd
		_, e := s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
			incr = p.Incr(ctx, key)
			p.Expire(ctx, key, 2*time.Second)
			return nil
		})
		if e == nil {
			n = incr.Val()
		}
		return e
	})
	return n, err
}

// Secret returns the fleet's random secret called name (32 bytes), made by
// the first pod that asks: every pod gets the same one.
func (s *Shared) Secret(ctx context.Context, name string) ([]byte, error) {
	fresh := make([]byte, 32)
	_, _ = rand.Read(fresh)
	return s.SecretOr(ctx, name, fresh)
}

// SecretOr returns the fleet's secret called name, storing mine as it when
// Redis has none (never set, or its data lost): the first pod's secret
// wins, and a pod's own is written back after Redis lost it.
func (s *Shared) SecretOr(ctx context.Context, name string, mine []byte) ([]byte, error) {
	key := s.Key("secret:" + name)
	var val string
	err := s.do(ctx, func(ctx context.Context) error {
		if _, err := s.rdb.SetNX(ctx, key, hex.EncodeToString(mine), 0).Result(); err != nil {
			return err
		}
		var err error
		val, err = s.rdb.Get(ctx, key).Result()
		return err
	})
	if err != nil {
		return nil, err
	}
	k, err := hex.DecodeString(val)
	if err != nil || len(k) < 32 {
		return nil, errors.New("redis: the shared secret is malformed")
	}
	return k, nil
}

// Publish sends a nudge on channel (under the prefix). Failures are logged:
// other pods then learn of the change on their next lookup instead.
func (s *Shared) Publish(ctx context.Context, channel, msg string) error {
	err := s.do(ctx, func(ctx context.Context) error { return s.rdb.Publish(ctx, s.Key(channel), msg).Err() })
	if err != nil {
		s.log.Warn("redis publish failed", "channel", channel, "error", err)
	}
	return err
}

// Subscribe calls fn for every message on channel until ctx ends,
// resubscribing by itself after Redis comes back. resync runs after every
// (re)subscription, to catch up on what was missed meanwhile.
func (s *Shared) Subscribe(ctx context.Context, channel string, fn func(msg string), resync func()) {
	ps := s.rdb.Subscribe(ctx, s.Key(channel))
	defer ps.Close()
	for {
		// Receive reconnects by itself; a subscription confirmation marks a
		// (re)connection.
		m, err := ps.Receive(ctx)
		if ctx.Err() != nil {
			return
		}
		switch m := m.(type) {
		case *redis.Subscription:
			if resync != nil {
				resync()
			}
		case *redis.Message:
			fn(m.Payload)
		}
		if err != nil {
			t := time.NewTimer(100 * time.Millisecond)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
	}
}

// ReadSecret reads a secret from a file or an environment variable; nil
// when neither is named. A trailing newline in a file is not part of it
// (editors and kubectl add one). Every secret in the config is read so.
func ReadSecret(file, env string) ([]byte, error) {
	var s []byte
	switch {
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		s = []byte(strings.TrimRight(string(b), "\r\n"))
	case env != "":
		v, ok := os.LookupEnv(env)
		if !ok {
			return nil, fmt.Errorf("environment variable %s is not set", env)
		}
		s = []byte(v)
	default:
		return nil, nil
	}
	if len(s) == 0 {
		return nil, errors.New("secret is empty")
	}
	return s, nil
}

// macKeys are the HMAC keys in force: entries are written under cur and
// read under cur or prev, so pods still on the previous key during a
// rotation keep their entries readable.
type macKeys struct{ cur, prev []byte }

// SetHMACKey puts a new HMAC key in force (a rotated key file), keeping the
// previous one for reading. A Shared tier without HMAC stays without: turning
// it on or off takes a restart.
func (s *Shared) SetHMACKey(k []byte) error {
	if len(k) < 32 {
		return fmt.Errorf("redis hmac key: at least 32 bytes, have %d", len(k))
	}
	old := s.mac.Load()
	if old == nil {
		return errors.New("redis hmac key: the tier runs without HMAC; a key takes effect on restart")
	}
	if hmac.Equal(old.cur, k) {
		return nil
	}
	s.mac.Store(&macKeys{cur: k, prev: old.cur})
	return nil
}
