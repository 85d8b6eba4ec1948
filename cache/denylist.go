package cache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/proto"

	"github.com/tokenauthz/tokenauthz/proto/cachev1"
)

// Hash is the hex SHA-256 of parts joined by NUL: how tokens, jtis and
// subjects are named in Redis, in cache keys and in revocations.
func Hash(parts ...string) string {
	h := sha256.New()
	for i, p := range parts {
		if i > 0 {
			h.Write([]byte{0})
		}
		h.Write([]byte(p))
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Denylist holds revocations: single tokens, jtis, and subjects whose tokens
// issued before a time are refused. Lookups read memory only; with a Redis
// tier, revocations are stored there (with a TTL bounded by the token
// lifetime) and a pub/sub nudge makes every pod load a new one at once,
// with a periodic resync for nudges missed while Redis was away.
//
// Revocations never come undone while any pod holds them: every resync also
// writes back what this pod holds and Redis lacks, so a Redis that lost its
// data (a restart without persistence, FLUSHALL) is filled again, and a
// revocation taken while Redis was down reaches it when it returns.
type Denylist struct {
	shared *Shared
	now    func() time.Time

	mu      sync.RWMutex
	entries map[key]entry
	count   atomic.Int64 // len(entries), read without the lock on the hot path
	kinds   [4]atomic.Int64

	// WrittenBack counts revocations this pod stored again in Redis.
	WrittenBack atomic.Int64
}

type key struct {
	kind cachev1.Revocation_Kind
	id   string
}

type entry struct {
	revoked time.Time
	expires time.Time
	rev     *cachev1.Revocation // as revoked, to write back to Redis
}

// revocationsChannel carries the Redis key of each new revocation.
const revocationsChannel = "revocations"

// NewDenylist builds a denylist; shared may be nil (this pod only).
func NewDenylist(shared *Shared, now func() time.Time) *Denylist {
	if now == nil {
		now = time.Now
	}
	return &Denylist{shared: shared, now: now, entries: map[key]entry{}}
}

// Revoke records r for ttl here and, with a Redis tier, in Redis, then
// nudges the other pods. An error means the fleet may not have it: the
// revocation then holds on this pod only.
func (d *Denylist) Revoke(ctx context.Context, r *cachev1.Revocation, ttl time.Duration) error {
	if r.GetKind() == cachev1.Revocation_KIND_UNSPECIFIED || len(r.GetId()) != 64 {
		return errors.New("revocation needs a kind and a SHA-256 id")
	}
	if ttl <= 0 {
		return errors.New("revocation needs a positive ttl")
	}
	expires := d.now().Add(ttl)
	d.apply(r, expires)
	if d.shared == nil {
		return nil
	}
	p, err := proto.Marshal(r)
	if err != nil {
		return err
	}
	rkey := d.redisKey(r)
	d.shared.Set(ctx, rkey, p, expires)
	// Set reports nothing; read back to know the fleet has it.
	if got, _, ok := d.shared.Get(ctx, rkey); !ok || !proto.Equal(mustRevocation(got), r) {
		return errors.New("redis did not take the revocation: it holds on this pod only")
	}
	if err := d.shared.Publish(ctx, revocationsChannel, rkey); err != nil {
		return fmt.Errorf("stored, but the other pods were not nudged (they load it within the resync interval): %w", err)
	}
	return nil
}

func mustRevocation(p []byte) *cachev1.Revocation {
	var r cachev1.Revocation
	if proto.Unmarshal(p, &r) != nil {
		return nil
	}
	return &r
}

func (d *Denylist) redisKey(r *cachev1.Revocation) string {
	return d.shared.Key(fmt.Sprintf("deny:%d:%s", r.GetKind(), r.GetId()))
}

func (d *Denylist) apply(r *cachev1.Revocation, expires time.Time) {
	k := key{kind: r.GetKind(), id: r.GetId()}
	e := entry{revoked: time.Unix(r.GetRevokedUnix(), 0), expires: expires, rev: r}
	d.mu.Lock()
	defer d.mu.Unlock()
	if old, ok := d.entries[k]; ok {
		// Keep the later revocation time and the later expiry.
		if old.revoked.After(e.revoked) {
			e.revoked, e.rev = old.revoked, old.rev
		}
		if old.expires.After(e.expires) {
			e.expires = old.expires
		}
	} else {
		d.kinds[k.kind].Add(1)
	}
	d.entries[k] = e
	d.count.Store(int64(len(d.entries)))
}

// Len is the number of revocations held.
func (d *Denylist) Len() int { return int(d.count.Load()) }

// Token describes a verified token for a denylist lookup. TokenHash is
// called only when single-token revocations exist, so the common case
// (an empty denylist) costs no hashing.
type Token struct {
	TokenHash func() string
	Issuer    string
	JTI, Sub  string
	IAT       time.Time // zero when the token has no iat
}

// Revoked reports whether t is revoked and by which kind of entry.
func (d *Denylist) Revoked(t Token) (string, bool) {
	if d.count.Load() == 0 {
		return "", false
	}
	now := d.now()
	if d.kinds[cachev1.Revocation_KIND_TOKEN].Load() > 0 && t.TokenHash != nil {
		if _, ok := d.live(key{cachev1.Revocation_KIND_TOKEN, t.TokenHash()}, now); ok {
			return "token", true
		}
	}
	if t.JTI != "" && d.kinds[cachev1.Revocation_KIND_JTI].Load() > 0 {
		if _, ok := d.live(key{cachev1.Revocation_KIND_JTI, Hash(t.Issuer, t.JTI)}, now); ok {
			return "jti", true
		}
	}
	if t.Sub != "" && d.kinds[cachev1.Revocation_KIND_SUBJECT].Load() > 0 {
		if e, ok := d.live(key{cachev1.Revocation_KIND_SUBJECT, Hash(t.Issuer, t.Sub)}, now); ok {
			// A token without iat cannot show it came after: refused.
			if t.IAT.IsZero() || !t.IAT.After(e.revoked) {
				return "subject", true
			}
		}
	}
	return "", false
}

func (d *Denylist) live(k key, now time.Time) (entry, bool) {
	d.mu.RLock()
	e, ok := d.entries[k]
	d.mu.RUnlock()
	return e, ok && now.Before(e.expires)
}

// Run keeps the denylist in step with Redis until ctx ends: it loads every
// revocation at start and after each reconnection, applies nudges as they
// come, and resyncs every interval for anything missed. Without a Redis tier
// it only drops expired entries.
func (d *Denylist) Run(ctx context.Context, interval time.Duration) {
	if d.shared != nil {
		go d.shared.Subscribe(ctx, revocationsChannel, d.load, func() { d.resync(ctx) })
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		d.purge()
		if d.shared != nil {
			d.resync(ctx)
		}
	}
}

// load applies the revocation stored under rkey (a nudge's message).
func (d *Denylist) load(rkey string) {
	if !strings.HasPrefix(rkey, d.shared.Key("deny:")) {
		return
	}
	p, exp, ok := d.shared.Get(context.Background(), rkey)
	if !ok {
		return
	}
	if r := mustRevocation(p); r != nil {
		d.apply(r, exp)
	}
}

// resync loads every revocation in Redis (on every master of a Cluster),
// then writes back the ones this pod holds that Redis lacks.
func (d *Denylist) resync(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	match := d.shared.Key("deny:*")
	var mu sync.Mutex
	inRedis := map[string]bool{}
	scan := func(ctx context.Context, c *redis.Client) error {
		it := c.Scan(ctx, 0, match, 500).Iterator()
		for it.Next(ctx) {
			mu.Lock()
			inRedis[it.Val()] = true
			mu.Unlock()
			d.load(it.Val())
		}
		return it.Err()
	}
	var err error
	switch c := d.shared.Client().(type) {
	case *redis.ClusterClient:
		err = c.ForEachMaster(ctx, scan)
	case *redis.Client:
		err = scan(ctx, c)
	}
	if err != nil {
		d.shared.log.Warn("revocation resync failed", "error", err)
		return // Redis cannot be read: nothing can be known to be missing
	}
	d.writeBack(ctx, inRedis)
}

// writeBack stores the live revocations Redis lacks and nudges the fleet.
func (d *Denylist) writeBack(ctx context.Context, inRedis map[string]bool) {
	now := d.now()
	type missing struct {
		r       *cachev1.Revocation
		expires time.Time
	}
	var todo []missing
	d.mu.RLock()
	for _, e := range d.entries {
		if e.rev != nil && now.Before(e.expires) && !inRedis[d.redisKey(e.rev)] {
			todo = append(todo, missing{e.rev, e.expires})
		}
	}
	d.mu.RUnlock()
	written := 0
	for _, m := range todo {
		p, err := proto.Marshal(m.r)
		if err != nil {
			continue
		}
		rkey := d.redisKey(m.r)
		d.shared.Set(ctx, rkey, p, m.expires)
		if d.shared.Publish(ctx, revocationsChannel, rkey) == nil {
			written++
		}
	}
	d.WrittenBack.Add(int64(written))
	if written > 0 {
		d.shared.log.Info("revocations Redis lacked were written back", "count", written)
	}
}

func (d *Denylist) purge() {
	now := d.now()
	d.mu.Lock()
	defer d.mu.Unlock()
	for k, e := range d.entries {
		if !now.Before(e.expires) {
			delete(d.entries, k)
			d.kinds[k.kind].Add(-1)
		}
	}
	d.count.Store(int64(len(d.entries)))
}
