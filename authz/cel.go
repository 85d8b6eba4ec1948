package authz

import (
	"encoding/json"
	"fmt"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/cost"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
	"cel.dev/cel-go/common/types/traits"
	"cel.dev/cel-go/interpreter"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/tokenauthz/tokenauthz/verify"
)

// celCostLimit bounds one expression's evaluation (CEL's runtime cost
// units: roughly one per operation, list element or string byte scanned), so
// no expression can burn a core on one request. Real policies cost tens.
const celCostLimit = 100_000

// celVariables are the names expressions see; each is resolved lazily per
// request (see celVars), so an expression pays only for what it reads.
var celVariables = []struct {
	name string
	t    *cel.Type
}{
	{"request.method", cel.StringType},
	{"request.path", cel.StringType},
	{"request.host", cel.StringType},
	{"request.scheme", cel.StringType},
	{"request.query", cel.MapType(cel.StringType, cel.StringType)},
	{"request.headers", cel.MapType(cel.StringType, cel.StringType)},
	{"request.source", cel.StringType},
	{"request.context", cel.MapType(cel.StringType, cel.StringType)},
	{"claims", cel.MapType(cel.StringType, cel.DynType)},
	{"userinfo", cel.MapType(cel.StringType, cel.DynType)},
	{"issuer", cel.StringType},
	{"tenant", cel.StringType},
	{"route", cel.StringType},
	{"scopes", cel.ListType(cel.StringType)},
}

// newCELEnv is the environment every policy expression compiles in.
func newCELEnv() (*cel.Env, error) {
	opts := []cel.EnvOption{cel.CustomTypeAdapter(celAdapter)}
	for _, v := range celVariables {
		opts = append(opts, cel.Variable(v.name, v.t))
	}
	return cel.NewEnv(opts...)
}

// celEnv is built once: building an environment takes milliseconds, and
// its programs are safe for concurrent use.
var celEnv = sync.OnceValues(newCELEnv)

// celExpr is one compiled expression with what Explain shows of it.
type celExpr struct {
	src  string
	prog cel.Program
	vars []string // the variables it reads, for Explain
	// dyn: its type is known only at run time (claims.sub): validate warns.
	dyn bool
}

// compileCEL compiles and type-checks src; want is the result type it must
// have (nil: any type a header can carry). Errors carry line and column.
func compileCEL(src string, want *cel.Type) (*celExpr, error) {
	env, err := celEnv()
	if err != nil {
		return nil, err
	}
	ast, iss := env.Compile(src)
	if iss.Err() != nil {
		return nil, fmt.Errorf("%s", strings.TrimSpace(iss.Err().Error()))
	}
	out := ast.OutputType()
	if want != nil && !out.IsExactType(want) && !out.IsExactType(cel.DynType) {
		return nil, fmt.Errorf("the expression is %s, not %s", out, want)
	}
	if want == nil && !headerType(out) {
		return nil, fmt.Errorf("the expression is %s; a header takes a string, number, bool or a list of them", out)
	}
	// An expression whose worst case is within the limit, on inputs as
	// large as a request can bring, runs without the per-evaluation cost
	// tracker (a quarter of a cheap expression's time); the others are
	// tracked and stopped at the limit.
	popts := []cel.ProgramOption{cel.EvalOptions(cel.OptOptimize)}
	if est, err := env.EstimateCost(ast, inputBounds{}); err != nil || est.Max > celCostLimit {
		popts = append(popts, cel.CostLimit(celCostLimit))
	}
	prog, err := env.Program(ast, popts...)
	if err != nil {
		return nil, err
	}
	e := &celExpr{src: src, prog: prog, dyn: want != nil && out.IsExactType(cel.DynType)}
	seen := map[string]bool{}
	for _, r := range ast.NativeRep().ReferenceMap() {
		if r.Name != "" && !seen[r.Name] {
			seen[r.Name] = true
			e.vars = append(e.vars, r.Name)
		}
	}
	sort.Strings(e.vars)
	return e, nil
}

