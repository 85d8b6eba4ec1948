package verify

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/sync/singleflight"

	"github.com/tokenauthz/tokenauthz/cache"
)

// Options are the dependencies of a Verifier. Zero values take defaults.
type Options struct {
	// HTTPClient supplies the transport for key fetches (its redirect policy
	// and timeout are replaced).
	HTTPClient *http.Client
	Logger     *slog.Logger
	// Now is the clock, for tests.
	Now func() time.Time
	// CacheMaxBytes bounds the memory held by cached introspection and
	// userinfo answers. Default cache.DefaultMaxBytes.
	CacheMaxBytes uint64
	// Shared is the fleet's Redis tier for key sets and answers; nil keeps
	// everything in process.
	Shared *cache.Shared
	// TracerProvider and Propagator for spans and for the trace context
	// sent to providers. Default: the otel globals.
	TracerProvider trace.TracerProvider
	Propagator     propagation.TextMapPropagator
	// CallTrace, if set, gives a provider call's ctx the trace context of
	// the call that caused it, when ctx carries none: a caller that reads
	// that context only when it is used (authz without an exporter, see
	// authz.CallTrace) sets it.
	CallTrace func(context.Context) context.Context
	// Observer receives events for metrics. Default: none.
	Observer Observer
	// VerifiedTokens bounds the cache of tokens that passed local
	// verification.
	VerifiedTokens VerifiedCacheOptions
}

// VerifiedCacheOptions tune the verified-token cache: a token seen before
// is recognised by its SHA-256 and its claims reused, without parsing or
// signature work, until its exp (plus leeway) or MaxTTL. Route checks,
// revocation and introspection still run on every request; an entry is
// ignored once its issuer's config or keys change. A token is kept from its
// second verification on (cache.Doorkeeper): one presented once, as by a
// client that mints a token per request, is never kept.
type VerifiedCacheOptions struct {
	// MaxBytes bounds its memory. Default 32 MiB.
	MaxBytes uint64
	// MaxTTL bounds how long an entry lives. Default 10m.
	MaxTTL time.Duration
	// Disabled verifies every token every time.
	Disabled bool
}

// Verifier verifies JWTs for a fixed set of issuers. It is safe for
// concurrent use.
type Verifier struct {
	// byIss are the issuers by iss value: several when policy sources
	// configure one provider more than once (two teams' audiences); a
	// route's accepted issuers choose among them.
	byIss  map[string][]*Issuer
	byName map[string]*Issuer
	// templates are the issuer templates, in config order: an iss that no
	// issuer names exactly is matched against them.
	templates []*tenantFamily
	// lazy are the issuers with remote keys beyond the first eagerIssuers:
	// loaded in the background and on first use, refreshed on use.
	lazy []*remoteKeys
	// bySharedName finds an issuer's keys by their Redis name, for nudges.
	bySharedName map[string][]*remoteKeys
	// introspecting are the issuers with an introspection endpoint, in
	// config order: the ones an opaque token may be shown to.
	introspecting []*Issuer
	now           func() time.Time
	answers       *answers
	verified      *cache.Cache[*verified] // nil when disabled
	door          *cache.Doorkeeper       // admits to verified a token seen before
	dpop          *dpopMemory             // DPoP state that outlives reloads
	shared        *cache.Shared
	tel           *telemetry
	opts          Options
	stop          context.CancelFunc // ends the key-set subscription (set by Start)
}

// Issuer is one configured issuer with its key source.
type Issuer struct {
	// cfg is shared by a template's tenants (it is never modified);
	// iss is this issuer's own identifier.
	cfg     *IssuerConfig
	iss     string
	name    string
	leeway  time.Duration
	algs    map[string]algSpec
	auds    map[string]struct{}
	hmacKey *verifyKey
	src     keySource // nil when the issuer only has an HMAC secret

	introspection *introspector   // nil unless configured
	userinfo      *userinfoClient // nil unless configured
	dpop          *proofs         // nil unless configured
	tel           *telemetry

	// id names what the issuer is (its config and the files it reads), so a
	// reload keeps an unchanged issuer and cached answers never outlive a
	// change.
	id string
	// tenants is set on an issuer template: its tenants' issuers.
	tenants *tenantFamily
	// For a tenant's issuer: the tenant, its template's family, and
	// whether the family dropped it for room (then tokens verified under
	// it are verified again, under the tenant's issuer made anew).
	tenant     string
	family     *tenantFamily
	evicted    atomic.Bool
	tmplClient *http.Client // a template's key-fetch client, for its tenants
	// keyGen is the generation of the remote key set held (see
	// remoteKeys.published); 0 for other key sources.
	keyGen  atomic.Uint64
	startMu sync.Mutex
	stop    context.CancelFunc // ends the refresh loop; nil until started
}

// Name is the configured issuer name.
func (i *Issuer) Name() string { return i.name }

