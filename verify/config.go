package verify

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/tokenauthz/tokenauthz/cache"
)

// IssuerConfig describes one trusted token issuer. Exactly one key source is
// set: JWKSURI, Discovery, JWKSFile or JWKS; HMACSecretFile or HMACSecretEnv
// may stand alone or beside it.
type IssuerConfig struct {
	// Name identifies the issuer in routes, logs and metrics.
	Name string `yaml:"name"`
	// Issuer must equal the token's iss claim exactly (no trailing-slash or
	// case folding). Set this or IssuerTemplate.
	Issuer string `yaml:"issuer"`
	// IssuerTemplate makes this entry one issuer per tenant: an https URL
	// with one {tenant} placeholder in its path or as one label of its host
	// (https://login.microsoftonline.com/{tenant}/v2.0). A token's iss that
	// fits it, with an accepted tenant, names the tenant's issuer; its keys
	// are discovered on first use. {tenant} may also appear in jwks_uri and
	// the introspection and userinfo endpoints.
	IssuerTemplate string `yaml:"issuer_template"`
	// Tenants says which values of {tenant} are accepted (with
	// IssuerTemplate only).
	Tenants *TenantsConfig `yaml:"tenants"`
	// TenantPattern narrows the values {tenant} may take (a regular
	// expression matched against the whole value). Whatever it says, a
	// value has 1 to 64 of [A-Za-z0-9_-] (a host label: 1 to 63 of
	// [a-z0-9-]), so it can never reach another path, host or port.
	TenantPattern string `yaml:"tenant_pattern"`
	// MaxTenantsCached bounds the tenants whose issuer (key set,
	// discovery document) this pod keeps in memory; the least used go
	// first, and Redis keeps them fleet-wide. Default 10000.
	MaxTenantsCached int `yaml:"max_tenants_cached"`
	// MaxDiscoveriesPerSecond bounds first-time key loads of new tenants
	// from the provider, fleet-wide with Redis (per pod without), so a
	// flood of tokens naming made-up tenants cannot become a flood at the
	// provider. Default 10.
	MaxDiscoveriesPerSecond int `yaml:"max_discoveries_per_second"`
	// Audiences: the token's aud (string or array) must contain one of them.
	// Required unless AllowAnyAudience is set.
	Audiences []string `yaml:"audiences"`
	// AllowAnyAudience skips the aud check. Dangerous: any token of this issuer,
	// minted for any service, is accepted.
	AllowAnyAudience bool `yaml:"allow_any_audience"`

	JWKSURI string `yaml:"jwks_uri"`
	// Discovery reads <issuer>/.well-known/openid-configuration and uses its
	// jwks_uri; the document's issuer must equal Issuer.
	Discovery bool `yaml:"discovery"`
	// DiscoveryAllowedHosts are hosts (with port, if not 443) besides the
	// issuer's own origin that may serve the jwks_uri, introspection and
	// userinfo endpoints a discovery document names, over https. Google's
	// keys, for one, are on www.googleapis.com. A document naming any other
	// host is refused.
	DiscoveryAllowedHosts []string `yaml:"discovery_allowed_hosts"`
	JWKSFile              string   `yaml:"jwks_file"`
	// JWKS is an inline JSON Web Key Set.
	JWKS string `yaml:"jwks"`
	// HMACSecretFile / HMACSecretEnv hold a shared secret for HS256/384/512.
	// The secret must be at least as long as the hash output of every HS
	// algorithm allowed (32, 48, 64 bytes).
	HMACSecretFile string `yaml:"hmac_secret_file"`
	HMACSecretEnv  string `yaml:"hmac_secret_env"`

	// Algorithms is the allowlist of JWS algorithms. Required; never taken
	// from the token.
	Algorithms []string `yaml:"algorithms"`
	// Leeway absorbs clock skew for exp, nbf and iat. Default 30s, at most 5m.
	Leeway *time.Duration `yaml:"leeway"`
	// RequiredClaims must be present and non-null.
	RequiredClaims []string `yaml:"required_claims"`
	// TokenType, if set, is required in the JOSE typ header (compared
	// case-insensitively, with or without "application/"), e.g. "at+jwt" to
	// accept only RFC 9068 access tokens and never ID tokens.
	TokenType string `yaml:"token_type"`
	// AllowMissingExp accepts tokens without exp. Dangerous: they never expire.
	AllowMissingExp bool `yaml:"allow_missing_exp"`

	Keys KeysConfig `yaml:"keys"`

	// Introspection, when set, lets this issuer's opaque tokens in (RFC 7662)
	// and lets routes with introspect: always confirm its JWTs are still active.
	Introspection *IntrospectionConfig `yaml:"introspection"`
	// Userinfo, when set, lets routes enrich this issuer's tokens with the
	// OIDC userinfo endpoint's claims.
	Userinfo *UserinfoConfig `yaml:"userinfo"`

	// DPoP, when set, checks DPoP proofs (RFC 9449) for this issuer's
	// DPoP-bound tokens (cnf.jkt).
	DPoP *DPoPConfig `yaml:"dpop"`
}

