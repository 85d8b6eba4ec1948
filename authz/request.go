package authz

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"net/netip"
	"strings"
	"unicode"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"golang.org/x/text/unicode/norm"

	"github.com/tokenauthz/tokenauthz/verify"
)

// request is the one canonical view of an HTTP request that route matching,
// policy and every later step see. A request that has no unambiguous
// canonical form is refused before any of them runs: an upstream (Tomcat,
// nginx, IIS, …) could read it as a different resource than the one the
// policy was checked against.
type request struct {
	method string // HTTP token, upper case
	host   string // lower case, no port, no trailing dot; "" when none was sent
	port   string // the authority's port, "" when none (for DPoP's htu)
	path   string // percent-decoded, no query; starts with "/"
	query  string // the raw query string, without "?"
	scheme string
	client string // the client's address, for fair shares of provider calls
}

// pseudo reads a pseudo-header (or any header) from either form Envoy sends.
// With encode_raw_headers the header_map's raw bytes are the request's own
// and win over the string fields, which Envoy sanitizes ("!" for non-UTF-8).
func pseudo(h *authv3.AttributeContext_HttpRequest, key, field string) string {
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if hv.GetKey() == key {
			if raw := hv.GetRawValue(); len(raw) > 0 {
				return string(raw)
			}
			return hv.GetValue()
		}
	}
	if field != "" {
		return field
	}
	return h.GetHeaders()[key]
}

// canonicalRequest builds the canonical request or the 400 that refuses it.
func canonicalRequest(h *authv3.AttributeContext_HttpRequest) (request, *decision) {
	var r request
	var why string
	if r.method, why = canonicalMethod(pseudo(h, ":method", h.GetMethod())); why != "" {
		return r, denyRequest("bad_method", why)
	}
	authority := pseudo(h, ":authority", h.GetHost())
	if r.host, why = canonicalHost(authority); why != "" {
		return r, denyRequest("bad_host", why)
	}
	if i := strings.LastIndexByte(authority, ':'); i >= 0 && !strings.HasSuffix(authority, "]") {
		r.port = authority[i+1:] // canonicalHost checked it is digits
	}
	if r.path, r.query, why = canonicalPath(pseudo(h, ":path", h.GetPath())); why != "" {
		return r, denyRequest("bad_path", why)
	}
	r.scheme = strings.ToLower(pseudo(h, ":scheme", h.GetScheme()))
	return r, nil
}

// canonicalMethod accepts an RFC 9110 token in upper case. Methods are case
// sensitive, but some servers upper-case them, so "post" could be POST
// upstream while a route restricted to POST would not match it.
//
// No method at all (Envoy always sends one; hand-built requests may not)
// matches only routes without a methods list.
func canonicalMethod(m string) (string, string) {
	for i := 0; i < len(m); i++ {
		c := m[i]
		switch {
		case 'a' <= c && c <= 'z':
			return "", "the method must be upper case"
		case !isTchar(c):
			return "", "the method is not an HTTP token"
		}
	}
	return m, ""
}

func isTchar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// canonicalHost lower-cases the authority, drops the port and one trailing
// dot ("admin.example.com." names admin.example.com), and refuses anything
// that is not a plain DNS name or IP literal: user info, whitespace,
// percent-encoding, empty labels, non-ASCII (IDNs arrive as punycode).
func canonicalHost(a string) (string, string) {
	if a == "" {
		return "", ""
	}
	host, port := a, ""
	if strings.HasPrefix(a, "[") {
		end := strings.IndexByte(a, ']')
		if end < 0 {
			return "", "the host is not a valid IP literal"
		}
		host, port = a[:end+1], a[end+1:]
		addr, err := netip.ParseAddr(host[1 : len(host)-1])
		if err != nil || !addr.Is6() || addr.Zone() != "" {
			return "", "the host is not a valid IP literal"
		}
		host = "[" + addr.String() + "]"
	} else if i := strings.LastIndexByte(a, ':'); i >= 0 {
		host, port = a[:i], a[i:]
	}
	if port != "" {
		digits := strings.TrimPrefix(port, ":")
		if digits == port || digits == "" || len(digits) > 5 || strings.Trim(digits, "0123456789") != "" {
			return "", "the host's port is not a number"
		}
	}
	if strings.HasPrefix(host, "[") {
		return host, ""
	}
	host = strings.TrimSuffix(host, ".")
	if host == "" {
		return "", "the host is empty"
	}
	if host[len(host)-1] == '.' {
		return "", "the host has an empty label"
	}
	lower := true
	for i := 0; i < len(host); i++ {
		c := host[i]
		switch {
		case 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_':
		case 'A' <= c && c <= 'Z':
			lower = false
		case c == '.':
			if i == 0 || host[i-1] == '.' {
				return "", "the host has an empty label"
			}
		default:
			return "", "the host has characters a DNS name cannot have"
		}
	}
	if !lower {
		host = strings.ToLower(host)
	}
	return host, ""
}

