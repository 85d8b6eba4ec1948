package authz

import (
	"encoding/json"
	"fmt"
	"maps"
	"math/big"
	"slices"
	"sort"
	"strings"

	"golang.org/x/text/unicode/norm"

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
	slashRoutes   bool // some exact path pattern ends in "/"
	// claimHeaders are the names of every header any route sets, for
	// removing CGI-style spellings (x_user_id) of them.
	claimHeaders map[string]bool
	// otherHeaders are, by route, the claim headers other routes set and
	// it does not: removed on its allows too, so a client's copy of a
	// header some route sets never reaches an upstream.
	otherHeaders map[*route][]string
	// hosts and wildHosts are the host policies by exact host and by the
	// suffix of a "*." pattern (".example.com").
	hosts, wildHosts map[string]*CompiledHostPolicy
	clientHeader     string
	schemeHeader     string
	grpcErrors       bool                       // undecidable checks answer a gRPC UNAVAILABLE status
	certHeader       string                     // "" for the peer certificate
	issuerMeta       map[string]*structpb.Value // issuer name → metadata value
	meta             struct{ route, issuer, sub, scope bool }
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
	// The same under each of pathReadings, for the ambiguity check in match.
	readPats  [len(pathReadings)]struct{ path, prefix string }
	methods   []string
	anonymous bool
	// allowMissing: no token is an allow without identity; a bad one a 401.
	allowMissing bool
	dryRun       bool // mode: dry_run
	sender       senderMode
	metaName     *structpb.Value // the name as dynamic metadata, shared by responses
	vpol         verify.Policy   // what the token must pass in verify
	scopes       []string
	claims       []claimRule
	when         []whenRule
	headers      []claimHeader // sorted by name: the top-level ones with the route's merged over them
	// The route's CEL reads the query or the headers: requests whose
	// query or headers have no single reading are refused (400).
	readsQuery, readsHeaders bool
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
	}
	for _, is := range c.AllIssuers() {
		p.issuerMeta[is.Name] = structpb.NewStringValue(is.Name)
	}
	for _, rc := range c.Routes {
		r, err := compileRoute(rc, rc.Name, allIssuers, c.Headers)
		if err != nil {
			return nil, err
		}
		p.routes = append(p.routes, r)
		p.byName[r.name] = r
	}
	p.hosts, p.wildHosts = map[string]*CompiledHostPolicy{}, map[string]*CompiledHostPolicy{}
	for _, hp := range c.Hosts {
		for _, r := range hp.routes {
			p.byName[r.name] = r
		}
		for _, h := range hp.hosts {
			if suffix, wild := strings.CutPrefix(h, "*"); wild {
				p.wildHosts[suffix] = hp
			} else {
				p.hosts[h] = hp
			}
		}
	}
	for _, r := range p.allRoutes() {
		if needsFold(r.path) || needsFold(r.prefix) {
			p.foldRoutes = true
		}
		if len(r.path) > 1 && strings.HasSuffix(r.path, "/") {
			p.slashRoutes = true
		}
	}
	p.claimHeaders = map[string]bool{}
	routes := p.allRoutes()
	for _, r := range routes {
		for i := range r.headers {
			p.claimHeaders[r.headers[i].header] = true
		}
	}
	// Routes are shared with later policies (a host policy compiles once),
	// so what depends on every route lives here, not in the route.
	all := slices.Sorted(maps.Keys(p.claimHeaders))
	p.otherHeaders = make(map[*route][]string, len(routes))
	for _, r := range routes {
		var others []string
		for _, h := range all {
			if !r.isClaimHeader(h) {
				others = append(others, h)
			}
		}
		p.otherHeaders[r] = slices.Clip(others) // shared: an append must copy
	}
	return p, nil
}

