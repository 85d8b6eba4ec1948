package authz

import (
	"encoding/json"
	"fmt"
	"math/big"
	"sort"
	"strings"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/tokenauthz/tokenauthz/verify"
)

// policy is a Config compiled for the hot path: everything that can be
// decided at load time is.
type policy struct {
	routes        []*route
	byName        map[string]*route
	reserved      string
	realm         string
	stripAuthz    bool
	maxTokenBytes int
	foldRoutes    bool // some route pattern has upper-case or non-ASCII letters
	clientHeader  string
	schemeHeader  string
	grpcErrors    bool                       // undecidable checks answer a gRPC UNAVAILABLE status
	certHeader    string                     // "" for the peer certificate
	issuerMeta    map[string]*structpb.Value // issuer name → metadata value
	meta          struct{ route, issuer, sub, scope bool }
}

func (p *policy) issuerValue(name string) *structpb.Value {
	if v, ok := p.issuerMeta[name]; ok {
		return v
	}
	return structpb.NewStringValue(name)
}

// isClaimHeader reports whether the route sets or removes header h itself.
func (r *route) isClaimHeader(h string) bool {
	for i := range r.headers {
		if r.headers[i].header == h {
			return true
		}
	}
	return false
}

type route struct {
	name   string
	host   string // lower case; "*.x" for wildcard
	path   string // canonical (decoded); "" for any
	prefix string // canonical, without a trailing "/"; "" for any
	// The same, case-folded, for the ambiguity check in match.
	foldPath, foldPrefix string
	methods              []string
	anonymous            bool
	// allowMissing: no token is an allow without identity; a bad one a 401.
	allowMissing bool
	sender       senderMode
	metaName     *structpb.Value // the name as dynamic metadata, shared by responses
	vpol         verify.Policy   // what the token must pass in verify
	scopes       []string
	claims       []claimRule
	when         []whenRule
	headers      []claimHeader // sorted by name: the top-level ones with the route's merged over them
}

// claimHeader is one upstream header of a route: from the first of claims
// present, or from expr; off: the route turned it off (still removed).
type claimHeader struct {
	header string
	claims []string
	expr   *celExpr
	off    bool
}

// whenRule is a compiled condition.
type whenRule struct {
	expr    *celExpr
	message string // the deny's description: the message, or the expression
}

type claimRule struct {
	claim string
	want  []any // string, bool or *big.Float
}

func compile(c *Config) (p *policy, err error) {
	if p := c.Validate(); len(p) > 0 {
		return nil, fmt.Errorf("authz: invalid config: %s", strings.Join(p, "; "))
	}
	p = &policy{
		byName:        map[string]*route{},
		reserved:      c.ReservedHeaderPrefix,
		realm:         c.Realm,
		stripAuthz:    c.StripAuthorization,
		maxTokenBytes: c.MaxTokenBytes,
		clientHeader:  c.ClientAddressHeader,
		schemeHeader:  c.SchemeHeader,
		grpcErrors:    c.UndecidableResponse == "grpc_unavailable",
	}
	if c.ClientCert.From == "header" {
		p.certHeader = c.ClientCert.Header
		if p.certHeader == "" {
			p.certHeader = "x-forwarded-client-cert"
		}
	}
	for _, m := range c.DynamicMetadata {
		switch m {
		case "route":
			p.meta.route = true
		case "issuer":
			p.meta.issuer = true
		case "sub":
			p.meta.sub = true
		case "scope":
			p.meta.scope = true
		}
	}
	if p.realm == "" {
		p.realm = defaultRealm
	}
	if p.maxTokenBytes == 0 {
		p.maxTokenBytes = defaultMaxTokenBytes
	}
	var allIssuers []string
	p.issuerMeta = map[string]*structpb.Value{}
	for _, is := range c.Issuers {
		allIssuers = append(allIssuers, is.Name)
		p.issuerMeta[is.Name] = structpb.NewStringValue(is.Name)
	}
	for _, rc := range c.Routes {
		path, _, _ := canonicalPath(rc.Match.Path)
		prefix, _, _ := canonicalPath(rc.Match.PathPrefix)
		r := &route{
			name: rc.Name, host: strings.ToLower(strings.TrimSuffix(rc.Match.Host, ".")), path: path,
			prefix: strings.TrimSuffix(prefix, "/"), methods: rc.Match.Methods,
			anonymous: rc.Anonymous, allowMissing: rc.AllowMissing, sender: senderModes[rc.SenderConstraint], scopes: rc.Scopes, metaName: structpb.NewStringValue(rc.Name),
			vpol: verify.Policy{Issuers: rc.Issuers, Introspect: introspectModes[rc.Introspect], Userinfo: rc.Userinfo},
		}
		if len(r.vpol.Issuers) == 0 {
			r.vpol.Issuers = allIssuers
		}
		// The prefix "/" becomes "" and matches every path.
		r.foldPath, r.foldPrefix = foldCase(r.path), foldCase(r.prefix)
		if needsFold(r.path) || needsFold(r.prefix) {
			p.foldRoutes = true
		}
		names := make([]string, 0, len(rc.Claims))
		for n := range rc.Claims {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			want, _ := compileClaimValues(rc.Claims[n])
			r.claims = append(r.claims, claimRule{claim: n, want: want})
		}
		for _, w := range rc.When {
			e, err := compileWhen(w)
			if err != nil {
				return nil, err // Validate reported it
			}
			msg := w.Message
			if msg == "" {
				msg = w.CEL
			}
			r.when = append(r.when, whenRule{expr: e, message: msg})
		}
		if r.headers, err = compileHeaders(c.Headers, rc.Headers); err != nil {
			return nil, err
		}
		p.routes = append(p.routes, r)
		p.byName[r.name] = r
	}
	return p, nil
}

