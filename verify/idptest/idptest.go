// Package idptest runs a real identity provider over HTTP for tests: it
// serves a JWKS and an OIDC discovery document, mints tokens with real keys,
// rotates keys, goes down on request and counts every request it serves.
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

	// JWKSHits and DiscoveryHits count requests served.
	JWKSHits      atomic.Int64
	DiscoveryHits atomic.Int64
	// Handler, when set, serves paths other than the JWKS and discovery ones
	// (introspection, userinfo).
	Handler http.Handler
}

// New starts an IdP publishing keys; it is closed when the test ends.
func New(t testing.TB, keys ...*Key) *IdP {
	p := &IdP{t: t, keys: keys, maxAge: -1}
	mux := http.NewServeMux()
	mux.HandleFunc("/jwks", p.serveJWKS)
	mux.HandleFunc("/.well-known/openid-configuration", p.serveDiscovery)
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

func (p *IdP) serveJWKS(w http.ResponseWriter, _ *http.Request) {
	p.JWKSHits.Add(1)
	p.mu.Lock()
	down, raw, maxAge := p.down, p.rawJWKS, p.maxAge
	set := jwk.NewSet()
	for _, k := range p.keys {
		_ = set.AddKey(k.JWK(p.t))
	}
	for _, k := range p.extra {
		_ = set.AddKey(k)
	}
	p.mu.Unlock()
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
	_ = json.NewEncoder(w).Encode(map[string]string{
		"issuer":                 iss,
		"jwks_uri":               p.JWKSURL(),
		"introspection_endpoint": p.URL() + "/introspect",
		"userinfo_endpoint":      p.URL() + "/userinfo",
	})
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
