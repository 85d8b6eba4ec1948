package verify

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"golang.org/x/sync/singleflight"
	"google.golang.org/protobuf/proto"

	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/proto/cachev1"
)

// keySource yields an issuer's current keys.
type keySource interface {
	// keys returns a usable set, loading it if there is none. It fails with
	// an Unavailable *Error when no usable set can be had.
	keys(ctx context.Context) (*keySet, error)
	// refetch is called when a token names a kid that the set lacks. It may
	// fetch again (at most once per MinRefreshInterval, shared by concurrent
	// callers) and returns the set to look in.
	//
	// seen is the set the caller looked in: any other set is newer news.
	// err is set when the provider could not be asked or did not answer
	// (now, or at the last attempt within the interval): then a missing
	// kid decides nothing.
	refetch(ctx context.Context, seen *keySet) (ks *keySet, err error)
	// loaded reports whether keys were ever loaded.
	loaded() bool
	// current is the set held now (nil if none), without loading.
	current() *keySet
	// generation changes whenever the set's content does.
	generation() uint64
	// run refreshes in the background until ctx ends.
	run(ctx context.Context)
}

// staticKeys never change: inline or file key sets and HMAC secrets.
type staticKeys struct{ set *keySet }

func (s staticKeys) keys(context.Context) (*keySet, error)             { return s.set, nil }
func (s staticKeys) refetch(context.Context, *keySet) (*keySet, error) { return s.set, nil }
func (s staticKeys) loaded() bool                                      { return true }
func (s staticKeys) current() *keySet                                  { return s.set }
func (s staticKeys) generation() uint64                                { return 0 }
func (s staticKeys) run(context.Context)                               {}

// remoteKeys fetches a JWKS over HTTP, either from a fixed URL or from the
// jwks_uri of the issuer's OIDC discovery document.
//
// Concurrency: the current set is an atomic snapshot read without locks. All
// fetches go through one singleflight key, so concurrent callers share one
// request; each caller waits with its own context while the fetch runs on a
// detached one bounded by Timeout.
type remoteKeys struct {
	issuer    string
	jwksURI   string // fixed, or learned from discovery
	discovery bool
	// otherHosts may serve the endpoints a discovery document names,
	// besides the issuer's own origin.
	otherHosts []string
	cfg        KeysConfig
	client     *http.Client
	log        *slog.Logger
	now        func() time.Time

	cur atomic.Pointer[keySet]
	// flights are shared by a tenant family's key sets (each singleflight
	// group keeps its map once used: 250 bytes a tenant), so flight keys
	// start with the issuer.
	flights *singleflight.Group
	// tenant, for a tenant's key set, is named in log lines (log is the
	// family's logger: a logger of its own per tenant was another few
	// hundred bytes held by each).
	tenant string
	// shared is the fleet's Redis tier (nil without one); sharedName names
	// this key set there.
	shared     *cache.Shared
	sharedName string
	tel        *telemetry
	issuerName string
	// Fetch counts requests made to the identity provider (discovery and
	// JWKS), for tests and metrics.
	fetches atomic.Int64
	// running counts refresh loops (0 or 1), for tests of Retire.
	running atomic.Int32
	// lazy: no refresh loop; a set past its refresh time is refreshed in
	// the background by the request that finds it so (set before use).
	lazy       bool
	refreshing atomic.Bool
	// gate, if set, must allow a first load from the provider (a new
	// tenant's discovery); refreshes are not gated.
	gate func(context.Context) error
	// gen numbers key set contents (keySet.gen), so verified tokens can
	// tell they were verified under keys since replaced.
	gen atomic.Uint64
	// published is the owning issuer's copy of the current generation
	// (Issuer.keyGen), kept with the set under installMu: a warm check
	// reads it from the issuer it already holds, without a trip through
	// this struct and the set (a cache miss each with thousands of
	// issuers).
	published *atomic.Uint64
	installMu sync.Mutex

	mu            sync.Mutex
	doc           *discoveryDoc // from discovery; nil until read, and after the jwks_uri failed
	lastFailAt    time.Time     // when the last fetch failed
	lastFailErr   error
	failures      int       // consecutive failed fetches
	retryAt       time.Time // after a failure: no fetch before this (exponential back-off with jitter)
	lastRefetchAt time.Time // last unknown-kid refetch
}

