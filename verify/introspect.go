package verify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/sony/gobreaker/v2"
	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/protobuf/proto"

	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/proto/cachev1"
)

const (
	authBasic = "client_secret_basic"
	authPost  = "client_secret_post"
)

// providerAnswer is what an introspection or userinfo endpoint said about a
// token: the only thing cached, so that route checks (scopes, claim values)
// still run on every request against it.
type providerAnswer struct {
	// ok: introspection said active: true, or userinfo answered 200.
	ok     bool
	claims Claims
	exp    time.Time // from the claims; zero if none
	size   int       // bytes of the response, for the cache bound
}

func answerSize(a *providerAnswer) int { return a.size }

// tokenKey is the hex SHA-256 of a token: what cache keys are built from, so
// that a raw token is never stored or logged.
type tokenKey string

func hashToken(raw string) tokenKey { return tokenKey(cache.Hash(raw)) }

// endpoint is one introspection or userinfo endpoint of an issuer. The URL
// is fixed by config or read from discovery, never taken from a token.
type endpoint struct {
	kind     string // "introspection" or "userinfo", for messages
	issuer   *Issuer
	fixedURL string
	fromDoc  func(*discoveryDoc) string
	client   *http.Client
	maxBytes int64
	ttl      time.Duration
	negTTL   time.Duration
	// br pauses calls to a provider that keeps failing, so that an outage
	// is not met with a call per request (failures are never cached).
	br *gobreaker.CircuitBreaker[*providerAnswer]
	// budget bounds calls per second, fairly by client (nil: unbounded).
	budget *callBudget
}

// Breaker settings for provider endpoints: after this many consecutive
// failures, calls pause for providerPause (answered at once with a 503),
// then one probe goes through.
const (
	providerFailures = 5
	providerPause    = time.Second
)

func newEndpoint(kind string, is *Issuer, fixedURL string, fromDoc func(*discoveryDoc) string,
	base *http.Client, timeout time.Duration, maxBytes int64, ttl, negTTL *time.Duration) *endpoint {
	if timeout <= 0 {
		timeout = defaultEndpointTimeout
	}
	if maxBytes <= 0 {
		maxBytes = defaultEndpointMaxBytes
	}
	c := &http.Client{Timeout: timeout}
	if base != nil {
		c.Transport = base.Transport
	}
	// No redirects at all: the request carries the token (and for
	// introspection our client secret), which must go only where the config
	// says.
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &endpoint{kind: kind, issuer: is, fixedURL: fixedURL, fromDoc: fromDoc, client: c, maxBytes: maxBytes,
		ttl: durOr(ttl, defaultCacheTTL), negTTL: durOr(negTTL, defaultNegativeCacheTTL),
		br: gobreaker.NewCircuitBreaker[*providerAnswer](gobreaker.Settings{
			Name: kind + ":" + is.name, Timeout: providerPause,
			ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= providerFailures },
		})}
}

// url returns the endpoint's URL, from config or the discovery document.
func (e *endpoint) url(ctx context.Context, allowHTTP bool) (string, error) {
	if e.fixedURL != "" {
		return e.fixedURL, nil
	}
	rk, ok := e.issuer.src.(*remoteKeys)
	if !ok || !rk.discovery {
		return "", fmt.Errorf("no %s endpoint configured", e.kind)
	}
	doc, err := rk.metadata(ctx)
	if err != nil {
		return "", fmt.Errorf("discovery: %w", err)
	}
	u := e.fromDoc(doc)
	if u == "" {
		return "", fmt.Errorf("the discovery document names no %s endpoint", e.kind)
	}
	if err := checkFetchURL(u, allowHTTP); err != nil {
		return "", fmt.Errorf("discovery's %s endpoint: %w", e.kind, err)
	}
	return u, nil
}

// cacheTTL is how long an answer may be reused: positive answers until
// min(exp, ttl), with exp the token's expiry (zero if unknown), negative
// ones for negTTL.
func (e *endpoint) cacheTTL(a *providerAnswer, exp, now time.Time) time.Duration {
	if !a.ok {
		return e.negTTL
	}
	ttl := e.ttl
	if !exp.IsZero() {
		ttl = min(ttl, exp.Sub(now))
	}
	return ttl
}

func (e *endpoint) fail(err error) *Error {
	ve := unavailable(e.kind+" at issuer "+e.issuer.name+" failed", err)
	ve.Issuer = e.issuer.name
	return ve
}

// introspector calls an RFC 7662 endpoint.
type introspector struct {
	*endpoint
	cfg    *IntrospectionConfig
	secret string
}

