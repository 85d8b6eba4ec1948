// Package idptest runs a real identity provider over HTTP for tests: it
// serves a JWKS, an OIDC discovery document, an RFC 7662 introspection
// endpoint that authenticates its client and tracks revocation, and a
// userinfo endpoint; it mints JWTs with real keys and opaque tokens, rotates
// keys, goes down or misbehaves on request and counts every request.
package idptest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// Key is a signing key with its JWK id and algorithm.
type Key struct {
	Kid     string
	Alg     string
	Private crypto.Signer
}

// NewKey generates a key for alg (RS*, PS*, ES*, EdDSA).
func NewKey(t testing.TB, kid, alg string) *Key {
	t.Helper()
	var (
		k   crypto.Signer
		err error
	)
	switch alg[:2] {
	case "RS", "PS":
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case "ES":
		curve := map[string]elliptic.Curve{"ES256": elliptic.P256(), "ES384": elliptic.P384(), "ES512": elliptic.P521()}[alg]
		k, err = ecdsa.GenerateKey(curve, rand.Reader)
	case "Ed":
		_, k, err = ed25519.GenerateKey(rand.Reader)
	default:
		t.Fatalf("idptest: no key type for %s", alg)
	}
	if err != nil {
		t.Fatal(err)
	}
	return &Key{Kid: kid, Alg: alg, Private: k}
}

// JWK is the public key as a JWK with kid, alg and use: sig.
func (k *Key) JWK(t testing.TB) jwk.Key {
	t.Helper()
	pk, err := jwk.FromRaw(k.Private.Public())
	if err != nil {
		t.Fatal(err)
	}
	_ = pk.Set(jwk.KeyIDKey, k.Kid)
	_ = pk.Set(jwk.AlgorithmKey, jwa.SignatureAlgorithm(k.Alg))
	_ = pk.Set(jwk.KeyUsageKey, "sig")
	return pk
}

// IdP is an httptest identity provider.
type IdP struct {
	t   testing.TB
	srv *httptest.Server

	mu      sync.Mutex
	keys    []*Key
	extra   []jwk.Key // published as they are (e.g. weak or enc keys)
	down    bool
	rawJWKS []byte // when set, served instead of the key set
	maxAge  int    // Cache-Control max-age, -1 for none
	issuer  string // discovery issuer override

	// Introspection: the one registered client, the opaque tokens issued
	// (token → claims), revoked tokens, and a forced reply.
	client      *Client
	opaque      map[string]map[string]any
	revoked     map[string]bool
	userinfo    map[string]map[string]any // sub → claims
	docOverride map[string]string         // discovery fields said instead
	forced      *reply
	delay       time.Duration
	jwksDelay   time.Duration
	lastRequest *http.Request

	// JWKSHits, DiscoveryHits, IntrospectionHits and UserinfoHits count
	// requests served.
	JWKSHits          atomic.Int64
	DiscoveryHits     atomic.Int64
	IntrospectionHits atomic.Int64
	UserinfoHits      atomic.Int64
	// Handler, when set, serves paths other than the JWKS and discovery ones
	// (introspection, userinfo).
	Handler http.Handler
}

// New starts an IdP publishing keys; it is closed when the test ends.
func New(t testing.TB, keys ...*Key) *IdP {
	p := &IdP{t: t, keys: keys, maxAge: -1, opaque: map[string]map[string]any{}, revoked: map[string]bool{},
		userinfo: map[string]map[string]any{}}
	mux := http.NewServeMux()
	mux.HandleFunc("/jwks", p.serveJWKS)
	mux.HandleFunc("/.well-known/openid-configuration", p.serveDiscovery)
	mux.HandleFunc("/introspect", p.serveIntrospection)
	mux.HandleFunc("/userinfo", p.serveUserinfo)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if p.Handler != nil {
			p.Handler.ServeHTTP(w, r)
			return
		}
		http.NotFound(w, r)
	})
	p.srv = httptest.NewServer(mux)
	t.Cleanup(p.srv.Close)
	return p
}

// URL is the issuer URL (the server's base URL).
func (p *IdP) URL() string { return p.srv.URL }

// JWKSURL is where the key set is served.
func (p *IdP) JWKSURL() string { return p.srv.URL + "/jwks" }

// SetDown makes every endpoint answer 503 (true) or work again (false).
func (p *IdP) SetDown(down bool) { p.mu.Lock(); p.down = down; p.mu.Unlock() }

// SetKeys replaces the published keys (a rotation).
func (p *IdP) SetKeys(keys ...*Key) { p.mu.Lock(); p.keys = keys; p.mu.Unlock() }

// AddRawKey publishes k as it is, beside the signing keys.
func (p *IdP) AddRawKey(k jwk.Key) { p.mu.Lock(); p.extra = append(p.extra, k); p.mu.Unlock() }

// SetRawJWKS serves b as the key set document (nil to go back).
func (p *IdP) SetRawJWKS(b []byte) { p.mu.Lock(); p.rawJWKS = b; p.mu.Unlock() }