// logger names the tenant, for a tenant's key set.
func (r *remoteKeys) logger() *slog.Logger {
	if r.tenant == "" {
		return r.log
	}
	return r.log.With("tenant", r.tenant)
}

func (r *remoteKeys) loaded() bool     { return r.cur.Load() != nil }
func (r *remoteKeys) current() *keySet { return r.cur.Load() }
func (r *remoteKeys) generation() uint64 {
	if ks := r.cur.Load(); ks != nil {
		return ks.gen
	}
	return 0
}

func (r *remoteKeys) usable(ks *keySet) bool {
	return ks != nil && r.now().Before(ks.refreshAt.Add(r.cfg.MaxStale))
}

func (r *remoteKeys) keys(ctx context.Context) (*keySet, error) {
	if ks := r.cur.Load(); r.usable(ks) {
		if r.lazy && !r.now().Before(ks.refreshAt) {
			r.refreshInBackground(ctx)
		}
		return ks, nil
	}
	// Nothing usable. After a failure, answer at once until the back-off
	// allows the next attempt, instead of sending every request to an
	// identity provider that is down.
	r.mu.Lock()
	failedRecently := r.lastFailErr != nil && r.now().Before(r.retryAt)
	lastErr := r.lastFailErr
	r.mu.Unlock()
	if failedRecently {
		return nil, unavailable("keys of issuer "+r.issuer+" are unavailable", lastErr)
	}
	ks, err := r.fetchShared(ctx, nil)
	if err != nil {
		return nil, unavailable("keys of issuer "+r.issuer+" are unavailable", err)
	}
	return ks, nil
}

func (r *remoteKeys) refetch(ctx context.Context, seen *keySet) (*keySet, error) {
	type answer struct {
		ks  *keySet
		err error
	}
	ch := r.flights.DoChan(r.issuer+" refetch", func() (any, error) {
		r.mu.Lock()
		if !r.lastRefetchAt.IsZero() && r.now().Sub(r.lastRefetchAt) < r.cfg.MinRefreshInterval {
			// Refetched lately: the answer stands, and so does a failure.
			err := r.lastFailErr
			r.mu.Unlock()
			return answer{r.cur.Load(), err}, nil
		}
		r.lastRefetchAt = r.now()
		r.mu.Unlock()
		ks, err := r.fetchShared(context.WithoutCancel(ctx), seen)
		if ks == nil {
			ks = r.cur.Load()
		}
		return answer{ks, err}, nil
	})
	select {
	case <-ctx.Done():
		return r.cur.Load(), ctx.Err()
	case res := <-ch:
		a := res.Val.(answer)
		return a.ks, a.err
	}
}

// refreshInBackground starts one refresh of a lazy set that is due, unless
// one runs or the back-off after a failure forbids it; the caller goes on
// with the set it has.
func (r *remoteKeys) refreshInBackground(ctx context.Context) {
	r.mu.Lock()
	backingOff := r.lastFailErr != nil && r.now().Before(r.retryAt)
	r.mu.Unlock()
	if backingOff || !r.refreshing.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer r.refreshing.Store(false)
		_, _ = r.fetchShared(context.WithoutCancel(ctx), nil)
	}()
}