// TenantsConfig lists the accepted values of an issuer template's
// {tenant}: exactly one of Allow, File or Any.
type TenantsConfig struct {
	Allow []string `yaml:"allow"`
	// File holds one tenant a line (# comments and blank lines are
	// skipped), read again when it changes.
	File string `yaml:"file"`
	// Any accepts every value the tenant pattern allows: any tenant of the
	// provider can then call the routes (restrict them with CEL's tenant).
	Any bool `yaml:"any"`
}

// IntrospectionConfig is an RFC 7662 token introspection endpoint and the
// client credentials tokenauthz authenticates to it with.
type IntrospectionConfig struct {
	// Endpoint of the introspection service. Default: the discovery
	// document's introspection_endpoint (needs discovery: true).
	Endpoint string `yaml:"endpoint"`
	ClientID string `yaml:"client_id"`
	// The client secret comes from a file or an environment variable, never
	// from the config itself, so configs can be shared and logged.
	ClientSecretFile string `yaml:"client_secret_file"`
	ClientSecretEnv  string `yaml:"client_secret_env"`
	// AuthMethod is client_secret_basic (default) or client_secret_post.
	AuthMethod string `yaml:"auth_method"`
	// Timeout bounds one call. Default 2s.
	Timeout time.Duration `yaml:"timeout"`
	// MaxResponseBytes bounds a response. Default 64 KiB.
	MaxResponseBytes int64 `yaml:"max_response_bytes"`
	// CacheTTL is how long an active result is reused, at most (never past
	// the token's exp). It is the revocation latency. Default 30s; 0 asks
	// the provider on every request.
	CacheTTL *time.Duration `yaml:"cache_ttl"`
	// NegativeCacheTTL is how long an inactive result is reused, to absorb
	// floods of bad tokens. Default 5s; 0 disables.
	NegativeCacheTTL *time.Duration `yaml:"negative_cache_ttl"`
	// MaxCallsPerSecond bounds this pod's calls to the endpoint (with a
	// burst of as many), so a flood of distinct made-up tokens cannot turn
	// into a flood at the provider; calls over it are a 503. Default 500;
	// -1 removes the bound.
	MaxCallsPerSecond int `yaml:"max_calls_per_second"`
	// MaxCallsPerClientPerSecond is each client address's share of
	// max_calls_per_second (with a burst of as many), so one client's flood
	// of made-up tokens cannot starve the others. Default a tenth of
	// max_calls_per_second; -1 removes the per-client share.
	MaxCallsPerClientPerSecond int `yaml:"max_calls_per_client_per_second"`
	// AllowHTTP permits a plain-http endpoint on a non-loopback host.
	// Dangerous: tokens and the client secret cross the network in the clear.
	AllowHTTP bool `yaml:"allow_http"`
}

