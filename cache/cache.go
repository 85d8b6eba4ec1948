// Package cache stores what identity providers said about tokens and keys,
// so that a token checked once is not sent to the provider again while its
// answer holds. It owns the in-process tier: bounded by bytes, each entry
// with its own lifetime, concurrent misses of one key coalesced into one
// load. Keys are built by callers from hashes; this package never sees a raw
// token and never decides anything.
package cache

import (
	"context"
	"errors"
	"math"
	"sync/atomic"
	"time"

	"github.com/maypok86/otter/v2"
	"golang.org/x/sync/singleflight"
)

// DefaultMaxBytes bounds a cache whose Options leave MaxBytes unset.
const DefaultMaxBytes = 64 << 20

// entryOverhead is added to every entry's size: the key, the map slot and
// the eviction policy's bookkeeping. It also bounds the entry count, since a
// flood of tiny entries still weighs this much each.
const entryOverhead = 256

// Config is the cache section of the configuration file.
type Config struct {
	// MaxBytes bounds the in-process memory held by cached introspection and
	// userinfo answers. Default 64 MiB.
	MaxBytes uint64 `yaml:"max_bytes"`
	// Redis, when set, shares key sets, answers and revocations across the
	// fleet.
	Redis *RedisConfig `yaml:"redis"`
	// VerifiedTokens tunes the in-process cache of tokens that passed local
	// verification (never shared: verifying is cheaper than a Redis trip).
	// A token is kept from its second verification on (Doorkeeper).
	VerifiedTokens VerifiedTokensConfig `yaml:"verified_tokens"`
}

// VerifiedTokensConfig is cache.verified_tokens.
type VerifiedTokensConfig struct {
	// MaxBytes bounds its memory. Default 32 MiB.
	MaxBytes uint64 `yaml:"max_bytes"`
	// MaxTTL bounds an entry's life (it never outlives the token's exp).
	// Default 10m.
	MaxTTL time.Duration `yaml:"max_ttl"`
	// Disabled verifies every token on every request.
	Disabled bool `yaml:"disabled"`
}

// Validate returns every problem in c, each naming its key.
func (c *Config) Validate() []string {
	var p []string
	if c.MaxBytes != 0 && c.MaxBytes < 64<<10 {
		p = append(p, "cache.max_bytes: at least 65536")
	}
	if c.Redis != nil {
		p = append(p, c.Redis.validate()...)
	}
	if c.VerifiedTokens.MaxTTL < 0 {
		p = append(p, "cache.verified_tokens.max_ttl: must be positive")
	}
	return p
}

// Options configure a Cache. Zero values take defaults.
type Options struct {
	// MaxBytes bounds the approximate memory held. Default DefaultMaxBytes.
	MaxBytes uint64
	// Now is the clock that decides expiry, for tests. Default time.Now.
	Now func() time.Time
}

// Loader produces the value for a missing key and says how long it may be
// kept; a ttl of zero or less returns the value without keeping it. An error
// is never cached.
type Loader[V any] func(ctx context.Context) (v V, ttl time.Duration, err error)

// Cache is a bounded in-process cache. It is safe for concurrent use.
//
// Eviction is otter's W-TinyLFU, so a flood of one-off keys (distinct bad
// tokens) does not push out entries that are read often. Expiry is decided
// here against Options.Now; otter's own timer only reclaims the memory.
type Cache[V any] struct {
	mem     *otter.Cache[string, item[V]]
	flights singleflight.Group
	now     func() time.Time
	size    func(V) int

	// The shared tier, when set by Share.
	shared      *Shared
	ns          string
	codec       Codec[V]
	followBound atomic.Int64 // see FollowFor

	hits, misses, loads atomic.Int64
}

type item[V any] struct {
	v       V
	expires time.Time
	ttl     time.Duration
}