func (in *introspector) introspect(ctx context.Context, raw string) (*providerAnswer, error) {
	u, err := in.url(ctx, in.cfg.AllowHTTP)
	if err != nil {
		return nil, in.fail(err)
	}
	form := url.Values{"token": {raw}, "token_type_hint": {"access_token"}}
	if in.cfg.AuthMethod == authPost {
		form.Set("client_id", in.cfg.ClientID)
		form.Set("client_secret", in.secret)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, in.fail(err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if in.cfg.AuthMethod != authPost {
		// RFC 6749 §2.3.1: both parts form-encoded before Basic encoding.
		req.SetBasicAuth(url.QueryEscape(in.cfg.ClientID), url.QueryEscape(in.secret))
	}
	body, status, _, err := in.do(req)
	if err != nil {
		return nil, in.fail(err)
	}
	switch {
	case status == http.StatusUnauthorized || status == http.StatusForbidden:
		return nil, in.fail(fmt.Errorf("%s: HTTP %d: the endpoint refused our client credentials (check client_id, the secret and auth_method)", u, status))
	case status != http.StatusOK:
		return nil, in.fail(fmt.Errorf("%s: HTTP %d", u, status))
	}
	claims, err := decodeObject(body)
	if err != nil {
		return nil, in.fail(fmt.Errorf("%s: response is not a JSON object: %w", u, err))
	}
	active, isBool := claims["active"].(bool)
	if !isBool {
		// RFC 7662 §2.2: active is a required boolean. Anything else is a
		// broken provider, not a verdict on the token.
		return nil, in.fail(fmt.Errorf("%s: response has no boolean active member", u))
	}
	a := &providerAnswer{ok: active, size: len(body)}
	if active {
		delete(claims, "active")
		a.claims = claims
		if exp, ok, err := numericDate(claims, "exp"); err == nil && ok {
			a.exp = exp
		}
	}
	return a, nil
}

// userinfoClient calls an OIDC userinfo endpoint with the token.
type userinfoClient struct {
	*endpoint
	cfg *UserinfoConfig
}

func (ui *userinfoClient) fetch(ctx context.Context, raw string) (*providerAnswer, error) {
	u, err := ui.url(ctx, ui.cfg.AllowHTTP)
	if err != nil {
		return nil, ui.fail(err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, ui.fail(err)
	}
	req.Header.Set("Authorization", "Bearer "+raw)
	req.Header.Set("Accept", "application/json")
	body, status, ctype, err := ui.do(req)
	if err != nil {
		return nil, ui.fail(err)
	}
	switch {
	case status == http.StatusUnauthorized:
		// The provider does not accept the token (revoked, or lacking the
		// openid scope): a verdict, cached briefly like an inactive token.
		return &providerAnswer{ok: false, size: len(body)}, nil
	case status != http.StatusOK:
		return nil, ui.fail(fmt.Errorf("%s: HTTP %d", u, status))
	}
	if mt, _, _ := mime.ParseMediaType(ctype); mt == "application/jwt" {
		return nil, ui.fail(fmt.Errorf("%s: signed or encrypted userinfo responses are not supported", u))
	}
	claims, err := decodeObject(body)
	if err != nil {
		return nil, ui.fail(fmt.Errorf("%s: response is not a JSON object: %w", u, err))
	}
	return &providerAnswer{ok: true, claims: claims, size: len(body)}, nil
}

// do sends req and reads a bounded body.
func (e *endpoint) do(req *http.Request) (body []byte, status int, ctype string, err error) {
	resp, err := e.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) && ue.Timeout() {
			return nil, 0, "", fmt.Errorf("%s %s: no answer within the %v timeout", req.Method, req.URL.Redacted(), e.client.Timeout)
		}
		// url.Error names the method and URL and the cause; the token is in
		// the body or a header, never in the URL.
		return nil, 0, "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		drain(resp)
		return nil, resp.StatusCode, "", nil
	}
	body, err = readLimited(resp, e.maxBytes)
	if err != nil {
		return nil, 0, "", fmt.Errorf("%s: %w", req.URL.Redacted(), err)
	}
	return body, resp.StatusCode, resp.Header.Get("Content-Type"), nil
}

// answerCodec stores answers in Redis as cachev1.ProviderAnswer; what is
// read back is checked like a fresh answer (strict JSON, then the issuer's
// claim rules on every request).
var answerCodec = cache.Codec[*providerAnswer]{
	Encode: func(a *providerAnswer) ([]byte, error) {
		pa := &cachev1.ProviderAnswer{Ok: a.ok}
		if a.claims != nil {
			b, err := json.Marshal(a.claims)
			if err != nil {
				return nil, err
			}
			pa.ClaimsJson = b
		}
		if !a.exp.IsZero() {
			pa.ExpUnix = a.exp.Unix()
		}
		return proto.Marshal(pa)
	},
	Decode: func(b []byte) (*providerAnswer, error) {
		var pa cachev1.ProviderAnswer
		if err := proto.Unmarshal(b, &pa); err != nil {
			return nil, err
		}
		a := &providerAnswer{ok: pa.GetOk(), size: len(b)}
		if len(pa.GetClaimsJson()) > 0 {
			c, err := decodeObject(pa.GetClaimsJson())
			if err != nil {
				return nil, err
			}
			a.claims = c
		}
		if pa.GetExpUnix() != 0 {
			a.exp = time.Unix(pa.GetExpUnix(), 0)
		}
		if a.ok && a.claims == nil {
			return nil, errors.New("positive answer without claims")
		}
		return a, nil
	},
}

// answers caches introspection and userinfo answers for all issuers of a
// Verifier, keyed by kind, issuer name and token hash.
type answers = cache.Cache[*providerAnswer]

// answerKey names an answer by the issuer's identity as well as its name,
// so that an answer given under one configuration of an issuer is never
// used under another (after a reload, or by pods on another config).
func answerKey(kind string, is *Issuer, tk tokenKey) string {
	return kind + ":" + is.name + "." + is.id + ":" + string(tk)
}

// introspect asks (or recalls) the issuer's introspection endpoint about a
// token.
func (v *Verifier) introspect(ctx context.Context, is *Issuer, raw string, tk tokenKey, client string) (*providerAnswer, cache.Source, error) {
	return v.ask(ctx, is.introspection.endpoint, tk, time.Time{}, client, func(ctx context.Context) (*providerAnswer, error) {
		return is.introspection.introspect(ctx, raw)
	})
}

// userinfo asks (or recalls) the issuer's userinfo endpoint about a token
// that expires at exp.
func (v *Verifier) userinfo(ctx context.Context, is *Issuer, raw string, tk tokenKey, exp time.Time, client string) (*providerAnswer, error) {
	a, _, err := v.ask(ctx, is.userinfo.endpoint, tk, exp, client, func(ctx context.Context) (*providerAnswer, error) {
		return is.userinfo.fetch(ctx, raw)
	})
	return a, err
}

// ask returns e's answer about a token from the cache, or calls e. exp is
// the token's expiry when known (the answer's own exp counts otherwise);
// client is the requester's address, charged for the call.
func (v *Verifier) ask(ctx context.Context, e *endpoint, tk tokenKey, exp time.Time, client string,
	call func(context.Context) (*providerAnswer, error)) (a *providerAnswer, src cache.Source, err error) {
	ctx, span := v.tel.start(ctx, "tokenauthz."+e.kind, attribute.String("tokenauthz.issuer", e.issuer.name))
	defer func() {
		if err == nil {
			span.SetAttributes(attribute.String("tokenauthz.source", string(src)), attribute.Bool("tokenauthz.active", a.ok))
			v.tel.obs.Served(e.kind, src)
		}
		end(span, err)
	}()
	a, src, err = v.answers.Get(ctx, answerKey(e.kind, e.issuer, tk), func(ctx context.Context) (*providerAnswer, time.Duration, error) {
		start := time.Now()
		if e.budget != nil {
			if over := e.budget.allow(client); over != "" {
				// Counted, not logged: a flood would log a line per request.
				v.tel.obs.Throttled(e.issuer.name, e.kind)
				ve := e.fail(fmt.Errorf("over %s: no call made", over))
				ve.Reason = ReasonThrottled
				return nil, 0, ve
			}
		}
		called := false
		a, err := e.br.Execute(func() (*providerAnswer, error) { called = true; return call(ctx) })
		if called {
			v.tel.obs.ProviderCalled(e.issuer.name, e.kind, time.Since(start), err)
		} else if err != nil {
			err = e.fail(fmt.Errorf("calls paused for %v after %d consecutive failures", providerPause, providerFailures))
		}
		if err != nil {
			return nil, 0, err
		}
		until := exp
		if until.IsZero() {
			until = a.exp
		}
		return a, e.cacheTTL(a, until, v.now()), nil
	})
	if err != nil {
		return nil, "", AsError(err)
	}
	return a, src, nil
}
