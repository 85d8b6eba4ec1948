package verify

import (
	"encoding/json"
	"math"
	"math/big"
	"strconv"
	"strings"
	"time"
)

// Claims are a token's claims as decoded from JSON: numbers are json.Number,
// arrays []any, objects map[string]any.
type Claims map[string]any

// Namespaces are claim-path prefixes that name a source other than the
// token ("userinfo.email" is the userinfo endpoint's email). A token's own
// claims are never consulted for them, so a token cannot forge a claim the
// route expects from elsewhere by carrying a "userinfo" claim.
var Namespaces = []string{"userinfo"}

// namespaced reports whether path starts with a namespace, and splits it.
func namespaced(path string) (ns, rest string, ok bool) {
	for _, n := range Namespaces {
		if path == n {
			return n, "", true
		}
		if len(path) > len(n) && path[len(n)] == '.' && path[:len(n)] == n {
			return n, path[len(n)+1:], true
		}
	}
	return "", "", false
}

// Lookup finds a claim by a dotted path ("realm_access.roles"). A top-level
// claim whose name itself contains dots is found first. A path in one of
// the Namespaces is never found in a token's claims.
func (c Claims) Lookup(path string) (any, bool) {
	if _, _, ok := namespaced(path); ok {
		return nil, false
	}
	return c.lookup(path)
}

func (c Claims) lookup(path string) (any, bool) {
	if v, ok := c[path]; ok {
		return v, true
	}
	var cur any = map[string]any(c)
	for part := range strings.SplitSeq(path, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[part]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// String returns a string claim, "" if absent or not a string.
func (c Claims) String(name string) string {
	s, _ := c[name].(string)
	return s
}

// Scalar is a claim of any JSON scalar type as text, for matching claims
// against operator input (revocation by jti or sub): a string as it is, a
// number in its shortest exact decimal form ("123" for 123, 123.0 and
// 1.23e2), true or false. Objects, arrays and null are not scalars ("").
func (c Claims) Scalar(name string) string {
	switch v := c[name].(type) {
	case string:
		return v
	case bool:
		return strconv.FormatBool(v)
	case json.Number:
		r, ok := new(big.Rat).SetString(string(v))
		if !ok {
			return string(v)
		}
		if r.IsInt() {
			return r.Num().String()
		}
		f, _ := r.Float64()
		return strconv.FormatFloat(f, 'g', -1, 64)
	}
	return ""
}

// Scopes returns the token's scopes from a space-delimited "scope" string
// and/or an "scp" claim (array of strings, or a space-delimited string).
func (c Claims) Scopes() []string {
	var out []string
	add := func(v any) {
		switch v := v.(type) {
		case string:
			out = append(out, strings.Fields(v)...)
		case []any:
			for _, e := range v {
				if s, ok := e.(string); ok && s != "" {
					out = append(out, s)
				}
			}
		}
	}
	add(c["scope"])
	add(c["scp"])
	return out
}

// Time reads an RFC 7519 NumericDate claim (exp, nbf, iat); ok is false
// when it is absent or not a valid date.
func (c Claims) Time(name string) (time.Time, bool) {
	t, ok, err := numericDate(c, name)
	return t, ok && err == nil
}

// HasScope reports whether the token grants scope, by "scope" or "scp",
// without building the list (it runs on every request).
func (c Claims) HasScope(scope string) bool {
	has := func(v any) bool {
		switch v := v.(type) {
		case string:
			for f := range strings.FieldsSeq(v) {
				if f == scope {
					return true
				}
			}
		case []any:
			for _, e := range v {
				if s, ok := e.(string); ok && s == scope && s != "" {
					return true
				}
			}
		}
		return false
	}
	return has(c["scope"]) || has(c["scp"])
}

// numericDate reads an RFC 7519 NumericDate. Only JSON numbers count: jwx and
// others also take strings, which a signer never meant as a date. Values
// outside 0..year 9999 are rejected rather than overflowing.
func numericDate(c Claims, name string) (time.Time, bool, error) {
	v, ok := c[name]
	if !ok {
		return time.Time{}, false, nil
	}
	n, isNum := v.(json.Number)
	if !isNum {
		return time.Time{}, true, invalid("malformed", name+" is not a number")
	}
	f, err := strconv.ParseFloat(string(n), 64)
	if err != nil || math.IsNaN(f) || f < 0 || f > 253402300799 {
		return time.Time{}, true, invalid("malformed", name+" is out of range")
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), true, nil
}

// FormatClaim renders a claim value for an HTTP header: strings as they are,
// numbers in their JSON form, booleans as true/false, arrays comma-joined and
// objects as compact JSON. ok is false for null and for values that cannot be
// rendered unambiguously: an array is a comma-separated list only when no
// element could split or merge in an RFC 9110 list parser, so
// ["dev,admin","ops"] (which would read as three groups) is not rendered.
func FormatClaim(v any) (string, bool) {
	switch v := v.(type) {
	case string:
		return v, true
	case json.Number:
		return string(v), true
	case bool:
		return strconv.FormatBool(v), true
	case []any:
		parts := make([]string, 0, len(v))
		for _, e := range v {
			s, ok := listElement(e)
			if !ok {
				return "", false
			}
			parts = append(parts, s)
		}
		return strings.Join(parts, ","), true
	case map[string]any:
		b, err := json.Marshal(v)
		if err != nil {
			return "", false
		}
		return string(b), true
	}
	return "", false
}

// Lookup finds a claim of the result: "userinfo.<path>" in the userinfo
// endpoint's answer (absent when it was not fetched), anything else in the
// token's claims (or the introspection answer).
//
// "tenant" reads the issuer template's {tenant} for a tenant's token (what
// its verified iss says, not a claim of that name).
func (r *Result) Lookup(path string) (any, bool) {
	if path == "tenant" && r.Issuer != nil && r.Issuer.tenant != "" {
		return r.Issuer.tenant, true
	}
	ns, rest, ok := namespaced(path)
	if !ok {
		return r.Claims.lookup(path)
	}
	switch ns {
	case "userinfo":
		if r.Userinfo == nil {
			return nil, false
		}
		if rest == "" {
			return map[string]any(r.Userinfo), true
		}
		return r.Userinfo.lookup(rest)
	}
	return nil, false
}

// listElement renders one element of an array claim for a comma-separated
// header, or refuses it: nested arrays and objects, empty strings, and
// strings with a comma, a double quote (an RFC 9110 quoted-string) or
// leading or trailing whitespace (list parsers trim it).
func listElement(e any) (string, bool) {
	switch e := e.(type) {
	case string:
		if e == "" || strings.ContainsAny(e, ",\"") || strings.TrimSpace(e) != e {
			return "", false
		}
		return e, true
	case json.Number, bool:
		return FormatClaim(e)
	}
	return "", false
}