// compileRoute compiles one route; name is its name in the policy
// (unique), defaultIssuers what it accepts unless it names its own.
func compileRoute(rc RouteConfig, name string, defaultIssuers []string, topHeaders map[string]*HeaderSource) (*route, error) {
	path, _, _ := canonicalPath(rc.Match.Path)
	prefix, _, _ := canonicalPath(rc.Match.PathPrefix)
	r := &route{
		name: name, host: strings.ToLower(strings.TrimSuffix(rc.Match.Host, ".")), path: path,
		prefix: strings.TrimSuffix(prefix, "/"), methods: withHEAD(rc.Match.Methods),
		anonymous: rc.Anonymous, allowMissing: rc.AllowMissing, dryRun: rc.Mode == "dry_run", sender: senderModes[rc.SenderConstraint], scopes: rc.Scopes, metaName: structpb.NewStringValue(name),
		vpol: verify.Policy{Issuers: rc.Issuers, Introspect: introspectModes[rc.Introspect], Userinfo: rc.Userinfo},
	}
	if len(r.vpol.Issuers) == 0 {
		r.vpol.Issuers = defaultIssuers
	}
	r.vpol.Index()
	// The prefix "/" becomes "" and matches every path.
	for k, rd := range pathReadings {
		r.readPats[k].path, r.readPats[k].prefix = rd.fn(r.path), rd.fn(r.prefix)
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
	var err error
	if r.headers, err = compileHeaders(topHeaders, rc.Headers); err != nil {
		return nil, err
	}
	for _, w := range r.when {
		r.notesInputs(w.expr)
	}
	for i := range r.headers {
		if e := r.headers[i].expr; e != nil {
			r.notesInputs(e)
		}
	}
	return r, nil
}

// notesInputs records which request inputs with several readings e reads.
func (r *route) notesInputs(e *celExpr) {
	for _, v := range e.vars {
		switch v {
		case "request.query":
			r.readsQuery = true
		case "request.headers":
			r.readsHeaders = true
		}
	}
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

// pathReading is one way a common upstream reads a path differently from
// its exact bytes. Route patterns are read the same way, so a reading
// selects the route that upstream would serve.
type pathReading struct {
	what   string // for the 400's description
	reason string
	fn     func(string) string
}

var pathReadings = [...]pathReading{
	{"Unicode case folding", "ambiguous_case", foldCase},
	{"Java's equalsIgnoreCase", "ambiguous_case", javaFold},
	{"NFKC normalization", "ambiguous_unicode", norm.NFKC.String},
	{"NFKC normalization with case folding", "ambiguous_unicode", func(s string) string { return foldCase(norm.NFKC.String(s)) }},
	{"NFKC normalization with Java's case folding", "ambiguous_unicode", func(s string) string { return javaFold(norm.NFKC.String(s)) }},
}

// withHEAD adds HEAD to a methods list with GET: every HTTP server answers
// HEAD with its GET handler, so HEAD must be checked as the GET route is.
func withHEAD(methods []string) []string {
	if !slices.Contains(methods, "GET") || slices.Contains(methods, "HEAD") {
		return methods
	}
	return append(slices.Clip(methods), "HEAD")
}

// ambiguity says why a request has no single route: another common reading
// of its path selects another one.
type ambiguity struct{ reason, desc string }

// match selects the route for a canonical request. The route must be the
// one every common reading of the path selects: the exact bytes, the path
// with its trailing slash stripped (frameworks that serve /admin for
// /admin/), Unicode and Java case-insensitive matching, NFKC normalization.
// When any reading selects another route, the request is ambiguous (400):
// an upstream reading it that way would serve a route whose policy was not
// checked. The readings run only when they can differ: a path with upper
// case or non-ASCII letters (or routes with them), or a trailing slash.
func (p *policy) match(rq *request) (*route, *ambiguity) {
	path := rq.path
	extra := p.hostRoutes(rq.host)
	r := p.firstMatch(rq, path, -1, false, extra)
	// The trailing-slash reading: the path and the exact patterns both
	// without a trailing slash (a framework that strips it serves a
	// "/admin/" route for /admin and an "/admin" route for /admin/).
	strip := len(path) > 1 && path[len(path)-1] == '/' || p.slashRoutes
	if strip && p.firstMatch(rq, stripSlash(path), -1, true, extra) != r {
		return nil, &ambiguity{"ambiguous_path", "the path without its trailing slash selects a different policy"}
	}
	if !p.foldRoutes && !needsFold(path) {
		return r, nil
	}
	for k := range pathReadings {
		rd := &pathReadings[k]
		read := rd.fn(path)
		if p.firstMatch(rq, read, k, false, extra) != r || strip && p.firstMatch(rq, stripSlash(read), k, true, extra) != r {
			return nil, &ambiguity{rd.reason, "the path read with " + rd.what + " selects a different policy"}
		}
	}
	return r, nil
}

func stripSlash(p string) string {
	if len(p) > 1 {
		return strings.TrimSuffix(p, "/")
	}
	return p
}

// firstMatch is the first route matching path as read by pathReadings[k]
// (k < 0: as it is; stripped: exact patterns without a trailing slash):
// the file's routes first, then extra (the routes of the host's policy).
func (p *policy) firstMatch(rq *request, path string, k int, stripped bool, extra []*route) *route {
	for _, r := range p.routes {
		if r.matches(rq.host, path, rq.method, k, stripped) {
			return r
		}
	}
	for _, r := range extra {
		if r.matches(rq.host, path, rq.method, k, stripped) {
			return r
		}
	}
	return nil
}

func (r *route) matches(host, path, method string, k int, stripped bool) bool {
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
	if k >= 0 {
		exact, prefix = r.readPats[k].path, r.readPats[k].prefix
	}
	if stripped {
		exact = stripSlash(exact)
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