// UserinfoConfig is an OIDC userinfo endpoint whose claims routes can use.
type UserinfoConfig struct {
	// Endpoint of the userinfo service. Default: the discovery document's
	// userinfo_endpoint (needs discovery: true).
	Endpoint string `yaml:"endpoint"`
	// EveryRoute enriches this issuer's tokens on every route, not only on
	// routes with userinfo: true.
	EveryRoute bool `yaml:"every_route"`
	// Timeout bounds one call. Default 2s.
	Timeout time.Duration `yaml:"timeout"`
	// MaxResponseBytes bounds a response. Default 64 KiB.
	MaxResponseBytes int64 `yaml:"max_response_bytes"`
	// CacheTTL: how long a response is reused, at most (never past the
	// token's exp). Default 30s; 0 disables.
	CacheTTL *time.Duration `yaml:"cache_ttl"`
	// NegativeCacheTTL: how long a refusal (HTTP 401) is reused. Default 5s.
	NegativeCacheTTL *time.Duration `yaml:"negative_cache_ttl"`
	// AllowHTTP permits a plain-http endpoint on a non-loopback host.
	AllowHTTP bool `yaml:"allow_http"`
}

// endpointDefaults are shared by the introspection and userinfo calls.
const (
	defaultEndpointTimeout  = 2 * time.Second
	defaultEndpointMaxBytes = 64 << 10
	defaultCacheTTL         = 30 * time.Second
	// defaultMaxCallsPerSecond bounds introspection calls per pod.
	defaultMaxCallsPerSecond = 500
	defaultNegativeCacheTTL  = 5 * time.Second
)

func durOr(d *time.Duration, def time.Duration) time.Duration {
	if d == nil {
		return def
	}
	return *d
}

// KeysConfig tunes fetching of remote key sets. Zero values take the defaults.
type KeysConfig struct {
	// Timeout bounds one fetch (discovery or JWKS). Default 5s.
	Timeout time.Duration `yaml:"timeout"`
	// RefreshInterval is used when the response has no Cache-Control max-age.
	// Default 15m.
	RefreshInterval time.Duration `yaml:"refresh_interval"`
	// MinRefreshInterval is the floor for max-age, the wait after a failed
	// fetch, and the least time between two refetches caused by unknown kids.
	// Default 30s.
	MinRefreshInterval time.Duration `yaml:"min_refresh_interval"`
	// MaxRefreshInterval caps max-age. Default 24h.
	MaxRefreshInterval time.Duration `yaml:"max_refresh_interval"`
	// MaxStale is how long past its refresh time a key set keeps serving while
	// refreshes fail. Default 24h.
	MaxStale time.Duration `yaml:"max_stale"`
	// MaxResponseBytes bounds a discovery or JWKS response. Default 512 KiB.
	MaxResponseBytes int64 `yaml:"max_response_bytes"`
	// MaxKeys bounds the keys in one set; a larger set is rejected. Default 100.
	MaxKeys int `yaml:"max_keys"`
	// AllowHTTP permits plain-http fetch URLs to non-loopback hosts. Dangerous:
	// whoever is on the path can substitute keys.
	AllowHTTP bool `yaml:"allow_http"`
}

const (
	defaultLeeway = 30 * time.Second
	maxLeeway     = 5 * time.Minute
)

func (k KeysConfig) withDefaults() KeysConfig {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&k.Timeout, 5*time.Second)
	def(&k.RefreshInterval, 15*time.Minute)
	def(&k.MinRefreshInterval, 30*time.Second)
	def(&k.MaxRefreshInterval, 24*time.Hour)
	def(&k.MaxStale, 24*time.Hour)
	if k.MaxResponseBytes <= 0 {
		k.MaxResponseBytes = 512 << 10
	}
	if k.MaxKeys <= 0 {
		k.MaxKeys = 100
	}
	return k
}

func (c *IssuerConfig) leeway() time.Duration {
	if c.Leeway == nil {
		return defaultLeeway
	}
	return *c.Leeway
}