// compileClaimValues turns a YAML value (scalar or list of scalars) into the
// accepted values. Numbers become exact big.Floats so 1 equals 1.0 and large
// integers compare without float rounding.
func compileClaimValues(v any) ([]any, error) {
	list, isList := v.([]any)
	if !isList {
		list = []any{v}
	}
	if len(list) == 0 {
		return nil, fmt.Errorf("empty list of accepted values")
	}
	out := make([]any, 0, len(list))
	for _, e := range list {
		switch e := e.(type) {
		case string, bool:
			out = append(out, e)
		case int:
			out = append(out, new(big.Float).SetInt64(int64(e)))
		case int64:
			out = append(out, new(big.Float).SetInt64(e))
		case uint64:
			out = append(out, new(big.Float).SetUint64(e))
		case float64:
			out = append(out, new(big.Float).SetFloat64(e))
		case []any:
			return nil, fmt.Errorf("accepted values are strings, numbers or booleans, not a nested list")
		default:
			return nil, fmt.Errorf("accepted values are strings, numbers or booleans, not a mapping")
		}
	}
	return out, nil
}

// satisfied reports whether the claim value v equals one of the accepted
// values, by JSON type: a string only equals a string, a number a number.
// An array claim (groups, roles) is satisfied when any element is.
func (r *claimRule) satisfied(v any) bool {
	if list, ok := v.([]any); ok {
		for _, e := range list {
			if _, nested := e.([]any); !nested && r.satisfied(e) {
				return true
			}
		}
		return false
	}
	for _, w := range r.want {
		switch w := w.(type) {
		case string:
			if s, ok := v.(string); ok && s == w {
				return true
			}
		case bool:
			if b, ok := v.(bool); ok && b == w {
				return true
			}
		case *big.Float:
			if n, ok := v.(json.Number); ok {
				if f, _, err := big.ParseFloat(string(n), 10, 256, big.ToNearestEven); err == nil && f.Cmp(w) == 0 {
					return true
				}
			}
		}
	}
	return false
}

// describe lists the accepted values, for Explain.
func (r *claimRule) describe() string {
	parts := make([]string, 0, len(r.want))
	for _, w := range r.want {
		switch w := w.(type) {
		case string:
			parts = append(parts, fmt.Sprintf("%q (string)", w))
		case bool:
			parts = append(parts, fmt.Sprintf("%v (bool)", w))
		case *big.Float:
			parts = append(parts, w.Text('g', -1)+" (number)")
		}
	}
	return strings.Join(parts, " or ")
}

// match selects the route for a canonical request. When matching the path
// case-insensitively would choose another route than matching it exactly
// (/ADMIN against /admin and /, /PUBLIC/x against /public and /), the
// request is ambiguous: a case-insensitive upstream serves the one, a
// case-sensitive upstream the other, so neither is picked.
func (p *policy) match(rq *request) (r *route, ambiguous bool) {
	r = p.firstMatch(rq, rq.path, false)
	if p.foldRoutes || needsFold(rq.path) {
		if p.firstMatch(rq, foldCase(rq.path), true) != r {
			return nil, true
		}
	}
	return r, false
}

func (p *policy) firstMatch(rq *request, path string, folded bool) *route {
	for _, r := range p.routes {
		if r.matches(rq.host, path, rq.method, folded) {
			return r
		}
	}
	return nil
}

func (r *route) matches(host, path, method string, folded bool) bool {
	if r.host != "" {
		if wild, ok := strings.CutPrefix(r.host, "*"); ok {
			if !strings.HasSuffix(host, wild) || len(host) == len(wild) {
				return false
			}
		} else if host != r.host {
			return false
		}
	}
	exact, prefix := r.path, r.prefix
	if folded {
		exact, prefix = r.foldPath, r.foldPrefix
	}
	if exact != "" && path != exact {
		return false
	}
	if prefix != "" && path != prefix && !strings.HasPrefix(path, prefix+"/") {
		return false
	}
	if len(r.methods) > 0 {
		found := false
		for _, m := range r.methods {
			if m == method {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// missingScopes returns the route's scopes the token lacks. It allocates
// only when some are missing: it runs on every request.
func (r *route) missingScopes(c verify.Claims) []string {
	var missing []string
	for _, want := range r.scopes {
		if !c.HasScope(want) {
			missing = append(missing, want)
		}
	}
	return missing
}

// compileHeaders merges a route's headers over the top-level ones.
func compileHeaders(top, own map[string]*HeaderSource) ([]claimHeader, error) {
	merged := make(map[string]*HeaderSource, len(top)+len(own))
	for h, src := range top {
		merged[h] = src
	}
	for h, src := range own {
		merged[h] = src
	}
	out := make([]claimHeader, 0, len(merged))
	for h, src := range merged {
		ch := claimHeader{header: h, off: src == nil}
		switch {
		case src == nil:
		case src.CEL != "":
			e, err := compileCEL(src.CEL, nil)
			if err != nil {
				return nil, err
			}
			ch.expr = e
		default:
			ch.claims = src.Claims
		}
		out = append(out, ch)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].header < out[j].header })
	return out, nil
}
