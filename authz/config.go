package authz

import (
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"

	"cel.dev/cel-go/cel"

	"github.com/tokenauthz/tokenauthz/verify"
)

// Config is the decision policy: issuers, routes and claim headers.
type Config struct {
	Issuers []verify.IssuerConfig `yaml:"issuers"`
	// Routes are matched in order; the first match wins. Envoy's per-route
	// context_extensions["route"] names a route directly and beats matching.
	// A request that matches no route is denied.
	Routes []RouteConfig `yaml:"routes"`
	// Headers maps an upstream header to where its value comes from: a
	// claim (dotted path for nested claims), a list of claim paths (the
	// first present wins) or { cel: EXPR }. Set with overwrite on allow;
	// removed when there is no value, and on anonymous routes, so a client
	// can never supply them. A route's own headers merge over these.
	Headers map[string]*HeaderSource `yaml:"headers"`
	// ReservedHeaderPrefix: request headers starting with it (e.g. "x-auth-")
	// are stripped on every allowed request, anonymous ones included.
	ReservedHeaderPrefix string `yaml:"reserved_header_prefix"`
	// Realm is sent in WWW-Authenticate. Default "tokenauthz".
	Realm string `yaml:"realm"`
	// StripAuthorization removes the Authorization header before the request
	// goes upstream. Default false (the upstream gets the token).
	StripAuthorization bool `yaml:"strip_authorization"`
	// MaxTokenBytes: longer tokens are denied before any parsing. Default 8192.
	MaxTokenBytes int `yaml:"max_token_bytes"`
	// DynamicMetadata lists what allows put in Envoy's dynamic metadata
	// (namespace envoy.filters.http.ext_authz), for later filters and access
	// logs: route, issuer, sub, scope. Default none: the metadata Struct
	// costs about as much to encode as the rest of the response, and sub is
	// personal data in access logs.
	DynamicMetadata []string `yaml:"dynamic_metadata"`
	// ClientAddressHeader names a request header holding the client's
	// address, for when Envoy is behind a proxy (the peer Envoy reports is
	// then the proxy): e.g. x-envoy-external-address, or x-forwarded-for,
	// whose last entry counts. Only a header that trusted proxies set and
	// overwrite. Default: Envoy's source address. The address shares out
	// introspection calls fairly (max_calls_per_client_per_second).
	ClientAddressHeader string `yaml:"client_address_header"`
	// SchemeHeader names a header a trusted proxy sets to the scheme the
	// client used (x-forwarded-proto), for DPoP's htu when Envoy sits
	// behind a TLS-terminating proxy. Default: Envoy's own scheme.
	SchemeHeader string `yaml:"scheme_header"`
	// ClientCert says where the client certificate comes from, for
	// certificate-bound tokens (RFC 8705).
	ClientCert ClientCertConfig `yaml:"client_cert"`
	// Hosts are routes for hosts, from policy sources other than the file
	// (Kubernetes TokenPolicies), compiled by CompileHostPolicy. Requests
	// that no file route matches are matched against the routes of the
	// policy for their host.
	Hosts []*CompiledHostPolicy `yaml:"-"`
	// RoutesFromResources: routes may come from resources only, so the
	// file may have none.
	RoutesFromResources bool `yaml:"-"`
	// ResourceIssuers are issuers from policy sources (TokenIssuer,
	// ClusterTokenIssuer), for host policies' routes only: a file route
	// without an issuers list accepts the file's issuers, never these.
	// Their iss values may repeat (two teams, one provider).
	ResourceIssuers []verify.IssuerConfig `yaml:"-"`
	// UndecidableResponse is how a check that could not be decided (the
	// provider unreachable) is answered: "error_response" (default), a
	// CheckResponse with error_response and 503, which Envoy 1.37 and later
	// treat as an error (failure_mode_allow and status_on_error apply); or
	// "grpc_unavailable", a gRPC UNAVAILABLE status, for older Envoys (and
	// the Istio releases built on them), which turn an error_response into
	// a 403 and ignore failure_mode_allow.
	UndecidableResponse string `yaml:"undecidable_response"`
}

// ClientCertConfig is where a request's client certificate comes from.
type ClientCertConfig struct {
	// From is "peer" (default): Envoy's attributes.source.certificate
	// (include_peer_certificate: true on the ext_authz filter); or
	// "header": a header set by a proxy you trust, in Envoy's
	// x-forwarded-client-cert form (Hash= and Cert=).
	From string `yaml:"from"`
	// Header is the header's name with from: header. Default
	// x-forwarded-client-cert.
	Header string `yaml:"header"`
}