// fetchShared runs one fetch for all concurrent callers and installs the
// result. A failed fetch leaves the current set in place. With a Redis tier,
// a fresh set another pod fetched is taken from Redis instead, and of the
// pods that need a fetch at once only the one holding the fleet lock calls
// the provider while the others wait for its result.
//
// seen is set for an unknown kid: the set the caller looked in. The fetch
// then happens even if that set is fresh, unless another set has been
// installed meanwhile. Otherwise (seen nil) a fresh set in hand makes the
// fetch unnecessary: another path, such as a pub/sub nudge, installed it.
// The two kinds run in separate flights, so a kid refetch never joins a
// fetch that skipped.
func (r *remoteKeys) fetchShared(ctx context.Context, seen *keySet) (*keySet, error) {
	forced := seen != nil
	flight := "fetch"
	if forced {
		flight = "fetch-forced"
	}
	// The flight outlives a caller that gives up, but keeps its trace.
	fctx := context.WithoutCancel(ctx)
	ch := r.flights.DoChan(r.issuer+" "+flight, func() (any, error) {
		// have returns a set that makes the fetch unnecessary: for an
		// unforced fetch, a fresh set held (a pub/sub nudge or resync may
		// install one at any moment); else a fresh set in Redis newer than
		// the one held.
		have := func(ctx context.Context) *keySet {
			cur := r.cur.Load()
			switch {
			case forced && cur != nil && cur != seen:
				return cur
			case !forced && cur != nil && r.now().Before(cur.refreshAt):
				return cur
			}
			return r.adoptShared(ctx)
		}
		if ks := have(fctx); ks != nil {
			return ks, nil
		}
		ctx, span := r.tel.start(fctx, "tokenauthz.keys.fetch", attribute.String("tokenauthz.issuer", r.issuerName),
			attribute.Bool("tokenauthz.forced", forced))
		defer span.End()
		var lease *cache.Lease
		if r.shared != nil {
			// A failure another pod published moments ago stands for all.
			if hf, ok := r.shared.Unavailable(ctx, r.sharedName); ok {
				r.noteFetch(hf)
				return nil, hf
			}
			// One pod fetches; the others follow it for as long as it
			// works (bounded by the provider timeout), and take its key
			// set or its failure.
		coordinate:
			for range 3 {
				l, state := r.shared.Acquire(ctx, r.sharedName)
				switch state {
				case cache.Acquired:
					lease = l
					// The previous holder may have published just before
					// releasing the lock we now hold.
					if ks := have(ctx); ks != nil {
						lease.Release()
						span.SetAttributes(attribute.String("tokenauthz.source", string(cache.FromRedis)))
						return ks, nil
					}
					break coordinate
				case cache.Unreachable:
					break coordinate
				}
				var got *keySet
				err := r.shared.Follow(ctx, r.sharedName, r.cfg.Timeout+time.Second, func() bool { got = have(ctx); return got != nil })
				var hf *cache.HolderFailed
				switch {
				case err == nil:
					span.SetAttributes(attribute.String("tokenauthz.source", string(cache.FromRedis)))
					return got, nil
				case errors.As(err, &hf):
					r.noteFetch(hf)
					end(span, hf)
					return nil, hf
				case errors.Is(err, cache.ErrNoHolder):
					continue
				}
				break coordinate // Redis failed, or the holder outlived the bound: fetch here
			}
		}
		if lease != nil {
			defer lease.Release()
		}
		if r.gate != nil && r.cur.Load() == nil {
			if err := r.gate(ctx); err != nil {
				// Not the provider's failure: nothing is published.
				r.noteFetch(err)
				end(span, err)
				return nil, err
			}
		}
		span.SetAttributes(attribute.String("tokenauthz.source", string(cache.FromOrigin)))
		hctx, cancel := context.WithTimeout(ctx, r.cfg.Timeout)
		defer cancel()
		ks, err := r.fetch(hctx)
		r.tel.obs.KeySetFetched(r.issuerName, err)
		r.noteFetch(err)
		if err != nil {
			// For a tenant's issuer, the logger names the tenant (metrics
			// do not: one label value per tenant is too many).
			r.logger().Warn("key set fetch failed", "issuer", r.issuer, "error", err)
			if lease != nil {
				r.shared.MarkUnavailable(ctx, r.sharedName, err.Error(), cache.UnavailableTTL)
			}
			end(span, err)
			return nil, err
		}
		r.install(ks)
		r.publish(ctx, ks)
		return ks, nil
	})
	return awaitFlight[*keySet](ctx, ch)
}

func (r *remoteKeys) install(ks *keySet) {
	r.installMu.Lock()
	// Tokens verified under other keys must be verified again (a key may
	// have been withdrawn); the same document keeps its generation.
	if prev := r.cur.Load(); prev != nil && prev.sum == ks.sum {
		ks.gen = prev.gen
	} else {
		ks.gen = r.gen.Add(1)
	}
	prev := r.cur.Swap(ks)
	if r.published != nil {
		r.published.Store(ks.gen)
	}
	r.installMu.Unlock()
	if prev == nil || !sameKids(prev, ks) {
		r.logger().Info("key set loaded", "issuer", r.issuer, "keys", len(ks.keys), "skipped", ks.skipped,
			"refresh_in", ks.refreshAt.Sub(r.now()).Round(time.Second).String())
	}
}

