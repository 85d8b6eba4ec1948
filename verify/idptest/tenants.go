package idptest

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"
)

// Tenants is a multi-tenant identity provider, as Keycloak serves realms:
// each tenant's issuer is <URL>/realms/<tenant>, with its own discovery
// document and key set (an ES256 key made on first use). Tenants not
// added answer 404. Every request is counted and its path recorded, so
// tests can show that a hostile token reached nothing.
type Tenants struct {
	t   testing.TB
	srv *httptest.Server

	mu    sync.Mutex
	keys  map[string]*Key
	known map[string]bool
	down  map[string]bool
	paths []string

	// Requests counts every request served; DiscoveryHits and JWKSHits
	// count them per tenant (read with Hits).
	Requests  atomic.Int64
	discovery sync.Map // tenant → *atomic.Int64
	jwks      sync.Map
	// JWKSDelay slows key-set answers (a slow provider).
	JWKSDelay atomic.Int64
}

// NewTenants starts a multi-tenant IdP; it is closed when the test ends.
func NewTenants(t testing.TB) *Tenants {
	p := &Tenants{t: t, keys: map[string]*Key{}, known: map[string]bool{}, down: map[string]bool{}}
	p.srv = httptest.NewServer(http.HandlerFunc(p.serve))
	t.Cleanup(p.srv.Close)
	return p
}

// URL is the server's base URL; Issuer(tenant) a tenant's issuer.
func (p *Tenants) URL() string                 { return p.srv.URL }
func (p *Tenants) Issuer(tenant string) string { return p.srv.URL + "/realms/" + tenant }

// Add makes tenants known.
func (p *Tenants) Add(tenants ...string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, tn := range tenants {
		p.known[tn] = true
	}
}

// SetDown makes a tenant's endpoints answer 503 (or serve again).
func (p *Tenants) SetDown(tenant string, down bool) {
	p.mu.Lock()
	p.down[tenant] = down
	p.mu.Unlock()
}

// Key is the tenant's signing key, made on first use.
func (p *Tenants) Key(tenant string) *Key {
	p.mu.Lock()
	defer p.mu.Unlock()
	k := p.keys[tenant]
	if k == nil {
		k = NewKey(p.t, "k-"+tenant, "ES256")
		p.keys[tenant] = k
	}
	return k
}

// Mint signs a token of tenant for aud, with extra claims.
func (p *Tenants) Mint(tenant, aud string, extra map[string]any) string {
	now := time.Now().Unix()
	c := map[string]any{"iss": p.Issuer(tenant), "sub": "user@" + tenant, "aud": aud, "iat": now, "exp": now + 3600}
	for k, v := range extra {
		c[k] = v
	}
	return Mint(p.t, p.Key(tenant), c)
}

// Hits are the discovery and key-set requests a tenant received.
func (p *Tenants) Hits(tenant string) (discovery, jwks int64) {
	return counter(&p.discovery, tenant).Load(), counter(&p.jwks, tenant).Load()
}

// Paths are the paths requested so far.
func (p *Tenants) Paths() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.paths...)
}

func counter(m *sync.Map, k string) *atomic.Int64 {
	c, _ := m.LoadOrStore(k, new(atomic.Int64))
	return c.(*atomic.Int64)
}

func (p *Tenants) serve(w http.ResponseWriter, r *http.Request) {
	p.Requests.Add(1)
	p.mu.Lock()
	p.paths = append(p.paths, r.URL.Path)
	p.mu.Unlock()
	rest, ok := strings.CutPrefix(r.URL.Path, "/realms/")
	if !ok {
		http.NotFound(w, r)
		return
	}
	tenant, what, _ := strings.Cut(rest, "/")
	p.mu.Lock()
	known, down := p.known[tenant], p.down[tenant]
	p.mu.Unlock()
	switch what {
	case ".well-known/openid-configuration":
		counter(&p.discovery, tenant).Add(1)
	case "protocol/openid-connect/certs":
		counter(&p.jwks, tenant).Add(1)
		if d := p.JWKSDelay.Load(); d > 0 {
			time.Sleep(time.Duration(d))
		}
	default:
		http.NotFound(w, r)
		return
	}
	switch {
	case !known:
		http.NotFound(w, r)
		return
	case down:
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if what == "protocol/openid-connect/certs" {
		set := jwk.NewSet()
		_ = set.AddKey(p.Key(tenant).JWK(p.t))
		_ = json.NewEncoder(w).Encode(set)
		return
	}
	iss := p.Issuer(tenant)
	_ = json.NewEncoder(w).Encode(map[string]string{"issuer": iss, "jwks_uri": iss + "/protocol/openid-connect/certs"})
}