// ID is the issuer identifier (the iss value): what names the issuer across
// a fleet whose pods may call it by different names.
func (i *Issuer) ID() string { return i.iss }

// Tenant is the value of the issuer template's {tenant} for a tenant's
// issuer; "" for other issuers.
func (i *Issuer) Tenant() string { return i.tenant }

// New builds a Verifier. Configs must be valid (see IssuerConfig.Validate);
// New reports the first problem otherwise.
func New(cfgs []IssuerConfig, o Options) (*Verifier, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	tel := newTelemetry(o)
	if o.HTTPClient == nil {
		o.HTTPClient = &http.Client{}
	}
	o.HTTPClient = &http.Client{Transport: tel.transport(o.HTTPClient.Transport)}
	answers := cache.New(cache.Options{MaxBytes: o.CacheMaxBytes, Now: o.Now}, answerSize)
	if o.Shared != nil {
		answers.Share(o.Shared, "answer:", answerCodec)
	}
	var (
		ver  *cache.Cache[*verified]
		door *cache.Doorkeeper
	)
	if !o.VerifiedTokens.Disabled {
		if o.VerifiedTokens.MaxBytes == 0 {
			o.VerifiedTokens.MaxBytes = 32 << 20
		}
		if o.VerifiedTokens.MaxTTL <= 0 {
			o.VerifiedTokens.MaxTTL = 10 * time.Minute
		}
		ver = cache.New(cache.Options{MaxBytes: o.VerifiedTokens.MaxBytes, Now: o.Now}, func(e *verified) int { return e.size })
		// A slot for every 256 bytes of the cache (1/32 of it again, 1 MiB
		// by default): a cached token weighs 2-3 times that, so a token
		// used once is remembered while the cache turns over several times.
		door = cache.NewDoorkeeper(int(min(o.VerifiedTokens.MaxBytes/256, 1<<24)))
	}
	v, err := build(cfgs, o, tel, answers, newDPoPMemory(o.Now), nil)
	if v != nil {
		v.verified, v.door = ver, door
	}
	return v, err
}

// Reload builds a Verifier for cfgs that keeps every issuer of v whose
// configuration (and the files it names) did not change, with its keys and
// refresh loop, and shares v's answer cache. Start the new Verifier, swap it
// in, then Retire v.
func (v *Verifier) Reload(cfgs []IssuerConfig) (*Verifier, error) {
	nv, err := build(cfgs, v.opts, v.tel, v.answers, v.dpop, v)
	if nv != nil {
		nv.verified, nv.door = v.verified, v.door // entries of changed issuers are ignored on use
	}
	return nv, err
}

// followBound is how long a pod follows another pod's introspection or
// userinfo call: the slowest endpoint's timeout, plus a margin.
func followBound(cfgs []IssuerConfig) time.Duration {
	d := defaultEndpointTimeout
	for _, c := range cfgs {
		if c.Introspection != nil {
			d = max(d, c.Introspection.Timeout)
		}
		if c.Userinfo != nil {
			d = max(d, c.Userinfo.Timeout)
		}
	}
	return d + time.Second
}

func build(cfgs []IssuerConfig, o Options, tel *telemetry, answers *answers, mem *dpopMemory, prev *Verifier) (*Verifier, error) {
	answers.FollowFor(followBound(cfgs))
	v := &Verifier{tel: tel, byIss: map[string][]*Issuer{}, byName: map[string]*Issuer{}, now: o.Now,
		answers: answers, shared: o.Shared, opts: o, dpop: mem, bySharedName: map[string][]*remoteKeys{}}
	remote := 0
	for idx := range cfgs {
		c := cfgs[idx]
		if p := c.Validate(); len(p) > 0 {
			return nil, fmt.Errorf("verify: issuer %q: %s", c.Name, p[0])
		}
		if _, dup := v.byName[c.Name]; dup {
			return nil, fmt.Errorf("verify: issuer name %q used twice", c.Name)
		}
		id := identity(c)
		is := (*Issuer)(nil)
		if c.IssuerTemplate == "" && (c.JWKSURI != "" || c.Discovery) {
			remote++
		}
		if prev != nil && prev.byName[c.Name] != nil && prev.byName[c.Name].id == id {
			is = prev.byName[c.Name]
			if is.tenants != nil && len(c.Tenants.Allow) > 0 {
				is.tenants.allow(c.Tenants.Allow)
			}
		} else {
			var err error
			if is, err = newIssuer(c, o, tel, mem); err != nil {
				return nil, fmt.Errorf("verify: issuer %q: %w", c.Name, err)
			}
			is.id = id
			if rk, ok := is.src.(*remoteKeys); ok && remote > eagerIssuers {
				rk.lazy = true // set before the issuer is shared
			}
			if c.IssuerTemplate != "" {
				if is.tenants, err = newTenantFamily(is, o, mem); err != nil {
					return nil, fmt.Errorf("verify: issuer %q: %w", c.Name, err)
				}
			}
		}
		v.byName[c.Name] = is
		if is.introspection != nil && is.tenants == nil {
			v.introspecting = append(v.introspecting, is)
		}
		if is.tenants != nil {
			v.templates = append(v.templates, is.tenants)
			continue
		}
		v.byIss[c.Issuer] = append(v.byIss[c.Issuer], is)
		if rk, ok := is.src.(*remoteKeys); ok {
			v.bySharedName[rk.sharedName] = append(v.bySharedName[rk.sharedName], rk)
			if rk.lazy {
				v.lazy = append(v.lazy, rk)
			}
		}
	}
	return v, nil
}