// canonicalPath splits the request target into the decoded path and the raw
// query, or says why the path has no single meaning. The rules, each a
// place where common upstreams disagree:
//   - ";" in any segment, raw or encoded: path parameters (Tomcat, Jetty and
//     Spring drop ";…" from a segment, so "/public/..;/admin" is /admin).
//   - "." and ".." segments in any spelling (".%2e", "%2e%2e"), after decoding.
//   - encoded "/", "\" and "%" (double encoding: "%252e" decodes twice to
//     "." in some stacks), and a raw "\" (IIS and Windows read it as "/").
//   - empty segments ("//"): nginx and Envoy merge them, others do not. One
//     trailing "/" is ordinary and allowed.
//   - a segment ending in "." or " ": Windows and IIS strip them.
//   - control characters, spaces and characters outside RFC 3986's pchar,
//     raw or encoded; raw non-ASCII bytes; percent-encoded bytes that are not
//     UTF-8; non-ASCII characters whose compatibility form (NFKC, the
//     "best fit" mapping) holds a separator, dot or control character.
//
// The path it returns is percent-decoded: "/%61dmin" is /admin, as every
// upstream reads it. It allocates only when the path holds a "%".
func canonicalPath(target string) (path, query, why string) {
	path = target
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path, query = path[:i], path[i+1:]
	}
	if path == "" || path[0] != '/' {
		return "", "", "the path must start with /"
	}
	var dec []byte // the decoded path, once a "%" is seen
	nonASCII := false
	for i := 0; i < len(path); i++ {
		c := path[i]
		if c == '%' {
			if i+2 >= len(path) || !isHex(path[i+1]) || !isHex(path[i+2]) {
				return "", "", "the path has a malformed percent-encoding"
			}
			b := unhex(path[i+1])<<4 | unhex(path[i+2])
			switch {
			case b == '/' || b == '\\':
				return "", "", "the path has an encoded / or \\"
			case b == '%':
				return "", "", "the path is encoded twice (%25)"
			case b == ';':
				return "", "", "the path has path parameters (;)"
			case b < 0x20 || b == 0x7f:
				return "", "", "the path has control characters"
			case b >= 0x80:
				nonASCII = true
			}
			if dec == nil {
				dec = make([]byte, 0, len(path))
				dec = append(dec, path[:i]...)
			}
			dec = append(dec, b)
			i += 2
			continue
		}
		switch {
		case c == ';':
			return "", "", "the path has path parameters (;)"
		case c == '\\':
			return "", "", "the path has a \\"
		case c <= 0x20 || c == 0x7f:
			return "", "", "the path has control characters or spaces"
		case c >= 0x80:
			return "", "", "the path has raw non-ASCII bytes (percent-encode UTF-8)"
		case c != '/' && !isPchar(c):
			return "", "", "the path has characters RFC 3986 does not allow"
		}
		if dec != nil {
			dec = append(dec, c)
		}
	}
	if dec != nil {
		path = string(dec)
	}
	if nonASCII {
		if !utf8.ValidString(path) {
			return "", "", "the path's percent-encoded bytes are not UTF-8"
		}
		if confusable(path) {
			return "", "", "the path has characters that normalize to separators, dots or controls"
		}
	}
	rest := path[1:]
	for rest != "" {
		seg, after, more := strings.Cut(rest, "/")
		switch {
		case seg == "" && more:
			return "", "", "the path has an empty segment (//)"
		case seg == "." || seg == "..":
			return "", "", "the path has a dot segment"
		case seg != "" && (seg[len(seg)-1] == '.' || seg[len(seg)-1] == ' '):
			return "", "", "a path segment ends in a dot or a space"
		}
		rest = after
	}
	return path, query, ""
}

// isPchar: RFC 3986 unreserved, sub-delims (";" is refused above) and ":" "@".
func isPchar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
		strings.IndexByte("-._~!$&'()*+,=:@", c) >= 0
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