// SetMaxAge sets the JWKS Cache-Control max-age (-1: no header).
func (p *IdP) SetMaxAge(s int) { p.mu.Lock(); p.maxAge = s; p.mu.Unlock() }

// SetDiscoveryIssuer makes discovery claim another issuer.
func (p *IdP) SetDiscoveryIssuer(iss string) { p.mu.Lock(); p.issuer = iss; p.mu.Unlock() }

func (p *IdP) serveJWKS(w http.ResponseWriter, r *http.Request) {
	p.JWKSHits.Add(1)
	p.mu.Lock()
	down, raw, maxAge, delay := p.down, p.rawJWKS, p.maxAge, p.jwksDelay
	set := jwk.NewSet()
	for _, k := range p.keys {
		_ = set.AddKey(k.JWK(p.t))
	}
	for _, k := range p.extra {
		_ = set.AddKey(k)
	}
	p.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if down {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	if maxAge >= 0 {
		w.Header().Set("Cache-Control", fmt.Sprintf("public, max-age=%d", maxAge))
	}
	w.Header().Set("Content-Type", "application/json")
	if raw != nil {
		_, _ = w.Write(raw)
		return
	}
	_ = json.NewEncoder(w).Encode(set)
}

func (p *IdP) serveDiscovery(w http.ResponseWriter, _ *http.Request) {
	p.DiscoveryHits.Add(1)
	p.mu.Lock()
	down, iss := p.down, p.issuer
	p.mu.Unlock()
	if down {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	if iss == "" {
		iss = p.URL()
	}
	w.Header().Set("Content-Type", "application/json")
	doc := map[string]string{
		"issuer":                 iss,
		"jwks_uri":               p.JWKSURL(),
		"introspection_endpoint": p.URL() + "/introspect",
		"userinfo_endpoint":      p.URL() + "/userinfo",
	}
	p.mu.Lock()
	for k, v := range p.docOverride {
		doc[k] = v
	}
	p.mu.Unlock()
	_ = json.NewEncoder(w).Encode(doc)
}

// SetDiscoveryField makes the discovery document say value for name
// (jwks_uri, introspection_endpoint, …), e.g. an endpoint on another host.
func (p *IdP) SetDiscoveryField(name, value string) {
	p.mu.Lock()
	if p.docOverride == nil {
		p.docOverride = map[string]string{}
	}
	p.docOverride[name] = value
	p.mu.Unlock()
}

// Client is an OAuth2 client registered for introspection, with the one
// authentication method the endpoint accepts from it.
type Client struct {
	ID, Secret string
	Method     string // client_secret_basic or client_secret_post
}

type reply struct {
	status int
	body   []byte
}

// IntrospectionURL is where tokens are introspected.
func (p *IdP) IntrospectionURL() string { return p.srv.URL + "/introspect" }

// UserinfoURL is the userinfo endpoint.
func (p *IdP) UserinfoURL() string { return p.srv.URL + "/userinfo" }

// RegisterClient sets the client the introspection endpoint authenticates.
// Without one every introspection call is refused with 401.
func (p *IdP) RegisterClient(c Client) { p.mu.Lock(); p.client = &c; p.mu.Unlock() }

// Opaque issues a random opaque access token described by claims.
func (p *IdP) Opaque(claims map[string]any) string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	tok := base64.RawURLEncoding.EncodeToString(b)
	p.mu.Lock()
	p.opaque[tok] = claims
	p.mu.Unlock()
	return tok
}

// Revoke makes a token (opaque or JWT) inactive from now on.
func (p *IdP) Revoke(token string) { p.mu.Lock(); p.revoked[token] = true; p.mu.Unlock() }

// SetUserinfo sets the userinfo claims of sub.
func (p *IdP) SetUserinfo(sub string, claims map[string]any) {
	p.mu.Lock()
	p.userinfo[sub] = claims
	p.mu.Unlock()
}

// ForceReply makes the introspection and userinfo endpoints answer status
// and body to everything (status 0: behave again).
func (p *IdP) ForceReply(status int, body []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if status == 0 {
		p.forced = nil
		return
	}
	p.forced = &reply{status: status, body: body}
}

// SetJWKSDelay delays every key set answer by d.
func (p *IdP) SetJWKSDelay(d time.Duration) { p.mu.Lock(); p.jwksDelay = d; p.mu.Unlock() }

// SetDelay delays every introspection and userinfo answer by d.
func (p *IdP) SetDelay(d time.Duration) { p.mu.Lock(); p.delay = d; p.mu.Unlock() }

// LastRequest is a copy of the last introspection or userinfo request's
// method, URL and headers (not its body).
func (p *IdP) LastRequest() *http.Request { p.mu.Lock(); defer p.mu.Unlock(); return p.lastRequest }

// tokenClaims returns what the IdP knows of an active token: an opaque
// token it issued, or a JWT (its payload, unverified: the IdP minted it).
func (p *IdP) tokenClaims(tok string) (map[string]any, bool) {
	p.mu.Lock()
	claims, isOpaque := p.opaque[tok]
	revoked := p.revoked[tok]
	p.mu.Unlock()
	if revoked {
		return nil, false
	}
	if !isOpaque {
		parts := strings.Split(tok, ".")
		if len(parts) != 3 {
			return nil, false
		}
		b, err := base64.RawURLEncoding.DecodeString(parts[1])
		if err != nil || json.Unmarshal(b, &claims) != nil {
			return nil, false
		}
	}
	if exp, ok := claims["exp"].(float64); ok && float64(time.Now().Unix()) >= exp {
		return nil, false
	}
	if exp, ok := claims["exp"].(int64); ok && time.Now().Unix() >= exp {
		return nil, false
	}
	return claims, true
}

// serveCommon applies down, delay and forced replies; false means answered.
func (p *IdP) serveCommon(w http.ResponseWriter, r *http.Request) bool {
	p.mu.Lock()
	down, forced, delay := p.down, p.forced, p.delay
	cp := r.Clone(r.Context())
	cp.Body = nil
	p.lastRequest = cp
	p.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return false
		}
	}
	if down {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return false
	}
	if forced != nil {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(forced.status)
		_, _ = w.Write(forced.body)
		return false
	}
	return true
}