// publish writes a set this pod fetched to Redis, where it lives as long as
// it may serve (refresh time plus max_stale), and nudges the other pods.
func (r *remoteKeys) publish(ctx context.Context, ks *keySet) {
	if r.shared == nil {
		return
	}
	p, err := proto.Marshal(&cachev1.KeySetSnapshot{Jwks: ks.doc, FetchedUnixNano: ks.fetchedAt.UnixNano(),
		RefreshUnixNano: ks.refreshAt.UnixNano()})
	if err != nil {
		return
	}
	r.shared.Set(ctx, r.sharedKey(), p, ks.refreshAt.Add(r.cfg.MaxStale))
	_ = r.shared.Publish(ctx, keysChannel, r.sharedName)
}

// keysChannel carries the names of key sets that a pod has just fetched.
const keysChannel = "keys"

func (r *remoteKeys) sharedKey() string { return r.shared.Key("keys:" + r.sharedName) }

// newerShared accepts a snapshot that is fresh and newer than the set held.
func (r *remoteKeys) newerShared(ks *keySet) bool {
	cur := r.cur.Load()
	return r.now().Before(ks.refreshAt) && (cur == nil || ks.fetchedAt.After(cur.fetchedAt))
}

// adoptShared installs the Redis snapshot if it is fresh and newer than the
// set held, and returns it; nil otherwise.
func (r *remoteKeys) adoptShared(ctx context.Context) *keySet {
	if r.shared == nil {
		return nil
	}
	ks := r.decodeShared(r.shared.Get(ctx, r.sharedKey()))
	if ks == nil || !r.newerShared(ks) {
		return nil
	}
	r.install(ks)
	return ks
}

// decodeShared parses a snapshot under this pod's own key rules: what
// another pod (or whoever wrote to Redis) stored earns no exemption.
func (r *remoteKeys) decodeShared(p []byte, _ time.Time, ok bool) *keySet {
	if !ok {
		return nil
	}
	var snap cachev1.KeySetSnapshot
	if err := proto.Unmarshal(p, &snap); err != nil {
		return nil
	}
	ks, err := parseKeySet(snap.GetJwks(), r.cfg.MaxKeys)
	if err != nil {
		r.logger().Warn("key set in redis rejected", "issuer", r.issuer, "error", err)
		return nil
	}
	ks.fetchedAt = time.Unix(0, snap.GetFetchedUnixNano())
	ks.refreshAt = time.Unix(0, snap.GetRefreshUnixNano())
	ks.src = cache.FromRedis
	return ks
}

func sameKids(a, b *keySet) bool {
	if len(a.keys) != len(b.keys) {
		return false
	}
	for i := range a.keys {
		if a.keys[i].kid != b.keys[i].kid {
			return false
		}
	}
	return true
}