// RouteConfig is one route's requirements.
type RouteConfig struct {
	Name  string `yaml:"name"`
	Match Match  `yaml:"match"`
	// Anonymous routes need no token and look at none: claim headers and
	// the Authorization header are stripped, so an unchecked token never
	// reaches the upstream as if it had been verified.
	Anonymous bool `yaml:"anonymous"`
	// AllowMissing makes the token optional (Envoy jwt_authn's
	// allow_missing): a request without one is allowed with no identity
	// (claim and Authorization headers stripped); a request with one is
	// checked like on any route, and an invalid token is a 401.
	AllowMissing bool `yaml:"allow_missing"`
	// Issuers accepted on this route (names). Default: every issuer.
	Issuers []string `yaml:"issuers"`
	// Scopes all required (from scope or scp); missing ones give 403.
	Scopes []string `yaml:"scopes"`
	// Claims: each claim (dotted path) must equal the value, or one of the
	// values in a list; an array claim matches when any element does.
	// Compared exactly: "true" is not true.
	Claims map[string]any `yaml:"claims"`
	// When are CEL conditions, all of which must be true (else 403). They
	// see request, claims, userinfo, issuer, tenant, route and scopes.
	When []WhenRule `yaml:"when"`
	// Headers merge over the top-level headers for this route; a null
	// value turns one off here (its client copy is still removed).
	Headers map[string]*HeaderSource `yaml:"headers"`
	// Introspect: "opaque" (default) sends opaque tokens to the issuers'
	// introspection endpoints and verifies JWTs locally only; "always" also
	// confirms every JWT with introspection, so revoked JWTs are refused
	// (every accepted issuer needs an introspection block); "never" accepts
	// JWTs only.
	Introspect string `yaml:"introspect"`
	// SenderConstraint: "if_bound" (default) checks the binding of every
	// token that carries cnf (a DPoP proof for cnf.jkt, the client
	// certificate for cnf.x5t#S256), so a stolen bound token cannot be
	// replayed as a bearer token; "required" also refuses unbound tokens;
	// "none" ignores binding (for migrations only: a stolen bound token
	// then works as a bearer token).
	SenderConstraint string `yaml:"sender_constraint"`
	// Mode is enforce (default) or dry_run: the whole decision runs and is
	// logged, counted (dry_run="true"), traced and put in dynamic metadata,
	// and the request is then allowed, so a rule can be tried on live
	// traffic before it is enforced. Claim headers are sent only from a
	// token that passed verification, revocation and binding; spoofed copies
	// are removed as always. A dry-run route is an open route: validate and
	// the startup log name each one.
	Mode string `yaml:"mode"`
	// Userinfo adds the userinfo endpoint's claims under "userinfo." for
	// claim headers and claim rules (every accepted issuer needs a userinfo
	// block).
	Userinfo bool `yaml:"userinfo"`
}

// Match selects requests. Empty fields match everything.
type Match struct {
	// Host matches :authority without port, case-insensitively; "*.example.com"
	// matches any subdomain.
	Host string `yaml:"host"`
	// Path matches the path (query excluded) exactly.
	Path string `yaml:"path"`
	// PathPrefix matches whole segments: "/admin" matches /admin and
	// /admin/x, not /administrator. "/" matches everything.
	PathPrefix string   `yaml:"path_prefix"`
	Methods    []string `yaml:"methods"`
}

const (
	defaultRealm         = "tokenauthz"
	defaultMaxTokenBytes = 8192
)

// senderMode is a route's sender_constraint.
type senderMode int

const (
	senderIfBound senderMode = iota
	senderRequired
	senderNone
)

var senderModes = map[string]senderMode{"": senderIfBound, "if_bound": senderIfBound, "required": senderRequired, "none": senderNone}

var introspectModes = map[string]verify.Introspect{
	"": verify.IntrospectOpaque, "opaque": verify.IntrospectOpaque,
	"always": verify.IntrospectAlways, "never": verify.IntrospectNever,
}

var headerName = regexp.MustCompile(`^[a-z0-9!#$%&'*+.^_|~-]+$`)

