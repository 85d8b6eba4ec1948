package authz_test

import (
	"sync"
	"testing"
	"time"

	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// served counts where verify says tokens and keys came from.
type served struct {
	mu sync.Mutex
	n  map[string]int
}

func (s *served) KeySetFetched(string, error)                         {}
func (s *served) ProviderCalled(string, string, time.Duration, error) {}
func (s *served) Throttled(string, string)                            {}
func (s *served) Served(kind string, src cache.Source) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.n == nil {
		s.n = map[string]int{}
	}
	s.n[kind+"/"+string(src)]++
}
func (s *served) get(k string) int { s.mu.Lock(); defer s.mu.Unlock(); return s.n[k] }

func TestVerifiedTokenCache(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	f.cfg.Routes = append([]authz.RouteConfig{
		{Name: "nobody", Match: authz.Match{PathPrefix: "/nobody"}, Issuers: []string{"main"}, Scopes: []string{"never-granted"}},
	}, f.cfg.Routes...)
	obs := &served{}
	v, err := verify.New(f.cfg.Issuers, verify.Options{Now: f.clk.Now, Observer: obs})
	if err != nil {
		t.Fatal(err)
	}
	c := startWith(t, f.cfg, v)

	// A token used once is not kept (cache.Doorkeeper): one used again is,
	// from its second verification on.
	tok := f.jwt(t)
	for range 4 {
		allowed(t, check(t, c, req{path: "/orders/1", headers: bearer(tok)}))
	}
	if obs.get("tokens/origin") != 2 || obs.get("tokens/memory") != 2 {
		t.Fatalf("4 checks of one token: %v, want 2 verifications and 2 cache hits", obs.n)
	}
	// A hit still goes through the route's own checks.
	denied(t, check(t, c, req{path: "/nobody", headers: bearer(tok)}), codes.PermissionDenied, typev3.StatusCode_Forbidden, "never-granted")
	// …and the token's exp: the entry ends with it (leeway 0 here).
	short := f.idp.Claims(aud)
	short["exp"] = f.clk.Unix() + 10
	shortTok := idptest.Mint(t, f.key, short)
	allowed(t, check(t, c, req{headers: bearer(shortTok)}))
	allowed(t, check(t, c, req{headers: bearer(shortTok)})) // kept now
	f.clk.Add(9 * time.Second)
	hits := obs.get("tokens/memory")
	allowed(t, check(t, c, req{headers: bearer(shortTok)}))
	if obs.get("tokens/memory") != hits+1 {
		t.Fatalf("a kept token before its exp was verified again: %v", obs.n)
	}
	f.clk.Add(time.Second)
	denied(t, check(t, c, req{headers: bearer(shortTok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "expired")

	// An emergency key withdrawal: the provider publishes only a new key.
	// Once this pod learns of it, a token verified under the old key is
	// verified again, and refused.
	k2 := idptest.NewKey(t, "k2", "RS256")
	f.idp.SetKeys(k2)
	allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, k2, f.idp.Claims(aud)))})) // unknown kid: refetch
	denied(t, check(t, c, req{path: "/orders/1", headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "key id")
}

func TestVerifiedTokenCacheCanBeDisabled(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	obs := &served{}
	v, err := verify.New(f.cfg.Issuers, verify.Options{Now: f.clk.Now, Observer: obs, VerifiedTokens: verify.VerifiedCacheOptions{Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	c := startWith(t, f.cfg, v)
	tok := f.jwt(t)
	for range 3 {
		allowed(t, check(t, c, req{headers: bearer(tok)}))
	}
	if obs.get("tokens/memory") != 0 || obs.get("keys/memory") != 2 {
		t.Fatalf("with the cache off every check verifies: %v", obs.n)
	}
}