// run refreshes the set when it is due, and after a failure when the
// back-off allows, until a fetch succeeds.
func (r *remoteKeys) run(ctx context.Context) {
	r.running.Add(1)
	defer r.running.Add(-1)
	for {
		r.mu.Lock()
		failing, retryAt := r.lastFailErr != nil, r.retryAt
		r.mu.Unlock()
		var wait time.Duration
		switch ks := r.cur.Load(); {
		case failing:
			wait = max(retryAt.Sub(r.now()), 0)
		case ks != nil:
			wait = max(ks.refreshAt.Sub(r.now()), 0)
		case r.fetches.Load() > 0:
			wait = r.cfg.MinRefreshInterval // a fetch found the set was not needed
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		_, _ = r.fetchShared(ctx, nil)
	}
}

// firstRetry is the back-off after a first failed fetch; it doubles with
// every further failure up to MinRefreshInterval. A pod that starts during
// a short provider outage is ready within about a second of its return,
// and a long outage costs one fetch per MinRefreshInterval.
const firstRetry = 250 * time.Millisecond

// noteFetch records a fetch's outcome and, after a failure, when the next
// may be tried: exponential back-off with jitter (half the delay, plus up
// to half at random, so a fleet does not retry in step).
func (r *remoteKeys) noteFetch(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil {
		r.lastFailErr, r.failures = nil, 0
		return
	}
	r.failures++
	d := r.cfg.MinRefreshInterval
	if shift := r.failures - 1; shift < 16 {
		d = min(d, firstRetry<<shift)
	}
	d = d/2 + rand.N(d/2+1)
	r.lastFailAt, r.lastFailErr, r.retryAt = r.now(), err, r.now().Add(d)
}

func (r *remoteKeys) fetch(ctx context.Context) (*keySet, error) {
	uri := r.jwksURI
	if r.discovery {
		doc, err := r.discoverOnce(ctx)
		if err != nil {
			return nil, err
		}
		uri = doc.JWKSURI
	}
	body, hdr, err := r.get(ctx, uri)
	if err != nil {
		if r.discovery {
			// The jwks_uri may have moved: discover again next time.
			r.mu.Lock()
			r.doc = nil
			r.mu.Unlock()
		}
		return nil, err
	}
	ks, err := parseKeySet(body, r.cfg.MaxKeys)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", uri, err)
	}
	if r.shared != nil {
		ks.doc = bytes.Clone(body) // published to the fleet; not the read buffer's spare capacity
	}
	now := r.now()
	ks.fetchedAt = now
	ks.refreshAt = now.Add(r.refreshAfter(hdr))
	ks.src = cache.FromOrigin
	return ks, nil
}

func (r *remoteKeys) heldDoc() *discoveryDoc {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.doc
}

// discoverOnce returns the held discovery document or reads it.
func (r *remoteKeys) discoverOnce(ctx context.Context) (*discoveryDoc, error) {
	if doc := r.heldDoc(); doc != nil {
		return doc, nil
	}
	doc, err := r.discover(ctx)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.doc = doc
	r.mu.Unlock()
	return doc, nil
}

// metadata returns the issuer's discovery document for the introspection
// and userinfo endpoints, reading it (once for all concurrent callers) if
// none is held.
func (r *remoteKeys) metadata(ctx context.Context) (*discoveryDoc, error) {
	if doc := r.heldDoc(); doc != nil {
		return doc, nil
	}
	ch := r.flights.DoChan(r.issuer+" discover", func() (any, error) {
		fctx, cancel := context.WithTimeout(context.Background(), r.cfg.Timeout)
		defer cancel()
		return r.discoverOnce(fctx)
	})
	return awaitFlight[*discoveryDoc](ctx, ch)
}

// awaitFlight waits for a shared flight's result with the caller's own
// context: a caller that gives up leaves, the flight goes on for the others.
func awaitFlight[T any](ctx context.Context, ch <-chan singleflight.Result) (T, error) {
	select {
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	case res := <-ch:
		if res.Err != nil {
			var zero T
			return zero, res.Err
		}
		return res.Val.(T), nil
	}
}

// discoveryDoc is the part of an OIDC provider metadata document used here.
type discoveryDoc struct {
	Issuer                string `json:"issuer"`
	JWKSURI               string `json:"jwks_uri"`
	IntrospectionEndpoint string `json:"introspection_endpoint"`
	UserinfoEndpoint      string `json:"userinfo_endpoint"`
}

func (r *remoteKeys) discover(ctx context.Context) (*discoveryDoc, error) {
	uri := strings.TrimSuffix(r.issuer, "/") + "/.well-known/openid-configuration"
	body, _, err := r.get(ctx, uri)
	if err != nil {
		return nil, err
	}
	var doc discoveryDoc
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, fmt.Errorf("%s: not a discovery document: %w", uri, err)
	}
	// OIDC Discovery §4.3: the document's issuer must be the one configured,
	// or a document served elsewhere could vouch for keys of another issuer.
	if doc.Issuer != r.issuer {
		return nil, fmt.Errorf("%s: issuer %q does not match the configured %q", uri, doc.Issuer, r.issuer)
	}
	if err := checkFetchURL(doc.JWKSURI, r.cfg.AllowHTTP); err != nil {
		return nil, fmt.Errorf("%s: jwks_uri: %w", uri, err)
	}
	// A document can name any URL; whoever can change it (or answer for the
	// issuer's host) must not be able to point key fetches, or the token
	// sent to introspection and userinfo, at a host of their choosing.
	for _, ep := range []struct{ name, url string }{
		{"jwks_uri", doc.JWKSURI}, {"introspection_endpoint", doc.IntrospectionEndpoint}, {"userinfo_endpoint", doc.UserinfoEndpoint},
	} {
		if ep.url == "" {
			continue
		}
		if err := sameOrigin(r.issuer, ep.url, r.otherHosts); err != nil {
			return nil, fmt.Errorf("%s: %s %q refused: %w (list the host in discovery_allowed_hosts if it is the provider's)", uri, ep.name, ep.url, err)
		}
	}
	return &doc, nil
}