// Validate returns every problem in c, each naming its key.
func (c *Config) Validate() []string {
	var p []string
	bad := func(key, format string, args ...any) { p = append(p, key+": "+fmt.Sprintf(format, args...)) }

	names := map[string]bool{}
	if len(c.Issuers) == 0 {
		bad("issuers", "at least one issuer is required")
	}
	isses := map[string]bool{}
	byName := map[string]*verify.IssuerConfig{}
	for i := range c.Issuers {
		is := &c.Issuers[i]
		key := fmt.Sprintf("issuers[%d]", i)
		for _, prob := range is.Validate() {
			p = append(p, key+"."+prob)
		}
		if is.Name != "" {
			if names[is.Name] {
				bad(key+".name", "duplicate issuer name %q", is.Name)
			}
			names[is.Name] = true
			byName[is.Name] = is
		}
		if is.Issuer != "" {
			if isses[is.Issuer] {
				bad(key+".issuer", "issuer %q configured twice", is.Issuer)
			}
			isses[is.Issuer] = true
		}
		if t := is.IssuerTemplate; t != "" {
			if isses["template "+t] {
				bad(key+".issuer_template", "template %q configured twice", t)
			}
			isses["template "+t] = true
		}
	}

	if len(c.Routes) == 0 && !c.RoutesFromResources {
		bad("routes", "at least one route is required (requests matching no route are denied)")
	}
	p = append(p, validateRoutes("routes", c.Routes, names, byName, c.Headers, true)...)

	for h, src := range c.Headers {
		if src == nil {
			bad("headers."+h, "names no claim")
			continue
		}
		for _, prob := range validateHeader(h, src) {
			bad("headers."+h, "%s", prob)
		}
	}
	if c.ReservedHeaderPrefix != "" && !headerName.MatchString(c.ReservedHeaderPrefix) {
		bad("reserved_header_prefix", "not a lower-case header name prefix")
	}
	for i, m := range c.DynamicMetadata {
		switch m {
		case "route", "issuer", "sub", "scope":
		default:
			bad(fmt.Sprintf("dynamic_metadata[%d]", i), "%q is not route, issuer, sub or scope", m)
		}
	}
	if h := c.ClientAddressHeader; h != "" && (!headerName.MatchString(h) || h == "authorization") {
		bad("client_address_header", "not a lower-case HTTP header name")
	}
	switch c.ClientCert.From {
	case "", "peer":
		if c.ClientCert.Header != "" {
			bad("client_cert.header", "only with from: header")
		}
	case "header":
		if h := c.ClientCert.Header; h != "" && !headerName.MatchString(h) {
			bad("client_cert.header", "not a lower-case HTTP header name")
		}
	default:
		bad("client_cert.from", "%q is not peer or header", c.ClientCert.From)
	}
	switch c.UndecidableResponse {
	case "", "error_response", "grpc_unavailable":
	default:
		bad("undecidable_response", "%q is not error_response or grpc_unavailable", c.UndecidableResponse)
	}
	if h := c.SchemeHeader; h != "" && !headerName.MatchString(h) {
		bad("scheme_header", "not a lower-case HTTP header name")
	}
	if c.MaxTokenBytes < 0 {
		bad("max_token_bytes", "must be positive")
	}
	if strings.ContainsAny(c.Realm, "\"\\\r\n") {
		bad("realm", "must not contain quotes, backslashes or line breaks")
	}
	return p
}