// confusable reports non-ASCII characters that stacks mapping Unicode to
// ASCII (IIS "best fit", NFKC normalizers) would turn into path syntax:
// FULLWIDTH SOLIDUS into "/", ONE DOT LEADER into ".", and so on.
func confusable(path string) bool {
	for _, r := range path {
		if r < utf8.RuneSelf {
			continue
		}
		if unicode.IsControl(r) || unicode.Is(unicode.Cf, r) && r != '\u200d' {
			return true
		}
		n := norm.NFKC.String(string(r))
		if strings.ContainsAny(n, "/\\.;%?#") || strings.IndexFunc(n, func(c rune) bool { return c < 0x20 || c == 0x7f }) >= 0 {
			return true
		}
	}
	return false
}

// foldCase maps each rune to one representative of its Unicode case-folding
// orbit, so two strings fold equal when a case-insensitive upstream (IIS,
// ASP.NET, Spring with case-insensitive matching) would treat them as the
// same path: "/ADMIN", "/admin" and "/\u212Admin" (KELVIN SIGN) all fold
// alike.
func foldCase(s string) string {
	return strings.Map(func(r rune) rune {
		rep := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			rep = min(rep, f)
		}
		return rep
	}, s)
}

// javaFold maps each rune as Java's String.equalsIgnoreCase compares it
// (upper case, then lower case, rune by rune): it reads DOTLESS I as "i"
// and CAPITAL I WITH DOT ABOVE as "i", which Unicode case folding does not.
func javaFold(s string) string {
	return strings.Map(func(r rune) rune { return unicode.ToLower(unicode.ToUpper(r)) }, s)
}

// needsFold reports whether s could fold differently than it compares: any
// upper-case ASCII letter or non-ASCII rune.
func needsFold(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; 'A' <= c && c <= 'Z' || c >= utf8.RuneSelf {
			return true
		}
	}
	return false
}

// headerList is every value of header name, joined with "," in the order
// received: what Envoy's headers map holds for a repeated header, built
// from the raw header_map entries when Envoy sends those. A decision read
// from it is the same whichever form Envoy used (RFC 9110 §5.3: repeated
// field lines are one comma-separated list). Linear in the header count.
func headerList(h *authv3.AttributeContext_HttpRequest, name string) (string, bool) {
	var b []byte
	n := 0
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if !strings.EqualFold(hv.GetKey(), name) {
			continue
		}
		v := hv.GetRawValue()
		if len(v) == 0 {
			v = []byte(hv.GetValue())
		}
		if n > 0 {
			b = append(b, ',')
		}
		b = append(b, v...)
		n++
	}
	if n > 0 {
		return string(b), true
	}
	v, ok := h.GetHeaders()[name]
	return v, ok
}

// lastListElement is the entry the nearest proxy added to a list header
// (X-Forwarded-For, X-Forwarded-Proto, X-Real-IP): proxies append, so
// everything before the last comma came from further away, possibly from
// the client.
func lastListElement(v string) string {
	if i := strings.LastIndexByte(v, ','); i >= 0 {
		v = v[i+1:]
	}
	return strings.TrimSpace(v)
}

// clientAddress is the requester's address: the last entry of the
// configured header (the one the nearest trusted proxy added; repeated
// headers count as one list) or Envoy's source address. The entry must be
// an IP address, with or without a port; anything else is refused (ok
// false), since a trusted proxy never writes one. IPv4-mapped IPv6
// addresses read as IPv4.
func clientAddress(req *authv3.CheckRequest, header string) (addr string, ok bool) {
	if header != "" {
		if v, present := headerList(req.GetAttributes().GetRequest().GetHttp(), header); present {
			a, ok := parseClientAddr(lastListElement(v))
			if !ok {
				return "", false
			}
			return a.String(), true
		}
	}
	// Envoy writes its peer's address canonically: taken as it is (a pipe
	// or an unnamed peer is charged as it is named).
	return req.GetAttributes().GetSource().GetAddress().GetSocketAddress().GetAddress(), true
}

// parseClientAddr reads "1.2.3.4", "1.2.3.4:80", "::1", "[::1]" or
// "[::1]:80", without a zone.
func parseClientAddr(s string) (netip.Addr, bool) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap().WithZone(""), true
	}
	if inner, ok := strings.CutPrefix(s, "["); ok {
		if s, ok = strings.CutSuffix(inner, "]"); !ok {
			return netip.Addr{}, false
		}
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap().WithZone(""), true
}