// inputBounds sizes every variable, and anything reached through one, at
// the largest a request can bring: 64 KiB (the largest introspection or
// userinfo answer by default; a token is at most 8 KiB, Envoy's headers 60).
// A string has at most that many bytes, a list or map that many elements.
type inputBounds struct{}

const maxInputSize = 64 << 10

func (inputBounds) EstimateSize(cost.AstNode) *cost.SizeEstimate {
	return &cost.SizeEstimate{Min: 0, Max: maxInputSize}
}

func (inputBounds) EstimateCallCost(string, string, *cost.AstNode, []cost.AstNode) *cost.CallEstimate {
	return nil
}

func headerType(t *cel.Type) bool {
	switch {
	case t.IsExactType(cel.StringType), t.IsExactType(cel.IntType), t.IsExactType(cel.UintType),
		t.IsExactType(cel.DoubleType), t.IsExactType(cel.BoolType), t.IsExactType(cel.DynType):
		return true
	case t.Kind() == types.ListKind:
		return len(t.Parameters()) == 1 && headerType(t.Parameters()[0]) && t.Parameters()[0].Kind() != types.ListKind
	}
	return false
}

// eval runs e. A runtime error (a missing key, a wrong type, the cost limit)
// is returned, never taken as true.
func (e *celExpr) eval(vars *celVars) (ref.Val, error) {
	v, _, err := e.prog.Eval(vars)
	if err != nil {
		return nil, err
	}
	if types.IsError(v) {
		return nil, fmt.Errorf("%v", v)
	}
	return v, nil
}

// evalBool runs a condition.
func (e *celExpr) evalBool(vars *celVars) (bool, error) {
	v, err := e.eval(vars)
	if err != nil {
		return false, err
	}
	b, ok := v.(types.Bool)
	if !ok {
		return false, fmt.Errorf("the expression gave a %s, not a bool", v.Type().TypeName())
	}
	return bool(b), nil
}

// evalHeader runs a header expression and renders its value as a header:
// strings as they are, numbers and bools in their CEL form, lists
// comma-joined under the rules of array claims (an element that would read
// ambiguously makes the header not sent: "" with no error).
func (e *celExpr) evalHeader(vars *celVars) (string, error) {
	v, err := e.eval(vars)
	if err != nil {
		return "", err
	}
	var native any
	switch v := v.(type) {
	case types.String:
		return string(v), nil
	case types.Int:
		return strconv.FormatInt(int64(v), 10), nil
	case types.Uint:
		return strconv.FormatUint(uint64(v), 10), nil
	case types.Double:
		return strconv.FormatFloat(float64(v), 'g', -1, 64), nil
	case types.Bool:
		return strconv.FormatBool(bool(v)), nil
	case traits.Lister:
		var list []any
		for it := v.Iterator(); it.HasNext() == types.True; {
			el := it.Next()
			switch el := el.(type) {
			case types.Int, types.Uint, types.Double:
				list = append(list, json.Number(fmt.Sprint(el.Value())))
			default:
				list = append(list, el.Value())
			}
		}
		native = list
	default:
		return "", fmt.Errorf("the expression gave a %s; a header takes a string, number, bool or a list of them", v.Type().TypeName())
	}
	s, ok := verify.FormatClaim(native)
	if !ok {
		return "", nil
	}
	return s, nil
}

// celVars is the activation of one request: every variable is computed the
// first time an expression reads it and kept for the request's other
// expressions.
type celVars struct {
	rq     *request
	h      *authv3.AttributeContext_HttpRequest
	ctxExt map[string]string
	res    *verify.Result // nil on anonymous routes
	route  string

	vals [len(celVariableNames)]ref.Val
}

// celVariableNames index celVars.vals.
var celVariableNames = [...]string{"request.method", "request.path", "request.host", "request.scheme", "request.query",
	"request.headers", "request.source", "request.context", "claims", "userinfo", "issuer", "tenant", "route", "scopes"}

var celVarIndex = func() map[string]int {
	m := map[string]int{}
	for i, n := range celVariableNames {
		m[n] = i
	}
	return m
}()

var celAdapter = claimAdapter{types.DefaultTypeAdapter}

var _ interpreter.Activation = (*celVars)(nil)

