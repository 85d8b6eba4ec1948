package verify

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

func TestKeySetFiltering(t *testing.T) {
	good := idptest.NewKey(t, "good", "RS256")
	weakRaw, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	weak, _ := jwk.FromRaw(weakRaw.Public())
	_ = weak.Set(jwk.KeyIDKey, "weak")
	enc := idptest.NewKey(t, "enc", "RS256").JWK(t)
	_ = enc.Set(jwk.KeyUsageKey, "enc")
	wrapOnly := idptest.NewKey(t, "wrap", "RS256").JWK(t)
	_ = wrapOnly.Set(jwk.KeyOpsKey, jwk.KeyOperationList{jwk.KeyOpWrapKey})
	oct, _ := jwk.FromRaw([]byte("0123456789abcdef0123456789abcdef"))
	_ = oct.Set(jwk.KeyIDKey, "oct")

	set := jwk.NewSet()
	for _, k := range []jwk.Key{good.JWK(t), weak, enc, wrapOnly, oct} {
		_ = set.AddKey(k)
	}
	b, _ := json.Marshal(set)
	ks, err := parseKeySet(b, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(ks.keys) != 1 || ks.keys[0].kid != "good" || ks.skipped != 4 {
		t.Fatalf("kept %d keys (skipped %d), want only the good one", len(ks.keys), ks.skipped)
	}
	if _, err := parseKeySet(b, 4); err == nil {
		t.Error("a set over max_keys was accepted")
	}
	only, _ := json.Marshal(map[string]any{"keys": []any{weak}})
	if _, err := parseKeySet(only, 10); err == nil {
		t.Error("a set with no usable key was accepted")
	}
}

func TestRefreshAfterHonoursCacheControlWithinBounds(t *testing.T) {
	r := &remoteKeys{cfg: KeysConfig{RefreshInterval: 15 * time.Minute, MinRefreshInterval: time.Minute, MaxRefreshInterval: time.Hour}}
	for cc, want := range map[string]time.Duration{
		"":                       15 * time.Minute,
		"max-age=600":            10 * time.Minute,
		"public, max-age=5":      time.Minute,
		"max-age=999999":         time.Hour,
		"no-cache":               time.Minute,
		"max-age=-3":             15 * time.Minute,
		`private, max-age="120"`: 2 * time.Minute,
	} {
		h := http.Header{}
		if cc != "" {
			h.Set("Cache-Control", cc)
		}
		if got := r.refreshAfter(h); got != want {
			t.Errorf("Cache-Control %q: refresh after %v, want %v", cc, got, want)
		}
	}
}

// TestBackgroundRefresh: with Start running, a rotated key set is picked up
// by the refresh loop (max-age 0, bounded below by min_refresh_interval)
// without any request triggering it.
func TestBackgroundRefresh(t *testing.T) {
	k1, k2 := idptest.NewKey(t, "k1", "ES256"), idptest.NewKey(t, "k2", "ES256")
	idp := idptest.New(t, k1)
	idp.SetMaxAge(0)
	v, err := New([]IssuerConfig{{Name: "idp", Issuer: idp.URL(), Audiences: []string{"a"}, JWKSURI: idp.JWKSURL(),
		Algorithms: []string{"ES256"}, Keys: KeysConfig{MinRefreshInterval: 20 * time.Millisecond}}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	v.Start(ctx)
	waitFor(t, v.Ready)
	idp.SetKeys(k2)
	src := v.byName["idp"].src.(*remoteKeys)
	waitFor(t, func() bool { ks := src.cur.Load(); return ks != nil && ks.hasKid("k2") })
	before := idp.JWKSHits.Load()
	res, err := v.Verify(ctx, idptest.Mint(t, k2, map[string]any{"iss": idp.URL(), "aud": "a", "exp": time.Now().Unix() + 60}), Policy{Issuers: []string{"idp"}})
	if err != nil || res.Issuer.Name() != "idp" {
		t.Fatalf("verify after background refresh: %v", err)
	}
	if idp.JWKSHits.Load() > before+1 {
		t.Error("the request itself refetched keys")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestIssuerConfigValidate(t *testing.T) {
	short := "short-secret"
	t.Setenv("TA_SHORT", short)
	cases := map[string]struct {
		cfg  IssuerConfig
		want string
	}{
		"HS without secret":   {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, JWKSURI: "https://i/k", Algorithms: []string{"RS256", "HS256"}}, "HS256 needs hmac_secret_file"},
		"secret too short":    {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, HMACSecretEnv: "TA_SHORT", Algorithms: []string{"HS256"}}, "at least 32 bytes"},
		"secret env unset":    {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, HMACSecretEnv: "TA_UNSET_XYZ", Algorithms: []string{"HS256"}}, "is not set"},
		"two sources":         {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, JWKSURI: "https://i/k", Discovery: true, Algorithms: []string{"RS256"}}, "set only one"},
		"no source":           {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, Algorithms: []string{"RS256"}}, "no key source"},
		"none alg":            {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, JWKSURI: "https://i/k", Algorithms: []string{"none"}}, "unsupported algorithm"},
		"secret but no HS":    {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, JWKSURI: "https://i/k", HMACSecretEnv: "TA_SHORT", Algorithms: []string{"RS256"}}, "no HS256/HS384/HS512"},
		"keys but HS only":    {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, JWKSURI: "https://i/k", HMACSecretEnv: "TA_SHORT", Algorithms: []string{"HS256"}}, "no asymmetric algorithm"},
		"discovery over http": {IssuerConfig{Name: "a", Issuer: "http://idp.example", Audiences: []string{"x"}, Discovery: true, Algorithms: []string{"RS256"}}, "plain http"},
		"bad inline jwks":     {IssuerConfig{Name: "a", Issuer: "https://i", Audiences: []string{"x"}, JWKS: `{"keys":[]}`, Algorithms: []string{"RS256"}}, "no usable"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			found := false
			for _, p := range tc.cfg.Validate() {
				if strings.Contains(p, tc.want) {
					found = true
				}
			}
			if !found {
				t.Errorf("problems %q lack %q", tc.cfg.Validate(), tc.want)
			}
		})
	}
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && (s[:len(sub)] == sub || contains(s[1:], sub)))
}