// eagerIssuers is how many issuers with remote keys (the first, in config
// order) load at start, refresh in the background and hold readiness until
// their keys are in. The others load in the background, warmIssuers at a
// time, or on first use, and refresh when used: ten thousand issuers need
// neither ten thousand fetches at start nor ten thousand timers.
const (
	eagerIssuers = 64
	warmIssuers  = 8
)

// identity hashes an issuer's config and the contents of the files and
// variables it reads (key set, secrets), so that a rotated secret file
// counts as a change.
//
// A template's tenants.allow list is left out: a reload that changes it
// keeps the template's tenants and their keys (build updates the list).
func identity(c IssuerConfig) string {
	h := sha256.New()
	if c.Tenants != nil {
		ts := *c.Tenants
		ts.Allow = nil
		c.Tenants = &ts
	}
	b, _ := json.Marshal(c)
	h.Write(b)
	files := []string{c.JWKSFile, c.HMACSecretFile}
	envs := []string{c.HMACSecretEnv}
	if in := c.Introspection; in != nil {
		files, envs = append(files, in.ClientSecretFile), append(envs, in.ClientSecretEnv)
	}
	for _, f := range files {
		if f != "" {
			data, _ := os.ReadFile(f)
			h.Write([]byte{0})
			h.Write(data)
		}
	}
	for _, e := range envs {
		if e != "" {
			h.Write([]byte{0})
			h.Write([]byte(os.Getenv(e)))
		}
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

func newIssuer(c IssuerConfig, o Options, tel *telemetry, mem *dpopMemory) (*Issuer, error) {
	is := &Issuer{tel: tel, cfg: &c, iss: c.Issuer, name: c.Name, leeway: c.leeway(), algs: map[string]algSpec{}, auds: map[string]struct{}{}}
	template := c.IssuerTemplate != ""
	for _, a := range c.Algorithms {
		is.algs[a] = algorithms[a]
	}
	for _, a := range c.Audiences {
		is.auds[a] = struct{}{}
	}
	if c.DPoP != nil && !template {
		now := o.Now
		if now == nil {
			now = time.Now
		}
		is.dpop = newProofs(c.DPoP, is.leeway, now, o.Shared, c.Issuer, mem)
	}
	keys := c.Keys.withDefaults()
	if secret, err := c.hmacSecret(); err != nil {
		return nil, err
	} else if secret != nil {
		is.hmacKey = &verifyKey{kty: ktyOct, raw: secret}
	}
	switch {
	case template && (c.JWKSURI != "" || c.Discovery):
		// Each tenant gets its own remote key source (tenants.go).
		is.tmplClient = newHTTPClient(o.HTTPClient, keys.Timeout)
	case c.JWKSURI != "" || c.Discovery:
		is.src = &remoteKeys{
			issuer: c.Issuer, jwksURI: c.JWKSURI, discovery: c.Discovery, otherHosts: c.DiscoveryAllowedHosts, cfg: keys,
			client: newHTTPClient(o.HTTPClient, keys.Timeout), flights: new(singleflight.Group),
			log: o.Logger.With("issuer_name", c.Name), now: o.Now,
			shared: o.Shared, sharedName: sharedKeySetName(c), tel: tel, issuerName: c.Name, published: &is.keyGen,
		}
	case c.JWKSFile != "" || c.JWKS != "":
		b := []byte(c.JWKS)
		if c.JWKSFile != "" {
			var err error
			if b, err = os.ReadFile(c.JWKSFile); err != nil {
				return nil, err
			}
		}
		ks, err := parseKeySet(b, keys.MaxKeys)
		if err != nil {
			return nil, err
		}
		is.src = staticKeys{set: ks}
	}
	if in := c.Introspection; in != nil {
		secret, err := cache.ReadSecret(in.ClientSecretFile, in.ClientSecretEnv)
		if err != nil {
			return nil, fmt.Errorf("introspection client secret: %w", err)
		}
		is.introspection = &introspector{cfg: in, secret: string(secret),
			endpoint: newEndpoint("introspection", is, in.Endpoint, func(d *discoveryDoc) string { return d.IntrospectionEndpoint },
				o.HTTPClient, in.Timeout, in.MaxResponseBytes, in.CacheTTL, in.NegativeCacheTTL)}
		if n := in.MaxCallsPerSecond; n >= 0 {
			if n == 0 {
				n = defaultMaxCallsPerSecond
			}
			per := in.MaxCallsPerClientPerSecond
			if per == 0 {
				per = max(1, n/10)
			}
			is.introspection.budget = newCallBudget(n, per)
		}
	}
	if ui := c.Userinfo; ui != nil {
		is.userinfo = &userinfoClient{cfg: ui,
			endpoint: newEndpoint("userinfo", is, ui.Endpoint, func(d *discoveryDoc) string { return d.UserinfoEndpoint },
				o.HTTPClient, ui.Timeout, ui.MaxResponseBytes, ui.CacheTTL, ui.NegativeCacheTTL)}
	}
	return is, nil
}

// Start refreshes remote key sets in the background until ctx ends; the first
// load begins at once. With a Redis tier it also listens for key sets other
// pods fetched, so a rotation one pod sees reaches every pod.
//
// Issuers kept from a previous Verifier by Reload are already running and
// are left alone.
func (v *Verifier) Start(ctx context.Context) {
	for _, is := range v.byName {
		if rk, ok := is.src.(*remoteKeys); ok && rk.lazy {
			continue
		}
		is.start(ctx)
	}
	if len(v.lazy) > 0 {
		go v.warm(ctx)
	}
	if v.shared != nil {
		sctx, stop := context.WithCancel(ctx)
		v.stop = stop
		go v.shared.Subscribe(sctx, keysChannel, v.keySetNudged, v.resyncKeySets)
	}
}

// Retire stops what v runs that next does not use: the refresh loops of
// issuers next did not keep, and v's key-set subscription.
func (v *Verifier) Retire(next *Verifier) {
	if v.stop != nil {
		v.stop()
	}
	for name, is := range v.byName {
		if next == nil || next.byName[name] != is {
			is.startMu.Lock()
			if is.stop != nil {
				is.stop()
			}
			is.startMu.Unlock()
		}
	}
}

func (is *Issuer) start(ctx context.Context) {
	if is.src == nil && is.tenants == nil {
		return
	}
	is.startMu.Lock()
	defer is.startMu.Unlock()
	if is.stop == nil {
		ctx, is.stop = context.WithCancel(ctx)
		if is.tenants != nil {
			go is.tenants.watch(ctx)
		} else {
			go is.src.run(ctx)
		}
	}
}

// warm loads the lazy issuers' keys in the background, a few at a time, so
// that their first tokens seldom wait; an issuer a token needed first is
// skipped.
func (v *Verifier) warm(ctx context.Context) {
	sem := make(chan struct{}, warmIssuers)
	var wg sync.WaitGroup
	for _, rk := range v.lazy {
		select {
		case <-ctx.Done():
			wg.Wait()
			return
		case sem <- struct{}{}:
		}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if !rk.loaded() {
				_, _ = rk.keys(ctx)
			}
		}()
	}
	wg.Wait()
}

// keySetNudged takes the set another pod just published, if it is ours.
// (A tenant's issuer looks in Redis when its set is due or lacks a kid.)
func (v *Verifier) keySetNudged(name string) {
	for _, rk := range v.bySharedName[name] {
		rk.adoptShared(context.Background())
	}
}

// resyncKeySets catches up on nudges missed while unsubscribed; lazy
// issuers catch up when used.
func (v *Verifier) resyncKeySets() {
	for _, rks := range v.bySharedName {
		for _, rk := range rks {
			if !rk.lazy {
				rk.adoptShared(context.Background())
			}
		}
	}
}

// sharedKeySetName names an issuer's key set in Redis by what it is (the
// issuer and where its keys come from), not by the local issuer name, so
// pods with different names for one issuer share it and pods with one name
// for different issuers do not.
func sharedKeySetName(c IssuerConfig) string {
	src := c.JWKSURI
	if c.Discovery {
		src = "discovery"
	}
	sum := sha256.Sum256([]byte(c.Issuer + "\n" + src))
	return hex.EncodeToString(sum[:16])
}

// Ready reports whether the keys of every issuer that loads at start (not
// the lazy ones, nor tenants) have been loaded at least once.
func (v *Verifier) Ready() bool {
	for _, is := range v.byName {
		if rk, ok := is.src.(*remoteKeys); ok && rk.lazy {
			continue
		}
		if is.src != nil && !is.src.loaded() {
			return false
		}
	}
	return true
}

// KeySetAges is, per issuer with a remote key set, the time since the set
// held was fetched (by this pod or, through Redis, another).
func (v *Verifier) KeySetAges() map[string]time.Duration {
	out := map[string]time.Duration{}
	for name, is := range v.byName {
		if rk, ok := is.src.(*remoteKeys); ok {
			if ks := rk.current(); ks != nil {
				out[name] = v.now().Sub(ks.fetchedAt)
			}
		}
	}
	return out
}

// Issuer returns the issuer configured under name.
func (v *Verifier) Issuer(name string) (*Issuer, bool) {
	is, ok := v.byName[name]
	return is, ok
}

// Result is a verified token.
type Result struct {
	Issuer *Issuer
	Claims Claims
	// Expiry is the token's exp, zero if it has none.
	Expiry time.Time
	// Kind is KindJWT or KindOpaque.
	Kind string
	// Userinfo holds the userinfo endpoint's claims, nil when not fetched.
	// They are read through Lookup as "userinfo.<claim>", never from Claims.
	Userinfo Claims
	// KeySource and AnswerSource say where this request's keys and
	// introspection answer came from (memory, redis, origin); "" if unused.
	KeySource, AnswerSource cache.Source
}

// Token kinds, for Result.Kind.
const (
	KindJWT    = "jwt"
	KindOpaque = "opaque"
)

// Introspect says when a route asks the introspection endpoint.
type Introspect int

const (
	// IntrospectOpaque: opaque tokens are introspected, JWTs verified
	// locally only. The default.
	IntrospectOpaque Introspect = iota
	// IntrospectAlways: JWTs are verified locally and then confirmed active
	// by introspection, so a revoked JWT is refused before its exp.
	IntrospectAlways
	// IntrospectNever: only JWTs are accepted.
	IntrospectNever
)

// Policy is what a route asks of a token.
type Policy struct {
	// Issuers are the names of the issuers accepted.
	Issuers []string
	// Introspect says when to ask the introspection endpoint.
	Introspect Introspect
	// Userinfo fetches the userinfo endpoint's claims, read as
	// "userinfo.<claim>" (e.g. userinfo.email).
	Userinfo bool
	// Client is the requester's address (per request, not per route): the
	// provider call budget is shared fairly between clients.
	Client string
	// Syntax, when set, checks the raw token's syntax (authz: RFC 6750's
	// b64token) before any parsing or provider call, but not for a token
	// the verified-token cache recognises: those bytes passed it before, so
	// a warm check costs one hash, not a scan of the token.
	Syntax func(string) bool

	// index is Issuers as a set (see Index).
	index map[string]struct{}
}

// Index prepares a policy that is used for many requests: with a long
// issuers list (thousands of issuers), accepting one costs a map lookup.
func (p *Policy) Index() {
	if len(p.Issuers) > 8 {
		p.index = make(map[string]struct{}, len(p.Issuers))
		for _, n := range p.Issuers {
			p.index[n] = struct{}{}
		}
	}
}

func (p *Policy) accepts(name string) bool {
	if p.index != nil {
		_, ok := p.index[name]
		return ok
	}
	return slices.Contains(p.Issuers, name)
}

func badSyntax() *Error {
	return invalid("malformed", "the Authorization header is not a bearer token")
}

// Verify checks a bearer token for a route. A compact JWS is verified
// locally: its unverified iss picks the issuer before any key work, so an
// unknown or unaccepted issuer costs no signature check. Any other token is
// opaque and goes to the introspection endpoints of the accepted issuers.
// Errors are *Error.
func (v *Verifier) Verify(ctx context.Context, raw string, p Policy) (*Result, error) {
	var (
		res *Result
		err error
		tk  tokenKey
	)
	if LooksLikeJWT(raw) {
		if res, err = v.verifyJWT(ctx, raw, &p); err != nil {
			return nil, err
		}
		if p.Introspect == IntrospectAlways {
			if res.Issuer.introspection == nil {
				// Config validation prevents this; fail closed regardless.
				return nil, unavailable("issuer "+res.Issuer.name+" has no introspection endpoint", nil)
			}
			tk = hashToken(raw)
			a, src, err := v.introspect(ctx, res.Issuer, raw, tk, p.Client)
			if err != nil {
				return nil, err
			}
			res.AnswerSource = src
			if !a.ok {
				return nil, tagIssuer(invalid("inactive", "token is not active (revoked or expired at the issuer)"), res.Issuer.name)
			}
		}
	} else {
		if p.Syntax != nil && !p.Syntax(raw) {
			return nil, badSyntax()
		}
		if p.Introspect == IntrospectNever {
			return nil, invalid("malformed", "token is not a JWT")
		}
		tk = hashToken(raw)
		if res, err = v.introspectOpaque(ctx, raw, tk, &p); err != nil {
			return nil, err
		}
	}
	if ui := res.Issuer.userinfo; ui != nil && (p.Userinfo || ui.cfg.EveryRoute) {
		if tk == "" {
			tk = hashToken(raw)
		}
		if err := v.enrich(ctx, res, raw, tk, p.Client); err != nil {
			return nil, tagIssuer(err, res.Issuer.name)
		}
	}
	return res, nil
}

func (v *Verifier) verifyJWT(ctx context.Context, raw string, p *Policy) (*Result, error) {
	var key string
	if v.verified != nil {
		sum := sum256(raw)
		key = string(sum[:])
		if e, ok := v.verified.Peek(key); ok && v.current(e.is) && e.keyGen == e.is.keyGeneration() {
			if !p.accepts(e.is.name) {
				// Verified for another issuer of the same iss (another
				// team's audiences, or another template): verify it for
				// this route's.
				if len(v.byIss[e.is.iss]) > 1 || e.is.family != nil && len(v.templates) > 1 {
					goto parse
				}
				return nil, tagIssuer(invalid("issuer_not_allowed", "token issuer is not accepted for this route"), e.is.name)
			}
			v.tel.obs.Served("tokens", cache.FromMemory)
			return &Result{Issuer: e.is, Claims: e.claims, Expiry: e.exp, Kind: KindJWT, KeySource: cache.FromMemory}, nil
		}
	}
parse:
	if p.Syntax != nil && !p.Syntax(raw) {
		return nil, badSyntax()
	}
	t, err := parseJWT(raw)
	if err != nil {
		return nil, err
	}
	iss, ok := t.claims["iss"].(string)
	if !ok {
		return nil, invalid("unknown_issuer", "token has no iss")
	}
	candidates := v.byIss[iss]
	var is *Issuer
	for _, c := range candidates {
		if p.accepts(c.name) {
			is = c
			break
		}
	}
	if is == nil {
		if len(candidates) > 0 {
			return nil, tagIssuer(invalid("issuer_not_allowed", "token issuer is not accepted for this route"), candidates[0].name)
		}
		if len(v.templates) == 0 {
			return nil, invalid("unknown_issuer", "token issuer is not trusted")
		}
		if is, err = v.matchTemplates(iss, p); err != nil {
			return nil, err
		}
	}
	src, gen, err := is.verifySignature(ctx, t)
	if err != nil {
		return nil, tagIssuer(err, is.name)
	}
	now := v.now()
	exp, err := is.checkClaims(t.claims, now, false)
	if err != nil {
		return nil, tagIssuer(err, is.name)
	}
	if is.family != nil {
		is.family.loadedOnce(is)
	}
	if v.verified != nil {
		v.tel.obs.Served("tokens", cache.FromOrigin)
	}
	if v.verified != nil && v.door.Admit(key) {
		ttl := v.opts.VerifiedTokens.MaxTTL
		if !exp.IsZero() {
			ttl = min(ttl, exp.Add(is.leeway).Sub(now))
		}
		v.verified.Set(key, &verified{is: is, claims: t.claims, exp: exp, keyGen: gen, size: len(raw) * 2}, ttl)
	}
	return &Result{Issuer: is, Claims: t.claims, Expiry: exp, Kind: KindJWT, KeySource: src}, nil
}

// current says whether is is still this Verifier's: its issuer, or a
// tenant's issuer of its template that is still held and whose tenant is
// still accepted (the tenants file may have dropped it).
func (v *Verifier) current(is *Issuer) bool {
	if f := is.family; f != nil {
		return v.byName[is.name] == f.root && !is.evicted.Load() && f.admits(is.tenant)
	}
	return v.byName[is.name] == is
}

// verified is a token that passed local verification under an issuer's
// config (the *Issuer) and keys (keyGen). Its claims are shared by every
// request that presents the token, so nothing may modify them.
type verified struct {
	is     *Issuer
	claims Claims
	exp    time.Time
	keyGen uint64
	size   int
}

func (is *Issuer) keyGeneration() uint64 { return is.keyGen.Load() }

// introspectOpaque asks the accepted issuers that have an introspection
// endpoint, in configuration order, until one says active. An opaque token
// names no issuer, so with several such issuers it is shown to each in turn:
// restrict a route's issuers to keep a token with its own provider.
func (v *Verifier) introspectOpaque(ctx context.Context, raw string, tk tokenKey, p *Policy) (*Result, error) {
	var failed *Error
	asked := false
	var askedNames []string
	client := p.Client
	for _, is := range v.introspecting {
		if !p.accepts(is.name) {
			continue
		}
		asked = true
		askedNames = append(askedNames, is.name)
		a, src, err := v.introspect(ctx, is, raw, tk, client)
		if err != nil {
			// Another issuer may still say active; if none does, this
			// failure means no decision was possible.
			if failed == nil {
				failed = AsError(err)
			}
			continue
		}
		if !a.ok {
			continue
		}
		if iss, present := a.claims["iss"]; present && iss != is.iss {
			return nil, tagIssuer(invalid("unknown_issuer", "introspected token issuer does not match"), is.name)
		}
		exp, err := is.checkClaims(a.claims, v.now(), true)
		if err != nil {
			return nil, tagIssuer(err, is.name)
		}
		return &Result{Issuer: is, Claims: a.claims, Expiry: exp, Kind: KindOpaque, AnswerSource: src}, nil
	}
	switch {
	case failed != nil:
		return nil, failed
	case !asked:
		return nil, invalid("malformed", "token is not a JWT")
	case len(askedNames) == 1:
		return nil, tagIssuer(invalid("inactive", "token is not active"), askedNames[0])
	}
	return nil, invalid("inactive", "token is not active")
}

// enrich adds the userinfo endpoint's claims to the result, apart from the
// token's: "userinfo.email" reads only what the endpoint said.
func (v *Verifier) enrich(ctx context.Context, res *Result, raw string, tk tokenKey, client string) error {
	a, err := v.userinfo(ctx, res.Issuer, raw, tk, res.Expiry, client)
	if err != nil {
		return err
	}
	if !a.ok {
		return invalid("inactive", "the issuer's userinfo endpoint does not accept the token")
	}
	// OIDC Core §5.3.2: a userinfo response whose sub differs from the
	// token's must not be used.
	if sub, ok := res.Claims["sub"]; ok && a.claims["sub"] != sub {
		return invalid("userinfo_mismatch", "userinfo does not belong to the token's subject")
	}
	res.Userinfo = a.claims
	return nil
}

// verifySignature checks t's signature with the issuer's keys and says
// where the keys came from for this request and their generation.
func (is *Issuer) verifySignature(ctx context.Context, t *jwt) (cache.Source, uint64, error) {
	spec, ok := is.algs[t.alg]
	if !ok {
		return "", 0, invalid("alg_not_allowed", "token algorithm "+truncate(t.alg, 16)+" is not allowed for this issuer")
	}
	if want := is.cfg.TokenType; want != "" && !typeMatches(t.typ, want) {
		return "", 0, invalid("wrong_type", "token type must be "+want)
	}
	if spec.kty == ktyOct {
		// The one shared secret; a kid on an HMAC token selects nothing.
		if !is.hmacKey.verify(spec, t.signingInput, t.signature) {
			return cache.FromMemory, 0, invalid("bad_signature", "token signature is invalid")
		}
		return cache.FromMemory, 0, nil
	}
	if is.src == nil {
		return "", 0, invalid("alg_not_allowed", "issuer has no key set for "+t.alg)
	}
	ks, src, err := is.lookupKeys(ctx, t.kid)
	if err != nil {
		return "", 0, err
	}
	_, span := is.tel.start(ctx, "tokenauthz.verify.signature", attribute.String("jwt.alg", t.alg))
	defer span.End()
	tried := false
	for i := range ks.keys {
		k := &ks.keys[i]
		if (t.kid != "" && k.kid != t.kid) || !k.fits(t.alg, spec) {
			continue
		}
		tried = true
		if k.verify(spec, t.signingInput, t.signature) {
			return src, ks.gen, nil
		}
	}
	if !tried {
		return src, 0, invalid("key_mismatch", "no key of the issuer fits the token's algorithm and key id")
	}
	return src, 0, invalid("bad_signature", "token signature is invalid")
}

// lookupKeys returns the issuer's key set holding kid (when the token names
// one), refetching at most once per interval for an unknown kid.
func (is *Issuer) lookupKeys(ctx context.Context, kid string) (ks *keySet, src cache.Source, err error) {
	ctx, span := is.tel.start(ctx, "tokenauthz.keys.lookup", attribute.String("tokenauthz.issuer", is.name))
	held := is.src.current()
	defer func() {
		// A set other than the one held before was loaded for this request.
		src = cache.FromMemory
		if ks != nil && ks != held {
			src = ks.src
		}
		span.SetAttributes(attribute.String("tokenauthz.source", string(src)))
		if err == nil {
			is.tel.obs.Served("keys", src)
		}
		end(span, err)
	}()
	if ks, err = is.src.keys(ctx); err != nil {
		return nil, "", err
	}
	if kid != "" && !ks.hasKid(kid) {
		// Maybe the issuer rotated: look again, at most once per interval.
		span.AddEvent("unknown kid: refetch")
		var ferr error
		ks, ferr = is.src.refetch(ctx, ks)
		switch {
		case ks != nil && ks.hasKid(kid):
		case ferr != nil:
			// The provider did not answer: nothing was decided about the
			// token, which may carry a new key (a 401 would make the
			// client throw a good token away).
			return nil, "", unavailable("the token's key id is not in the issuer's key set held, and the issuer's keys could not be fetched again", ferr)
		default:
			return nil, "", invalid("unknown_kid", "token key id is not in the issuer's key set")
		}
	}
	return ks, "", nil
}

// checkClaims applies the issuer's claim rules. For an introspection answer
// (introspected), aud and exp are checked when present: RFC 7662 makes them
// optional, and the provider's active: true already vouches for the token.
func (is *Issuer) checkClaims(c Claims, now time.Time, introspected bool) (time.Time, error) {
	_, hasAud := c["aud"]
	if !is.cfg.AllowAnyAudience && (hasAud || !introspected) {
		if !is.audienceOK(c["aud"]) {
			return time.Time{}, invalid("wrong_audience", "token audience is not accepted")
		}
	}
	exp, hasExp, err := numericDate(c, "exp")
	if err != nil {
		return time.Time{}, err
	}
	if !hasExp && !is.cfg.AllowMissingExp && !introspected {
		return time.Time{}, invalid("malformed", "token has no exp")
	}
	if hasExp && !now.Before(exp.Add(is.leeway)) {
		return time.Time{}, invalid("expired", "token expired")
	}
	if nbf, ok, err := numericDate(c, "nbf"); err != nil {
		return time.Time{}, err
	} else if ok && now.Add(is.leeway).Before(nbf) {
		return time.Time{}, invalid("not_yet_valid", "token is not valid yet")
	}
	if iat, ok, err := numericDate(c, "iat"); err != nil {
		return time.Time{}, err
	} else if ok && now.Add(is.leeway).Before(iat) {
		return time.Time{}, invalid("issued_in_future", "token is issued in the future")
	}
	for _, name := range is.cfg.RequiredClaims {
		if v, ok := c.Lookup(name); !ok || v == nil {
			return time.Time{}, invalid("missing_claim", "token lacks required claim "+name)
		}
	}
	return exp, nil
}

func (is *Issuer) audienceOK(aud any) bool {
	switch a := aud.(type) {
	case string:
		_, ok := is.auds[a]
		return ok
	case []any:
		found := false
		for _, e := range a {
			s, isStr := e.(string)
			if !isStr {
				return false // a malformed aud is rejected, not skipped
			}
			if _, ok := is.auds[s]; ok {
				found = true
			}
		}
		return found
	}
	return false
}

func typeMatches(typ, want string) bool {
	norm := func(s string) string {
		s = strings.ToLower(s)
		return strings.TrimPrefix(s, "application/")
	}
	return norm(typ) == norm(want)
}

// tagIssuer names the issuer on an *Error that names none: a token refused
// for its issuer's rules (expired, bad signature, inactive) is that
// issuer's, in logs and metrics.
func tagIssuer(err error, name string) error {
	ve, ok := err.(*Error)
	if !ok || ve.Issuer != "" {
		return err
	}
	c := *ve
	c.Issuer = name
	return &c
}

// ProbeResult is one endpoint of an issuer reached by Probe.
type ProbeResult struct {
	Issuer, What string
	Err          error
}

// Probe reaches each issuer's remote endpoints once, in config order, and
// installs nothing: discovery and the key set (parsed under the issuer's
// rules), and the introspection and userinfo endpoints' URLs. It is for
// `validate --reach`: a config can be valid and still point nowhere.
func (v *Verifier) Probe(ctx context.Context) []ProbeResult {
	var out []ProbeResult
	names := make([]string, 0, len(v.byName))
	for n := range v.byName {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		is := v.byName[n]
		if f := is.tenants; f != nil {
			// A template is reached through a tenant: the first listed.
			set := f.allowed.Load()
			if set == nil || len(f.root.cfg.Tenants.Allow) == 0 {
				out = append(out, ProbeResult{Issuer: n, What: "issuer template (tenants are reached on first use; list one under tenants.allow to probe it)"})
				continue
			}
			is = f.instantiate(f.root.cfg.Tenants.Allow[0])
			n += " (tenant " + is.tenant + ")"
		}
		if r, ok := is.src.(*remoteKeys); ok {
			ks, err := r.fetch(ctx)
			what := "key set"
			if err == nil {
				what = fmt.Sprintf("key set (%d keys, %d skipped)", len(ks.keys), ks.skipped)
			}
			out = append(out, ProbeResult{Issuer: n, What: what, Err: err})
		}
		for _, e := range []*endpoint{endpointOf(is.introspection), endpointOfUI(is.userinfo)} {
			if e == nil {
				continue
			}
			allowHTTP := false
			if is.introspection != nil && e == is.introspection.endpoint {
				allowHTTP = is.introspection.cfg.AllowHTTP
			} else if is.userinfo != nil {
				allowHTTP = is.userinfo.cfg.AllowHTTP
			}
			u, err := e.url(ctx, allowHTTP)
			if err == nil {
				err = reach(ctx, e.client, u)
			}
			out = append(out, ProbeResult{Issuer: n, What: e.kind + " endpoint " + u, Err: err})
		}
	}
	return out
}

func endpointOf(in *introspector) *endpoint {
	if in == nil {
		return nil
	}
	return in.endpoint
}

func endpointOfUI(ui *userinfoClient) *endpoint {
	if ui == nil {
		return nil
	}
	return ui.endpoint
}

// reach makes one request to u without credentials: any HTTP answer (a 401
// is expected) shows the endpoint is there.
func reach(ctx context.Context, c *http.Client, u string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	drain(resp)
	resp.Body.Close()
	if resp.StatusCode >= 500 {
		return fmt.Errorf("HTTP %d", resp.StatusCode)
	}
	return nil
}