func (a *celVars) Parent() interpreter.Activation { return nil }

// ResolveName returns each variable as a CEL value, built once per request
// and shared by the request's expressions.
func (a *celVars) ResolveName(name string) (any, bool) {
	i, ok := celVarIndex[name]
	if !ok {
		return nil, false
	}
	if v := a.vals[i]; v != nil {
		return v, true
	}
	v := a.resolve(name)
	a.vals[i] = v
	return v, true
}

func (a *celVars) resolve(name string) ref.Val {
	switch name {
	case "request.method":
		return types.String(a.rq.method)
	case "request.path":
		return types.String(a.rq.path)
	case "request.host":
		return types.String(a.rq.host)
	case "request.scheme":
		return types.String(a.rq.scheme)
	case "request.source":
		return types.String(a.rq.client)
	case "request.context":
		return types.NewStringStringMap(celAdapter, a.ctxExt)
	case "request.query":
		return types.NewStringStringMap(celAdapter, queryValues(a.rq.query))
	case "request.headers":
		return types.NewStringStringMap(celAdapter, requestHeaders(a.h))
	case "claims":
		if a.res == nil {
			return types.NewStringInterfaceMap(celAdapter, map[string]any{})
		}
		return types.NewStringInterfaceMap(celAdapter, a.res.Claims)
	case "userinfo":
		if a.res == nil || a.res.Userinfo == nil {
			return types.NewStringInterfaceMap(celAdapter, map[string]any{})
		}
		return types.NewStringInterfaceMap(celAdapter, a.res.Userinfo)
	case "issuer":
		if a.res == nil {
			return types.String("")
		}
		return types.String(a.res.Issuer.Name())
	case "tenant":
		if a.res == nil {
			return types.String("")
		}
		return types.String(a.res.Issuer.Tenant())
	case "route":
		return types.String(a.route)
	case "scopes":
		var scopes []string
		if a.res != nil {
			scopes = a.res.Claims.Scopes()
		}
		return types.NewStringList(celAdapter, scopes)
	}
	return types.NewErr("no variable %s", name)
}