// Validate returns every problem in c, each naming the offending key relative
// to the issuer (e.g. "algorithms: ..."). It reads secret and key files to
// check them but keeps nothing.
func (c *IssuerConfig) Validate() []string {
	var p []string
	bad := func(key, format string, args ...any) { p = append(p, key+": "+fmt.Sprintf(format, args...)) }

	if c.Name == "" {
		bad("name", "required")
	}
	switch {
	case c.Issuer == "" && c.IssuerTemplate == "":
		bad("issuer", "required (or issuer_template)")
	case c.Issuer != "" && c.IssuerTemplate != "":
		bad("issuer", "set issuer or issuer_template, not both")
	case c.IssuerTemplate != "":
		p = append(p, c.validateTemplate()...)
	default:
		for key, v := range map[string]string{"jwks_uri": c.JWKSURI, "introspection.endpoint": configuredIntrospectionEndpoint(c.Introspection), "userinfo.endpoint": configuredUserinfoEndpoint(c.Userinfo)} {
			if strings.Contains(v, tenantPlaceholder) {
				bad(key, "%s is only for an issuer_template's issuers", tenantPlaceholder)
			}
		}
		for _, k := range []struct {
			key string
			set bool
		}{{"tenants", c.Tenants != nil}, {"tenant_pattern", c.TenantPattern != ""},
			{"max_tenants_cached", c.MaxTenantsCached != 0}, {"max_discoveries_per_second", c.MaxDiscoveriesPerSecond != 0}} {
			if k.set {
				bad(k.key, "only used with issuer_template")
			}
		}
	}
	if len(c.Audiences) == 0 && !c.AllowAnyAudience {
		bad("audiences", "required (or set allow_any_audience: true, which accepts tokens minted for any service)")
	}
	for i, a := range c.Audiences {
		if a == "" {
			bad(fmt.Sprintf("audiences[%d]", i), "empty")
		}
	}
	if c.Leeway != nil && (*c.Leeway < 0 || *c.Leeway > maxLeeway) {
		bad("leeway", "must be between 0 and %s", maxLeeway)
	}

	sources := 0
	for _, set := range []bool{c.JWKSURI != "", c.Discovery, c.JWKSFile != "", c.JWKS != ""} {
		if set {
			sources++
		}
	}
	hasHMAC := c.HMACSecretFile != "" || c.HMACSecretEnv != ""
	if sources > 1 {
		bad("jwks_uri", "set only one of jwks_uri, discovery, jwks_file, jwks")
	}
	if sources == 0 && !hasHMAC {
		bad("jwks_uri", "no key source: set one of jwks_uri, discovery, jwks_file, jwks, hmac_secret_file, hmac_secret_env")
	}
	if c.HMACSecretFile != "" && c.HMACSecretEnv != "" {
		bad("hmac_secret_file", "set only one of hmac_secret_file, hmac_secret_env")
	}
	keys := c.Keys.withDefaults()
	if c.JWKSURI != "" {
		if err := checkFetchURL(strings.ReplaceAll(c.JWKSURI, tenantPlaceholder, "tenant"), keys.AllowHTTP); err != nil {
			bad("jwks_uri", "%v", err)
		}
	}
	if c.Discovery && c.Issuer != "" {
		if err := checkFetchURL(c.Issuer, keys.AllowHTTP); err != nil {
			bad("issuer", "discovery needs a fetchable issuer URL: %v", err)
		}
	}
	for i, h := range c.DiscoveryAllowedHosts {
		key := fmt.Sprintf("discovery_allowed_hosts[%d]", i)
		switch {
		case !c.Discovery:
			bad(key, "only used with discovery: true")
		case h == "" || strings.ContainsAny(h, "/@?# ") || strings.Contains(h, "*"):
			bad(key, "a host name (with :port if not 443), not a URL or a pattern")
		}
	}
	if c.JWKSFile != "" {
		if b, err := os.ReadFile(c.JWKSFile); err != nil {
			bad("jwks_file", "%v", err)
		} else if _, err := parseKeySet(b, keys.MaxKeys); err != nil {
			bad("jwks_file", "%v", err)
		}
	}
	if c.JWKS != "" {
		if _, err := parseKeySet([]byte(c.JWKS), keys.MaxKeys); err != nil {
			bad("jwks", "%v", err)
		}
	}
	if in := c.Introspection; in != nil {
		p = append(p, in.validate(c.Discovery)...)
	}
	if c.DPoP != nil {
		p = append(p, c.DPoP.validate()...)
	}
	if ui := c.Userinfo; ui != nil {
		p = append(p, validateEndpoint("userinfo", ui.Endpoint, ui.AllowHTTP, c.Discovery, ui.Timeout,
			ui.MaxResponseBytes, ui.CacheTTL, ui.NegativeCacheTTL)...)
	}
	if keys.MinRefreshInterval > keys.MaxRefreshInterval {
		bad("keys.min_refresh_interval", "greater than keys.max_refresh_interval")
	}

	if len(c.Algorithms) == 0 {
		bad("algorithms", "required: list the JWS algorithms this issuer signs with (e.g. [RS256])")
	}
	var secret []byte
	if hasHMAC {
		var err error
		if secret, err = c.hmacSecret(); err != nil {
			key := "hmac_secret_file"
			if c.HMACSecretEnv != "" {
				key = "hmac_secret_env"
			}
			bad(key, "%v", err)
		}
	}
	hsAllowed, asymAllowed := false, false
	for i, a := range c.Algorithms {
		spec, ok := algorithms[a]
		if !ok {
			bad(fmt.Sprintf("algorithms[%d]", i), "unsupported algorithm %q (supported: %s)", a, supportedAlgorithms())
			continue
		}
		if spec.kty == ktyOct {
			hsAllowed = true
			if !hasHMAC {
				bad(fmt.Sprintf("algorithms[%d]", i), "%s needs hmac_secret_file or hmac_secret_env", a)
			} else if secret != nil && len(secret) < spec.minSecret {
				bad(fmt.Sprintf("algorithms[%d]", i), "%s needs a secret of at least %d bytes, have %d", a, spec.minSecret, len(secret))
			}
		} else {
			asymAllowed = true
		}
	}
	if hasHMAC && !hsAllowed && len(c.Algorithms) > 0 {
		bad("algorithms", "an HMAC secret is configured but no HS256/HS384/HS512 algorithm is allowed")
	}
	if sources > 0 && !asymAllowed && len(c.Algorithms) > 0 {
		bad("algorithms", "a key set is configured but no asymmetric algorithm is allowed")
	}
	return p
}

