package verify

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"
)

// Options are the dependencies of a Verifier. Zero values take defaults.
type Options struct {
	// HTTPClient supplies the transport for key fetches (its redirect policy
	// and timeout are replaced).
	HTTPClient *http.Client
	Logger     *slog.Logger
	// Now is the clock, for tests.
	Now func() time.Time
}

// Verifier verifies JWTs for a fixed set of issuers. It is safe for
// concurrent use.
type Verifier struct {
	byIss  map[string]*Issuer
	byName map[string]*Issuer
	now    func() time.Time
}

// Issuer is one configured issuer with its key source.
type Issuer struct {
	cfg     IssuerConfig
	name    string
	leeway  time.Duration
	algs    map[string]algSpec
	auds    map[string]struct{}
	hmacKey *verifyKey
	src     keySource // nil when the issuer only has an HMAC secret
}

// Name is the configured issuer name.
func (i *Issuer) Name() string { return i.name }

// New builds a Verifier. Configs must be valid (see IssuerConfig.Validate);
// New reports the first problem otherwise.
func New(cfgs []IssuerConfig, o Options) (*Verifier, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	v := &Verifier{byIss: map[string]*Issuer{}, byName: map[string]*Issuer{}, now: o.Now}
	for idx := range cfgs {
		c := cfgs[idx]
		if p := c.Validate(); len(p) > 0 {
			return nil, fmt.Errorf("verify: issuer %q: %s", c.Name, p[0])
		}
		if _, dup := v.byName[c.Name]; dup {
			return nil, fmt.Errorf("verify: issuer name %q used twice", c.Name)
		}
		if _, dup := v.byIss[c.Issuer]; dup {
			return nil, fmt.Errorf("verify: issuer %q configured twice", c.Issuer)
		}
		is, err := newIssuer(c, o)
		if err != nil {
			return nil, fmt.Errorf("verify: issuer %q: %w", c.Name, err)
		}
		v.byIss[c.Issuer] = is
		v.byName[c.Name] = is
	}
	return v, nil
}

func newIssuer(c IssuerConfig, o Options) (*Issuer, error) {
	is := &Issuer{cfg: c, name: c.Name, leeway: c.leeway(), algs: map[string]algSpec{}, auds: map[string]struct{}{}}
	for _, a := range c.Algorithms {
		is.algs[a] = algorithms[a]
	}
	for _, a := range c.Audiences {
		is.auds[a] = struct{}{}
	}
	keys := c.Keys.withDefaults()
	if secret, err := c.hmacSecret(); err != nil {
		return nil, err
	} else if secret != nil {
		is.hmacKey = &verifyKey{kty: ktyOct, raw: secret}
	}
	switch {
	case c.JWKSURI != "" || c.Discovery:
		is.src = &remoteKeys{
			issuer: c.Issuer, jwksURI: c.JWKSURI, discovery: c.Discovery, cfg: keys,
			client: newHTTPClient(o.HTTPClient, keys.Timeout),
			log:    o.Logger.With("issuer_name", c.Name), now: o.Now,
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
	return is, nil
}

// Start refreshes remote key sets in the background until ctx ends; the first
// load begins at once.
func (v *Verifier) Start(ctx context.Context) {
	for _, is := range v.byName {
		if is.src != nil {
			go is.src.run(ctx)
		}
	}
}

// Ready reports whether every issuer's keys have been loaded at least once.
func (v *Verifier) Ready() bool {
	for _, is := range v.byName {
		if is.src != nil && !is.src.loaded() {
			return false
		}
	}
	return true
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
}

// Verify checks a compact JWS. allowed lists the issuer names the caller
// accepts; the token's unverified iss picks the issuer before any key work,
// so an unknown or unaccepted issuer costs no signature check. Errors are
// *Error.
func (v *Verifier) Verify(ctx context.Context, raw string, allowed []string) (*Result, error) {
	t, err := parseJWT(raw)
	if err != nil {
		return nil, err
	}
	iss, ok := t.claims["iss"].(string)
	if !ok {
		return nil, invalid("unknown_issuer", "token has no iss")
	}
	is := v.byIss[iss]
	if is == nil {
		return nil, invalid("unknown_issuer", "token issuer is not trusted")
	}
	if !slices.Contains(allowed, is.name) {
		return nil, invalid("issuer_not_allowed", "token issuer is not accepted for this route")
	}
	if err := is.verifySignature(ctx, t); err != nil {
		return nil, err
	}
	exp, err := is.checkClaims(t.claims, v.now())
	if err != nil {
		return nil, err
	}
	return &Result{Issuer: is, Claims: t.claims, Expiry: exp}, nil
}

func (is *Issuer) verifySignature(ctx context.Context, t *jwt) error {
	spec, ok := is.algs[t.alg]
	if !ok {
		return invalid("alg_not_allowed", "token algorithm "+truncate(t.alg, 16)+" is not allowed for this issuer")
	}
	if want := is.cfg.TokenType; want != "" && !typeMatches(t.typ, want) {
		return invalid("wrong_type", "token type must be "+want)
	}
	if spec.kty == ktyOct {
		// The one shared secret; a kid on an HMAC token selects nothing.
		if spec.verifier.Verify([]byte(t.signingInput), t.signature, is.hmacKey.raw) != nil {
			return invalid("bad_signature", "token signature is invalid")
		}
		return nil
	}
	if is.src == nil {
		return invalid("alg_not_allowed", "issuer has no key set for "+t.alg)
	}
	ks, err := is.src.keys(ctx)
	if err != nil {
		return err
	}
	if t.kid != "" && !ks.hasKid(t.kid) {
		// Maybe the issuer rotated: look again, at most once per interval.
		ks = is.src.refetch(ctx)
		if ks == nil || !ks.hasKid(t.kid) {
			return invalid("unknown_kid", "token key id is not in the issuer's key set")
		}
	}
	tried := false
	for i := range ks.keys {
		k := &ks.keys[i]
		if (t.kid != "" && k.kid != t.kid) || !k.fits(t.alg, spec) {
			continue
		}
		tried = true
		if spec.verifier.Verify([]byte(t.signingInput), t.signature, k.raw) == nil {
			return nil
		}
	}
	if !tried {
		return invalid("key_mismatch", "no key of the issuer fits the token's algorithm and key id")
	}
	return invalid("bad_signature", "token signature is invalid")
}

func (is *Issuer) checkClaims(c Claims, now time.Time) (time.Time, error) {
	if !is.cfg.AllowAnyAudience {
		if !is.audienceOK(c["aud"]) {
			return time.Time{}, invalid("wrong_audience", "token audience is not accepted")
		}
	}
	exp, hasExp, err := numericDate(c, "exp")
	if err != nil {
		return time.Time{}, err
	}
	if !hasExp && !is.cfg.AllowMissingExp {
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