// xfccThumbprint reads the certificate of the last element of an Envoy
// x-forwarded-client-cert header (the one the nearest, trusted, proxy
// appended) as base64url for x5t#S256: from its Cert= (URL-encoded PEM), or
// its Hash= (hex SHA-256 of the DER); when both are there they must agree.
// The whole header must parse by Envoy's grammar: the elements before the
// last are the client's, and one that does not parse could hide where the
// trusted element starts. So anything malformed is an error, never a guess.
func xfccThumbprint(v string) (string, error) {
	if v == "" {
		return "", errors.New("the request has no client certificate")
	}
	elems, err := parseXFCC(v)
	if err != nil {
		return "", err
	}
	last := elems[len(elems)-1]
	var fromHash, fromCert string
	if hash, ok := last["hash"]; ok {
		sum, err := hex.DecodeString(hash)
		if err != nil || len(sum) != sha256.Size {
			return "", errors.New("the forwarded client certificate's Hash is not a hex SHA-256")
		}
		fromHash = base64.RawURLEncoding.EncodeToString(sum)
	}
	if cert, ok := last["cert"]; ok {
		if fromCert, err = verify.CertificateThumbprint(cert); err != nil {
			return "", errors.New("the forwarded client certificate's Cert: " + err.Error())
		}
	}
	switch {
	case fromCert != "" && fromHash != "" && fromCert != fromHash:
		return "", errors.New("the forwarded client certificate's Cert and Hash disagree")
	case fromCert != "":
		return fromCert, nil
	case fromHash != "":
		return fromHash, nil
	}
	return "", errors.New("the forwarded client certificate has no Cert or Hash")
}

// errXFCC is every grammar error: the header is refused as a whole.
var errXFCC = errors.New("the x-forwarded-client-cert header is malformed")

// parseXFCC parses an x-forwarded-client-cert value as Envoy writes it:
// elements separated by commas, key=value pairs by semicolons, both
// outside double quotes; a value holding , ; = or " is quoted, with \" and
// \\ as its only escapes. Keys are case-insensitive (returned lower case);
// By, Hash, Cert, Chain and Subject appear at most once an element (URI and
// DNS may repeat: the last is kept). Optional whitespace around separators
// is allowed; anything else that does not fit is errXFCC.
func parseXFCC(v string) ([]map[string]string, error) {
	var elems []map[string]string
	cur := map[string]string{}
	i := 0
	skipOWS := func() {
		for i < len(v) && (v[i] == ' ' || v[i] == '\t') {
			i++
		}
	}
	for {
		skipOWS()
		ks := i
		for i < len(v) && isXFCCKeyChar(v[i]) {
			i++
		}
		key := strings.ToLower(v[ks:i])
		if key == "" || i >= len(v) || v[i] != '=' {
			return nil, errXFCC
		}
		i++
		var val []byte
		if i < len(v) && v[i] == '"' {
			i++
			closed := false
			for i < len(v) && !closed {
				switch c := v[i]; {
				case c == '\\':
					if i+1 >= len(v) || v[i+1] != '"' && v[i+1] != '\\' {
						return nil, errXFCC
					}
					val = append(val, v[i+1])
					i += 2
				case c == '"':
					closed = true
					i++
				case c < 0x20 || c == 0x7f:
					return nil, errXFCC
				default:
					val = append(val, c)
					i++
				}
			}
			if !closed {
				return nil, errXFCC
			}
		} else {
			vs := i
			for i < len(v) && v[i] != ';' && v[i] != ',' {
				if c := v[i]; c == '"' || c == '\\' || c == '=' || c <= 0x20 || c == 0x7f {
					if c == ' ' || c == '\t' {
						break // trailing whitespace before a separator
					}
					return nil, errXFCC
				}
				i++
			}
			val = []byte(v[vs:i])
		}
		switch key {
		case "by", "hash", "cert", "chain", "subject":
			if _, dup := cur[key]; dup {
				return nil, errXFCC
			}
		}
		cur[key] = string(val)
		skipOWS()
		if i >= len(v) {
			return append(elems, cur), nil
		}
		switch v[i] {
		case ';':
		case ',':
			elems = append(elems, cur)
			cur = map[string]string{}
		default:
			return nil, errXFCC
		}
		i++
	}
}

func isXFCCKeyChar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_'
}