func (p *IdP) serveIntrospection(w http.ResponseWriter, r *http.Request) {
	p.IntrospectionHits.Add(1)
	if !p.serveCommon(w, r) {
		return
	}
	if r.Method != http.MethodPost || r.ParseForm() != nil {
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	p.mu.Lock()
	c := p.client
	p.mu.Unlock()
	if c == nil || !authenticated(r, c) {
		w.Header().Set("WWW-Authenticate", `Basic realm="idptest"`)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"error":"invalid_client"}`))
		return
	}
	resp := map[string]any{"active": false}
	if claims, ok := p.tokenClaims(r.PostForm.Get("token")); ok {
		resp = map[string]any{"active": true, "token_type": "Bearer"}
		for k, v := range claims {
			resp[k] = v
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}

// authenticated checks the client by its registered method only, as a real
// provider does (RFC 7591 token_endpoint_auth_method).
func authenticated(r *http.Request, c *Client) bool {
	switch c.Method {
	case "client_secret_post":
		_, hasBasic := r.Header["Authorization"]
		return !hasBasic && r.PostForm.Get("client_id") == c.ID && r.PostForm.Get("client_secret") == c.Secret
	default:
		id, secret, ok := r.BasicAuth()
		if !ok || r.PostForm.Has("client_secret") {
			return false
		}
		id, err1 := url.QueryUnescape(id)
		secret, err2 := url.QueryUnescape(secret)
		return err1 == nil && err2 == nil && id == c.ID && secret == c.Secret
	}
}

func (p *IdP) serveUserinfo(w http.ResponseWriter, r *http.Request) {
	p.UserinfoHits.Add(1)
	if !p.serveCommon(w, r) {
		return
	}
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	claims, active := p.tokenClaims(tok)
	if !ok || !active {
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
		http.Error(w, "", http.StatusUnauthorized)
		return
	}
	sub, _ := claims["sub"].(string)
	resp := map[string]any{"sub": sub}
	p.mu.Lock()
	for k, v := range p.userinfo[sub] {
		resp[k] = v
	}
	p.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(resp)
}

// Claims returns typical valid claims for this issuer: sub, aud, iat, exp in
// an hour.
func (p *IdP) Claims(aud string) map[string]any {
	now := time.Now().Unix()
	return map[string]any{"iss": p.URL(), "sub": "user-1", "aud": aud, "iat": now, "exp": now + 3600}
}

// Mint signs claims with k, with kid and alg in the header.
func Mint(t testing.TB, k *Key, claims map[string]any) string {
	t.Helper()
	return Sign(t, k.Alg, k.Private, map[string]any{"alg": k.Alg, "kid": k.Kid, "typ": "JWT"}, claims)
}

// Sign builds a compact JWS from any header and claims, signed with key
// (a crypto.Signer, or []byte for HS*) under alg. Tests use it to craft
// tokens a well-behaved signer would not produce.
func Sign(t testing.TB, alg string, key any, header, claims map[string]any) string {
	t.Helper()
	hb, err := json.Marshal(header)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	return SignRaw(t, alg, key, hb, cb)
}

// SignRaw is Sign over raw header and payload JSON bytes.
func SignRaw(t testing.TB, alg string, key any, header, payload []byte) string {
	t.Helper()
	enc := base64.RawURLEncoding
	input := enc.EncodeToString(header) + "." + enc.EncodeToString(payload)
	signer, err := jws.NewSigner(jwa.SignatureAlgorithm(alg))
	if err != nil {
		t.Fatal(err)
	}
	sig, err := signer.Sign([]byte(input), key)
	if err != nil {
		t.Fatal(err)
	}
	return input + "." + enc.EncodeToString(sig)
}