// New builds a cache; size reports the approximate bytes a value holds.
func New[V any](o Options, size func(V) int) *Cache[V] {
	if o.MaxBytes == 0 {
		o.MaxBytes = DefaultMaxBytes
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	c := &Cache[V]{now: o.Now, size: size}
	c.mem = otter.Must(&otter.Options[string, item[V]]{
		MaximumWeight: o.MaxBytes,
		Weigher: func(k string, it item[V]) uint32 {
			return uint32(min(len(k)+c.size(it.v)+entryOverhead, math.MaxUint32))
		},
		ExpiryCalculator: otter.ExpiryWritingFunc(func(e otter.Entry[string, item[V]]) time.Duration {
			return e.Value.ttl
		}),
	})
	return c
}

// Peek returns the live value under key, without loading.
func (c *Cache[V]) Peek(key string) (V, bool) {
	it, ok := c.mem.GetIfPresent(key)
	if ok && c.now().Before(it.expires) {
		return it.v, true
	}
	var zero V
	return zero, false
}

// Set keeps v under key for ttl (nothing is kept for ttl <= 0).
func (c *Cache[V]) Set(key string, v V, ttl time.Duration) {
	if ttl <= 0 {
		c.mem.Invalidate(key)
		return
	}
	c.mem.Set(key, item[V]{v: v, expires: c.now().Add(ttl), ttl: ttl})
}

// Delete drops key.
func (c *Cache[V]) Delete(key string) { c.mem.Invalidate(key) }

// Codec turns values into shared-tier payloads and back.
type Codec[V any] struct {
	Encode func(V) ([]byte, error)
	Decode func([]byte) (V, error)
}

// Share puts the Redis tier behind c: a miss in memory reads Redis before
// loading, one pod of the fleet loads while the others wait for its result,
// and what is loaded is written to both tiers. ns prefixes c's keys in
// Redis. Call it before c is used.
func (c *Cache[V]) Share(s *Shared, ns string, codec Codec[V]) {
	c.shared, c.ns, c.codec = s, ns, codec
}

// FollowFor sets how long a pod waits for another pod's load of the same
// key at most: the loader's own timeout plus a margin.
func (c *Cache[V]) FollowFor(d time.Duration) { c.followBound.Store(int64(d)) }

// Get returns the live value under key, or loads it: memory, then Redis
// (when shared), then load. Concurrent Gets of a missing key share one load;
// each waits with its own ctx, while the load runs on a context that the
// first caller's cancellation does not end (the loader bounds its own time).
// src says which tier answered.
func (c *Cache[V]) Get(ctx context.Context, key string, load Loader[V]) (v V, src Source, err error) {
	if v, ok := c.Peek(key); ok {
		c.hits.Add(1)
		return v, FromMemory, nil
	}
	c.misses.Add(1)
	lctx := context.WithoutCancel(ctx)
	type result struct {
		v   V
		src Source
	}
	ch := c.flights.DoChan(key, func() (any, error) {
		// A load that finished between our Peek and this flight has
		// already stored the value: do not load it twice.
		if v, ok := c.Peek(key); ok {
			return result{v, FromMemory}, nil
		}
		var lease *Lease
		if c.shared != nil {
			rkey := c.shared.Key(c.ns + key)
			fromRedis := func() (result, bool) {
				v, ok := c.fromShared(c.shared.Get(lctx, rkey))
				if ok {
					c.Set(key, v.v, v.ttl)
				}
				return result{v.v, FromRedis}, ok
			}
			if r, ok := fromRedis(); ok {
				return r, nil
			}
			// A failure another pod published moments ago stands for all.
			if hf, ok := c.shared.Unavailable(lctx, c.ns+key); ok {
				return nil, hf
			}
			// One pod loads; the others follow it for as long as it works,
			// and take its result or its failure.
			for range 3 {
				l, state := c.shared.Acquire(lctx, c.ns+key)
				if state == Acquired {
					lease = l
					// The previous holder may have stored its result just
					// before releasing the lock we now hold.
					if r, ok := fromRedis(); ok {
						lease.Release()
						return r, nil
					}
					break
				}
				if state == Unreachable {
					break
				}
				var got result
				err := c.shared.Follow(lctx, c.ns+key, time.Duration(c.followBound.Load()), func() (ok bool) { got, ok = fromRedis(); return ok })
				var hf *HolderFailed
				switch {
				case err == nil:
					return got, nil
				case errors.As(err, &hf):
					return nil, hf
				case errors.Is(err, ErrNoHolder):
					continue
				}
				break // Redis failed or the holder took too long: load here
			}
		}
		if lease != nil {
			defer lease.Release()
		}
		c.loads.Add(1)
		v, ttl, err := load(lctx)
		if err != nil {
			if lease != nil && !errors.Is(err, ErrLocal) {
				c.shared.MarkUnavailable(lctx, c.ns+key, err.Error(), UnavailableTTL)
			}
			return nil, err
		}
		c.Set(key, v, ttl)
		if c.shared != nil && ttl > 0 {
			if p, err := c.codec.Encode(v); err == nil {
				c.shared.Set(lctx, c.shared.Key(c.ns+key), p, c.now().Add(ttl))
			}
		}
		return result{v, FromOrigin}, nil
	})
	select {
	case <-ctx.Done():
		var zero V
		return zero, "", ctx.Err()
	case r := <-ch:
		if r.Err != nil {
			var zero V
			return zero, "", r.Err
		}
		res := r.Val.(result)
		return res.v, res.src, nil
	}
}

type decoded[V any] struct {
	v   V
	ttl time.Duration
}

// fromShared decodes a Redis entry; ok is false for a miss or an entry that
// does not decode (counted as rejected).
func (c *Cache[V]) fromShared(p []byte, exp time.Time, ok bool) (decoded[V], bool) {
	if !ok {
		return decoded[V]{}, false
	}
	v, err := c.codec.Decode(p)
	if err != nil {
		c.shared.reject(c.ns, "payload does not decode: "+err.Error())
		return decoded[V]{}, false
	}
	return decoded[V]{v: v, ttl: exp.Sub(c.now())}, true
}

// Stats are counters since the cache was built.
type Stats struct {
	Hits, Misses, Loads int64
	// Entries is otter's estimate of the entries held.
	Entries int
}

// Stats reports hits, misses, loads and the entries held.
func (c *Cache[V]) Stats() Stats {
	return Stats{Hits: c.hits.Load(), Misses: c.misses.Load(), Loads: c.loads.Load(), Entries: c.mem.EstimatedSize()}
}

// WithDefaults is c with every unset setting at its default: what the
// effective config log shows.
func (c Config) WithDefaults() Config {
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultMaxBytes
	}
	if c.VerifiedTokens.MaxBytes == 0 {
		c.VerifiedTokens.MaxBytes = 32 << 20
	}
	if c.VerifiedTokens.MaxTTL <= 0 {
		c.VerifiedTokens.MaxTTL = 10 * time.Minute
	}
	if c.Redis != nil {
		r := c.Redis.withDefaults()
		c.Redis = &r
	}
	return c
}