func (in *IntrospectionConfig) validate(discovery bool) []string {
	p := validateEndpoint("introspection", in.Endpoint, in.AllowHTTP, discovery, in.Timeout,
		in.MaxResponseBytes, in.CacheTTL, in.NegativeCacheTTL)
	if in.ClientID == "" {
		p = append(p, "introspection.client_id: required")
	}
	if in.MaxCallsPerSecond < -1 {
		p = append(p, "introspection.max_calls_per_second: a positive number, or -1 for no bound")
	}
	if in.MaxCallsPerClientPerSecond < -1 {
		p = append(p, "introspection.max_calls_per_client_per_second: a positive number, or -1 for no per-client share")
	}
	switch {
	case in.ClientSecretFile != "" && in.ClientSecretEnv != "":
		p = append(p, "introspection.client_secret_file: set only one of client_secret_file, client_secret_env")
	case in.ClientSecretFile == "" && in.ClientSecretEnv == "":
		p = append(p, "introspection.client_secret_file: required (or client_secret_env); secrets are never inline")
	default:
		if _, err := cache.ReadSecret(in.ClientSecretFile, in.ClientSecretEnv); err != nil {
			key := "introspection.client_secret_file"
			if in.ClientSecretEnv != "" {
				key = "introspection.client_secret_env"
			}
			p = append(p, key+": "+err.Error())
		}
	}
	switch in.AuthMethod {
	case "", authBasic, authPost:
	default:
		p = append(p, fmt.Sprintf("introspection.auth_method: %q is not client_secret_basic or client_secret_post", in.AuthMethod))
	}
	return p
}

func validateEndpoint(key, endpoint string, allowHTTP, discovery bool, timeout time.Duration, maxBytes int64, ttls ...*time.Duration) []string {
	var p []string
	switch {
	case endpoint != "":
		if err := checkFetchURL(strings.ReplaceAll(endpoint, tenantPlaceholder, "tenant"), allowHTTP); err != nil {
			p = append(p, fmt.Sprintf("%s.endpoint: %v", key, err))
		}
	case !discovery:
		p = append(p, key+".endpoint: required unless the issuer uses discovery: true")
	}
	if timeout < 0 {
		p = append(p, key+".timeout: must be positive")
	}
	if maxBytes < 0 {
		p = append(p, key+".max_response_bytes: must be positive")
	}
	for i, ttl := range ttls {
		if ttl != nil && *ttl < 0 {
			name := []string{"cache_ttl", "negative_cache_ttl"}[i]
			p = append(p, key+"."+name+": must not be negative")
		}
	}
	return p
}