// validateRoutes checks routes (of the file, or of a host policy: no
// host there, its hosts are the policy's), each problem under key[i].
// names and byName are the issuers routes may name.
func validateRoutes(prefix string, routes []RouteConfig, names map[string]bool, byName map[string]*verify.IssuerConfig,
	top map[string]*HeaderSource, hostAllowed bool) []string {
	var p []string
	bad := func(key, format string, args ...any) { p = append(p, key+": "+fmt.Sprintf(format, args...)) }
	routeNames := map[string]bool{}
	for i, r := range routes {
		key := fmt.Sprintf("%s[%d]", prefix, i)
		if r.Name == "" {
			bad(key+".name", "required")
		} else if routeNames[r.Name] {
			bad(key+".name", "duplicate route name %q", r.Name)
		}
		routeNames[r.Name] = true
		m := r.Match
		if m.Path != "" && m.PathPrefix != "" {
			bad(key+".match", "set path or path_prefix, not both")
		}
		for _, pat := range []struct{ key, val string }{{"path", m.Path}, {"path_prefix", m.PathPrefix}} {
			if pat.val == "" {
				continue
			}
			// A pattern follows the rules requests do, or it could never
			// match one (or would match one that was refused).
			if _, q, why := canonicalPath(pat.val); why != "" {
				bad(key+".match."+pat.key, "%s", why)
			} else if q != "" || strings.Contains(pat.val, "?") {
				bad(key+".match."+pat.key, "a path has no query string")
			}
		}
		if h := m.Host; h != "" && !hostAllowed {
			bad(key+".match.host", "a policy's routes take their hosts from the policy")
		} else if h != "" {
			if why := hostPatternProblem(h); why != "" {
				bad(key+".match.host", "%s", why)
			}
		}
		for j, meth := range m.Methods {
			if _, why := canonicalMethod(meth); why != "" || meth == "" {
				if why == "" {
					why = "empty"
				}
				bad(fmt.Sprintf("%s.match.methods[%d]", key, j), "%s, like GET", why)
			}
		}
		if r.Anonymous && r.AllowMissing {
			bad(key, "anonymous or allow_missing, not both")
		}
		if r.Anonymous && (len(r.Issuers) > 0 || len(r.Scopes) > 0 || len(r.Claims) > 0 || r.Introspect != "" || r.Userinfo) {
			bad(key, "an anonymous route takes no issuers, scopes, claims, introspect or userinfo")
		}
		for j, w := range r.When {
			if _, err := compileWhen(w); err != nil {
				bad(fmt.Sprintf("%s.when[%d]", key, j), "%v", err)
			}
		}
		for h, src := range r.Headers {
			if _, inTop := top[h]; src == nil && !inTop {
				bad(key+".headers."+h, "null turns off a top-level header, and there is none of that name")
				continue
			}
			for _, prob := range validateHeader(h, src) {
				bad(key+".headers."+h, "%s", prob)
			}
		}
		if _, ok := senderModes[r.SenderConstraint]; !ok {
			bad(key+".sender_constraint", "%q is not none, if_bound or required", r.SenderConstraint)
		}
		if r.Mode != "" && r.Mode != "enforce" && r.Mode != "dry_run" {
			bad(key+".mode", "%q is not enforce or dry_run", r.Mode)
		}
		if _, ok := introspectModes[r.Introspect]; !ok {
			bad(key+".introspect", "%q is not opaque, always or never", r.Introspect)
		}
		accepted := r.Issuers
		if len(accepted) == 0 {
			accepted = slices.Collect(maps.Keys(byName))
			slices.Sort(accepted)
		}
		for _, n := range accepted {
			is := byName[n]
			if is == nil {
				continue // reported below
			}
			if r.Introspect == "always" && is.Introspection == nil {
				bad(key+".introspect", "always, but issuer %q has no introspection block", n)
			}
			if r.Userinfo && is.Userinfo == nil {
				bad(key+".userinfo", "issuer %q has no userinfo block", n)
			}
		}
		for j, n := range r.Issuers {
			if !names[n] {
				bad(fmt.Sprintf("%s.issuers[%d]", key, j), "no issuer named %q", n)
			}
		}
		for claim, want := range r.Claims {
			if _, err := compileClaimValues(want); err != nil {
				bad(key+".claims."+claim, "%v", err)
			}
		}
	}

	return p
}

// Warnings are what validate reports about a valid config that is likely
// wrong, each naming its key: an issuer that is not a URL, a route that an
// earlier one shadows (it can never match), a condition whose type is
// known only at run time (if it is not a bool, it denies every request).
func (c *Config) Warnings() []string {
	var w []string
	for i, is := range c.Issuers {
		if is.Tenants != nil && is.Tenants.Any {
			w = append(w, fmt.Sprintf("issuers[%d].tenants: any: true accepts a token of every tenant of the provider (anyone can make one); restrict routes with CEL's tenant, or list the tenants", i))
		}
		if u, err := url.Parse(is.Issuer); is.IssuerTemplate == "" && !is.Discovery && (err != nil || u.Scheme == "" || u.Host == "") {
			w = append(w, fmt.Sprintf("issuers[%d].issuer: %q is not a URL; a token's iss must equal it exactly, and providers use their https URL", i, is.Issuer))
		}
	}
	for j, later := range c.Routes {
		if later.Mode == "dry_run" {
			w = append(w, fmt.Sprintf("routes[%d] (%s): dry_run: decisions are evaluated and logged, not enforced (an open route)", j, later.Name))
		}
		for i := range j {
			if earlier := c.Routes[i]; shadows(earlier, later) {
				w = append(w, fmt.Sprintf("routes[%d] (%s): never matches: routes[%d] (%s) before it matches every request it would", j, later.Name, i, earlier.Name))
				break
			}
		}
		for k, wr := range later.When {
			if e, err := compileWhen(wr); err == nil && e.dyn {
				w = append(w, fmt.Sprintf("routes[%d].when[%d] (%s): its type is known only at run time; if it is not a bool, every request is denied: compare or convert it (%s != '', bool(...))",
					j, k, later.Name, wr.CEL))
			}
		}
	}
	return w
}

