package authz

import (
	"net/url"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
)

// credentials finds the bearer token of a request. Envoy sends headers either
// as a map (duplicates joined with ",") or, with encode_raw_headers, as a list;
// both are read. A request with more than one credential (two Authorization
// headers, or a header plus an access_token query parameter) is refused, as
// RFC 6750 §2 requires, so two components can never disagree on which token
// counts.
//
// query is the raw query string: ";" separates parameters there as "&"
// does for some servers, so "?a=1;access_token=x" counts as a credential.
//
// The scheme is Bearer (RFC 6750) or DPoP (RFC 9449), in any case; scheme
// says which, for the binding checks.
func credentials(h *authv3.AttributeContext_HttpRequest, query string, maxTokenBytes int) (token string, scheme string, d *decision) {
	var values []string
	if v, ok := h.GetHeaders()["authorization"]; ok {
		values = append(values, v)
	}
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if strings.EqualFold(hv.GetKey(), "authorization") {
			v := hv.GetValue()
			if raw := hv.GetRawValue(); len(raw) > 0 {
				v = string(raw)
			}
			values = append(values, v)
		}
	}
	n := len(values)
	for _, v := range values {
		n += strings.Count(v, ",")
	}
	if queryHasToken(query) {
		n++
	}
	switch {
	case n == 0:
		return "", "", denyMissing()
	case n > 1:
		return "", "", denyRequest("multiple_credentials", "the request carries more than one credential")
	case len(values) == 0:
		// Only a query-string token: RFC 6750 §2.3 discourages it (it lands in
		// logs and Referer headers), so it is not accepted.
		return "", "", denyRequest("query_token", "tokens in the query string are not accepted; use the Authorization header")
	}
	sch, rest, _ := strings.Cut(values[0], " ")
	switch {
	case strings.EqualFold(sch, "Bearer"):
		scheme = schemeBearer
	case strings.EqualFold(sch, "DPoP"):
		scheme = schemeDPoP
	default:
		// Another scheme (Basic, …) is no bearer token at all.
		return "", "", denyMissing()
	}
	tok := strings.TrimLeft(rest, " ")
	if len(tok) > maxTokenBytes {
		// Refused before any parsing or hashing.
		return "", "", denyInvalid("token_too_large", "token is too large")
	}
	// The b64token syntax (isToken68) is checked by the verifier on a
	// cache miss (verify.Policy.Syntax): a token it recognises passed it.
	if tok == "" {
		return "", "", denyInvalid("malformed", "the Authorization header is not a bearer token")
	}
	return tok, scheme, nil
}

// Authorization schemes a token may come with.
const (
	schemeBearer = "Bearer"
	schemeDPoP   = "DPoP"
)

// singleHeader reads a header that must appear at most once (Envoy joins
// repeats with ","; with encode_raw_headers they are separate entries).
func singleHeader(h *authv3.AttributeContext_HttpRequest, name string) (v string, n int) {
	if hv, ok := h.GetHeaders()[name]; ok {
		v, n = hv, 1+strings.Count(hv, ",")
	}
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if strings.EqualFold(hv.GetKey(), name) {
			v = hv.GetValue()
			if raw := hv.GetRawValue(); len(raw) > 0 {
				v = string(raw)
			}
			n += 1 + strings.Count(v, ",")
		}
	}
	return v, n
}

func queryHasToken(q string) bool {
	for part := range strings.FieldsFuncSeq(q, func(r rune) bool { return r == '&' || r == ';' }) {
		k, _, _ := strings.Cut(part, "=")
		if k == "access_token" {
			return true
		}
		if uk, err := url.QueryUnescape(k); err == nil && uk == "access_token" {
			return true
		}
	}
	return false
}

// token68 marks RFC 6750's b64token characters: ALPHA DIGIT - . _ ~ + /.
// One table load a byte: a chain of comparisons was 2% of the CPU of a check
// of a new token.
var token68 = func() (t [256]bool) {
	for c := range 256 {
		t[c] = 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._~+/", byte(c)) >= 0
	}
	return t
}()

// isToken68 checks RFC 6750's b64token: b64token characters, then "=" padding.
func isToken68(s string) bool {
	i := 0
	for i < len(s) && token68[s[i]] {
		i++
	}
	if i == 0 {
		return false
	}
	for ; i < len(s); i++ {
		if s[i] != '=' {
			return false
		}
	}
	return true
}