// queryValues parses a raw query string for CEL: each name's value, plus
// the name as ASP.NET (case-insensitive) and PHP ("." and " " read as "_")
// would read it, so a condition sees what any upstream sees. Only routes
// whose CEL reads request.query get here, and their requests passed
// queryAmbiguity: every name is there once, under every reading.
func queryValues(q string) map[string]string {
	m := map[string]string{}
	for part := range strings.SplitSeq(q, "&") {
		if part == "" {
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		uk, err1 := url.QueryUnescape(k)
		uv, err2 := url.QueryUnescape(v)
		if err1 != nil || err2 != nil {
			continue
		}
		uv = strings.ToValidUTF8(uv, "\uFFFD")
		m[uk] = uv
		if loose := looseQueryName(uk); loose != uk {
			m[loose] = uv
		}
	}
	return m
}

// queryAmbiguity says why a query has no single reading ("" if it has
// one): a name given twice (also as ASP.NET and PHP read names: "Tenant"
// and "tenant", "a.b" and "a_b"), array-style names ("debug[]", which PHP
// and Rack read as "debug"), ";" separators (read by some servers and Go's
// older url.ParseQuery, not by others), and malformed percent-encoding.
// Upstreams disagree on which value counts in each case, so a condition on
// one value could be checked against another than the one served.
func queryAmbiguity(q string) string {
	if strings.IndexByte(q, ';') >= 0 {
		return "the query has a ; separator, which servers read differently"
	}
	var seen map[string]struct{}
	for part := range strings.SplitSeq(q, "&") {
		if part == "" {
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		uk, err1 := url.QueryUnescape(k)
		_, err2 := url.QueryUnescape(v)
		switch {
		case err1 != nil || err2 != nil:
			return "the query has a malformed percent-encoding"
		case !utf8.ValidString(uk) || strings.ContainsFunc(uk, func(r rune) bool { return r < 0x20 || r == 0x7f }):
			return "a query parameter's name is not UTF-8 text"
		case strings.ContainsAny(uk, "[]"):
			return "the query has an array-style parameter name ([ ])"
		}
		loose := looseQueryName(uk)
		if seen == nil {
			seen = map[string]struct{}{}
		}
		if _, dup := seen[loose]; dup {
			return "the query names a parameter more than once"
		}
		seen[loose] = struct{}{}
	}
	return ""
}

// looseQueryName is a parameter name as the most lenient common servers
// read it: case-insensitively (ASP.NET), with "." and " " as "_" (PHP).
func looseQueryName(k string) string {
	return strings.Map(func(r rune) rune {
		if r == '.' || r == ' ' {
			return '_'
		}
		return unicode.ToLower(r)
	}, k)
}

// requestHeaders are the request's headers by lower-case name, from either
// form Envoy sends. A repeated header is one value, its lines joined with
// "," in the order received (RFC 9110 §5.3, as Envoy joins them), so a
// condition comparing it with a single value is false. A name with "_" is
// also there with "-" (CGI-style servers read x_tenant as x-tenant);
// headerAmbiguity refused requests where both spellings came. Linear in
// the number of headers.
func requestHeaders(h *authv3.AttributeContext_HttpRequest) map[string]string {
	hm := h.GetHeaderMap().GetHeaders()
	m := make(map[string]string, len(h.GetHeaders())+len(hm))
	for k, v := range h.GetHeaders() {
		m[strings.ToLower(k)] = v
	}
	if len(hm) > 0 {
		lines := make(map[string][]string, len(hm))
		var order []string
		for k, v := range m {
			lines[k] = []string{v}
			order = append(order, k)
		}
		for _, hv := range hm {
			k := strings.ToLower(hv.GetKey())
			v := hv.GetValue()
			if raw := hv.GetRawValue(); len(raw) > 0 {
				v = strings.ToValidUTF8(string(raw), "\uFFFD")
			}
			if _, ok := lines[k]; !ok {
				order = append(order, k)
			}
			lines[k] = append(lines[k], v)
		}
		for _, k := range order {
			m[k] = strings.Join(lines[k], ",")
		}
	}
	for k, v := range m {
		if strings.IndexByte(k, '_') >= 0 {
			m[strings.ReplaceAll(k, "_", "-")] = v
		}
	}
	return m
}

// headerAmbiguity says why the request's headers have no single reading
// for CEL: two names that CGI-style servers read as one (x_tenant and
// x-tenant).
func headerAmbiguity(h *authv3.AttributeContext_HttpRequest) string {
	var names map[string]string // dashed → as sent, lower case
	see := func(k string) bool {
		k = strings.ToLower(k)
		d := strings.ReplaceAll(k, "_", "-")
		if names == nil {
			names = map[string]string{}
		}
		if prev, ok := names[d]; ok && prev != k {
			return false
		}
		names[d] = k
		return true
	}
	for k := range h.GetHeaders() {
		if !see(k) {
			return "the request has two headers that servers read as one (_ and -)"
		}
	}
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if !see(hv.GetKey()) {
			return "the request has two headers that servers read as one (_ and -)"
		}
	}
	return ""
}

// claimAdapter gives CEL the claims as decoded from JSON: numbers are
// json.Number (an integer when exact, else a double), objects and arrays
// adapted element by element as they are read.
type claimAdapter struct{ types.Adapter }

func (a claimAdapter) NativeToValue(v any) ref.Val {
	switch v := v.(type) {
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return types.Int(i)
		}
		f, err := v.Float64()
		if err != nil {
			return types.NewErr("claim number %s out of range", string(v))
		}
		return types.Double(f)
	case verify.Claims:
		return types.NewStringInterfaceMap(a, v)
	case map[string]any:
		return types.NewStringInterfaceMap(a, v)
	case []any:
		return types.NewDynamicList(a, v)
	}
	return a.Adapter.NativeToValue(v)
}

// describeVal renders a CEL value for Explain.
func describeVal(v any) string {
	if rv, ok := v.(ref.Val); ok {
		v = rv.Value()
	}
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	if len(b) > 200 {
		return string(b[:200]) + "…"
	}
	return string(b)
}