// sameOrigin accepts u when it has the issuer's scheme, host and port, or is
// on one of the allowed hosts.
func sameOrigin(issuer, u string, allowed []string) error {
	iu, err := url.Parse(issuer)
	if err != nil {
		return err
	}
	eu, err := url.Parse(u)
	if err != nil {
		return errors.New("not a URL")
	}
	if eu.User != nil {
		return errors.New("it carries user info")
	}
	if strings.EqualFold(eu.Scheme, iu.Scheme) && strings.EqualFold(eu.Host, iu.Host) {
		return nil
	}
	for _, h := range allowed {
		// No downgrade: https, or the issuer's own scheme (http only where
		// checkFetchURL allows it: loopback, or allow_http).
		if (strings.EqualFold(eu.Scheme, "https") || strings.EqualFold(eu.Scheme, iu.Scheme)) && strings.EqualFold(eu.Host, h) {
			return nil
		}
	}
	return fmt.Errorf("not on the issuer's origin %s://%s", iu.Scheme, iu.Host)
}

var errTooLarge = errors.New("response too large")

func (r *remoteKeys) get(ctx context.Context, uri string) ([]byte, http.Header, error) {
	r.fetches.Add(1)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, uri, nil)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := r.client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		drain(resp)
		return nil, nil, fmt.Errorf("%s: HTTP %d", uri, resp.StatusCode)
	}
	body, err := readLimited(resp, r.cfg.MaxResponseBytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", uri, err)
	}
	return body, resp.Header, nil
}

// readLimited reads a response body of at most limit bytes.
func readLimited(resp *http.Response, limit int64) ([]byte, error) {
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(body)) > limit {
		return nil, fmt.Errorf("%w (limit %d bytes)", errTooLarge, limit)
	}
	return body, nil
}

// drain reads a little of an unwanted body so the connection can be reused.
func drain(resp *http.Response) { _, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10)) }

// refreshAfter honours Cache-Control max-age within the configured bounds.
func (r *remoteKeys) refreshAfter(h http.Header) time.Duration {
	d := r.cfg.RefreshInterval
	for _, directive := range strings.Split(h.Get("Cache-Control"), ",") {
		name, val, _ := strings.Cut(strings.TrimSpace(directive), "=")
		switch strings.ToLower(name) {
		case "max-age":
			if s, err := strconv.ParseInt(strings.Trim(val, `"`), 10, 64); err == nil && s >= 0 {
				d = time.Duration(min(s, int64(365*24*3600))) * time.Second
			}
		case "no-cache", "no-store":
			d = 0
		}
	}
	return min(max(d, r.cfg.MinRefreshInterval), r.cfg.MaxRefreshInterval)
}

// newHTTPClient builds the client for key and metadata fetches: a timeout on
// everything, and redirects only within the same host, so a compromised
// endpoint cannot send the fetch to a host of its choosing.
func newHTTPClient(base *http.Client, timeout time.Duration) *http.Client {
	c := &http.Client{Timeout: timeout}
	if base != nil {
		c.Transport = base.Transport
	}
	c.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		if len(via) >= 3 {
			return errors.New("too many redirects")
		}
		if req.URL.Host != via[0].URL.Host || (via[0].URL.Scheme == "https" && req.URL.Scheme != "https") {
			return fmt.Errorf("redirect to another host or scheme (%s) refused", req.URL.Host)
		}
		return nil
	}
	return c
}