func (c *IssuerConfig) hmacSecret() ([]byte, error) {
	return cache.ReadSecret(c.HMACSecretFile, c.HMACSecretEnv)
}

// checkFetchURL allows https anywhere and http only to loopback hosts (or
// everywhere with allowHTTP), so keys are not fetched over an open network in
// the clear by accident.
func checkFetchURL(raw string, allowHTTP bool) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("not a URL: %v", err)
	}
	if u.Host == "" {
		return fmt.Errorf("%q has no host", raw)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if allowHTTP || isLoopback(u.Hostname()) {
			return nil
		}
		return fmt.Errorf("%q is plain http: use https (or keys.allow_http: true)", raw)
	default:
		return fmt.Errorf("%q: scheme must be https", raw)
	}
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// WithDefaults is c with every unset setting at its default, as the
// verifier applies them: what the effective config log shows.
func (c IssuerConfig) WithDefaults() IssuerConfig {
	l := c.leeway()
	c.Leeway = &l
	c.Keys = c.Keys.withDefaults()
	if c.IssuerTemplate != "" {
		if c.MaxTenantsCached == 0 {
			c.MaxTenantsCached = defaultMaxTenantsCached
		}
		if c.MaxDiscoveriesPerSecond == 0 {
			c.MaxDiscoveriesPerSecond = defaultMaxDiscoveriesPerSecond
		}
		if c.TenantPattern == "" {
			c.TenantPattern = "[A-Za-z0-9_-]{1,64}"
		}
	}
	durOrDefault := func(d *time.Duration, def time.Duration) *time.Duration {
		v := durOr(d, def)
		return &v
	}
	if in := c.Introspection; in != nil {
		cp := *in
		if cp.AuthMethod == "" {
			cp.AuthMethod = "client_secret_basic"
		}
		if cp.Timeout <= 0 {
			cp.Timeout = defaultEndpointTimeout
		}
		if cp.MaxResponseBytes <= 0 {
			cp.MaxResponseBytes = defaultEndpointMaxBytes
		}
		cp.CacheTTL, cp.NegativeCacheTTL = durOrDefault(cp.CacheTTL, defaultCacheTTL), durOrDefault(cp.NegativeCacheTTL, defaultNegativeCacheTTL)
		if cp.MaxCallsPerSecond == 0 {
			cp.MaxCallsPerSecond = defaultMaxCallsPerSecond
		}
		if cp.MaxCallsPerClientPerSecond == 0 && cp.MaxCallsPerSecond > 0 {
			cp.MaxCallsPerClientPerSecond = max(1, cp.MaxCallsPerSecond/10)
		}
		c.Introspection = &cp
	}
	if ui := c.Userinfo; ui != nil {
		cp := *ui
		if cp.Timeout <= 0 {
			cp.Timeout = defaultEndpointTimeout
		}
		if cp.MaxResponseBytes <= 0 {
			cp.MaxResponseBytes = defaultEndpointMaxBytes
		}
		cp.CacheTTL, cp.NegativeCacheTTL = durOrDefault(cp.CacheTTL, defaultCacheTTL), durOrDefault(cp.NegativeCacheTTL, defaultNegativeCacheTTL)
		c.Userinfo = &cp
	}
	if d := c.DPoP; d != nil {
		cp := *d
		if len(cp.Algorithms) == 0 {
			cp.Algorithms = defaultDPoPAlgorithms
		}
		if cp.MaxAge == 0 {
			cp.MaxAge = defaultDPoPMaxAge
		}
		c.DPoP = &cp
	}
	return c
}

func configuredIntrospectionEndpoint(in *IntrospectionConfig) string {
	if in == nil {
		return ""
	}
	return in.Endpoint
}

func configuredUserinfoEndpoint(ui *UserinfoConfig) string {
	if ui == nil {
		return ""
	}
	return ui.Endpoint
}