// shadows reports whether every request later matches, earlier matches
// first: same or any host, any method of later's, a path under earlier's.
func shadows(earlier, later RouteConfig) bool {
	e, l := earlier.Match, later.Match
	if e.Host != "" && !strings.EqualFold(strings.TrimSuffix(e.Host, "."), strings.TrimSuffix(l.Host, ".")) {
		return false
	}
	if len(e.Methods) > 0 {
		if len(l.Methods) == 0 {
			return false
		}
		for _, m := range l.Methods {
			if !slices.Contains(e.Methods, m) {
				return false
			}
		}
	}
	under := func(p, prefix string) bool {
		prefix = strings.TrimSuffix(prefix, "/")
		return prefix == "" || p == prefix || strings.HasPrefix(p, prefix+"/")
	}
	switch {
	case e.Path != "":
		return l.Path == e.Path
	case l.Path != "":
		return under(l.Path, e.PathPrefix)
	case l.PathPrefix != "":
		return under(l.PathPrefix, e.PathPrefix)
	}
	return strings.TrimSuffix(e.PathPrefix, "/") == ""
}

// hostPatternProblem says what is wrong with a host pattern ("" if
// nothing): a DNS name or IP literal without port, or "*." and a name.
func hostPatternProblem(h string) string {
	name := strings.TrimPrefix(h, "*.")
	_, why := canonicalHost(name)
	switch {
	case strings.Contains(name, "*"):
		return "a wildcard is only allowed as a leading \"*.\""
	case why != "":
		return why
	case strings.HasPrefix(name, "[") && !strings.HasSuffix(name, "]") || !strings.HasPrefix(name, "[") && strings.Contains(name, ":"):
		return "no port: hosts are matched without one"
	}
	return ""
}

// validateHeader checks a claim header's name and source; src may be nil
// (a route turning the header off).
func validateHeader(h string, src *HeaderSource) []string {
	var p []string
	switch {
	case !headerName.MatchString(h):
		p = append(p, "not a lower-case HTTP header name")
	case h == "authorization" || h == "host" || strings.HasPrefix(h, "x-envoy-") || http.CanonicalHeaderKey(h) == "Te":
		p = append(p, "this header cannot carry a claim")
	}
	if src == nil {
		return p
	}
	switch {
	case src.CEL != "" && len(src.Claims) > 0:
		p = append(p, "a claim path or an expression, not both")
	case src.CEL != "":
		if _, err := compileCEL(src.CEL, nil); err != nil {
			p = append(p, err.Error())
		}
	case len(src.Claims) == 0:
		p = append(p, "names no claim")
	}
	for _, c := range src.Claims {
		if c == "" {
			p = append(p, "names no claim")
		}
	}
	return p
}

// compileWhen compiles a condition: it must be a bool.
func compileWhen(w WhenRule) (*celExpr, error) {
	if strings.TrimSpace(w.CEL) == "" {
		return nil, fmt.Errorf("empty expression")
	}
	return compileCEL(w.CEL, cel.BoolType)
}

// AllIssuers are the file's issuers and the resources': what the
// verifier must know.
func (c *Config) AllIssuers() []verify.IssuerConfig {
	return append(slices.Clip(c.Issuers), c.ResourceIssuers...)
}

// WithDefaults is c with every unset setting at its default, issuers
// included: what the effective config log shows.
func (c Config) WithDefaults() Config {
	if c.Realm == "" {
		c.Realm = defaultRealm
	}
	if c.MaxTokenBytes == 0 {
		c.MaxTokenBytes = defaultMaxTokenBytes
	}
	if c.UndecidableResponse == "" {
		c.UndecidableResponse = "error_response"
	}
	if c.ClientCert.From == "" {
		c.ClientCert.From = "peer"
	}
	issuers := make([]verify.IssuerConfig, len(c.Issuers))
	for i, is := range c.Issuers {
		issuers[i] = is.WithDefaults()
	}
	c.Issuers = issuers
	return c
}
