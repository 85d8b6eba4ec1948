package verify

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/go-json-experiment/json/jsontext"
)

// maxJSONDepth bounds nesting in token headers and payloads; real tokens nest
// two or three levels.
const maxJSONDepth = 16

var b64 = base64.RawURLEncoding.Strict()

// jwt is a compact JWS split and decoded, not yet verified.
type jwt struct {
	signingInput string // header.payload, as signed
	signature    []byte
	alg, kid     string
	typ          string
	claims       Claims
}

// Describe says what a token looks like without verifying it, for
// explanations: a JWT's alg, kid, typ and iss, or "opaque". It holds no
// secret (the header and iss are public parts of the token).
func Describe(raw string) string {
	if !LooksLikeJWT(raw) {
		return "opaque (not a compact JWS): goes to introspection"
	}
	t, err := parseJWT(raw)
	if err != nil {
		return "malformed JWT: " + AsError(err).Desc
	}
	iss, _ := t.claims["iss"].(string)
	return fmt.Sprintf("JWT alg %s, kid %q, typ %q, iss %q", truncate(t.alg, 16), truncate(t.kid, 64), truncate(t.typ, 32), truncate(iss, 200))
}

// LooksLikeJWT reports whether raw has the shape of a compact JWS (three
// dot-separated segments), which is how opaque tokens are told apart.
func LooksLikeJWT(raw string) bool { return strings.Count(raw, ".") == 2 }

// parseJWT splits and decodes a compact JWS strictly. jwx's parser is lenient
// (padding, standard base64, JSON serialization), so this is done here: only
// unpadded base64url with canonical trailing bits, JSON objects without
// duplicate keys, and a header that names no key material of its own.
func parseJWT(raw string) (*jwt, error) {
	switch n := strings.Count(raw, "."); {
	case n == 4:
		return nil, invalid("malformed", "encrypted tokens (JWE) are not accepted")
	case n != 2:
		return nil, invalid("malformed", "token is not a compact JWS")
	}
	h, rest, _ := strings.Cut(raw, ".")
	p, s, _ := strings.Cut(rest, ".")
	if h == "" || p == "" {
		return nil, invalid("malformed", "token has an empty segment")
	}
	// The three parts decode into one buffer, and the header and payload
	// are copied once into the string their decoded values slice. Errors
	// are reported in this order all the same: the header's first, so that
	// alg none is named as such.
	buf := make([]byte, 0, b64.DecodedLen(len(h))+b64.DecodedLen(len(p))+b64.DecodedLen(len(s)))
	buf, err := b64.AppendDecode(buf, []byte(h))
	if err != nil {
		return nil, invalid("malformed", "token header is not base64url")
	}
	hn := len(buf)
	buf, perr := b64.AppendDecode(buf, []byte(p))
	pn := len(buf) - hn
	var serr error
	if perr == nil {
		buf, serr = b64.AppendDecode(buf, []byte(s))
	}
	src := string(buf[:hn+pn])
	t := &jwt{signingInput: raw[:len(h)+1+len(p)]}
	if err := t.parseHeader(src[:hn]); err != nil {
		return nil, err
	}
	switch {
	case s == "":
		return nil, invalid("malformed", "token has no signature")
	case perr != nil:
		return nil, invalid("malformed", "token payload is not base64url")
	case serr != nil:
		return nil, invalid("malformed", "token signature is not base64url")
	}
	t.signature = buf[hn+pn:]
	if t.claims, err = decodeString(src[hn:]); err != nil {
		return nil, invalid("malformed", "token payload: "+err.Error())
	}
	return t, nil
}

// parseHeader reads the protected header in the same single pass as
// decodeObject, keeping only what is checked: the string members alg, kid,
// typ and cty, and whether the members refused below are present at all
// (with any value, null included). Checks run after the whole header read
// as valid JSON, so a broken header is named malformed first.
func (t *jwt) parseHeader(src string) error {
	var (
		cty       string
		notString string
		refused   uint8
	)
	const (
		hasEnc = 1 << iota
		hasCrit
		hasB64
		hasJWK
		hasJKU
		hasX5U
		hasX5C
	)
	err := walkObject(src, func(dec *jsontext.Decoder, name string) error {
		var dst *string
		switch name {
		case "alg":
			dst = &t.alg
		case "kid":
			dst = &t.kid
		case "typ":
			dst = &t.typ
		case "cty":
			dst = &cty
		case "enc":
			refused |= hasEnc
		case "crit":
			refused |= hasCrit
		case "b64":
			refused |= hasB64
		case "jwk":
			refused |= hasJWK
		case "jku":
			refused |= hasJKU
		case "x5u":
			refused |= hasX5U
		case "x5c":
			refused |= hasX5C
		}
		if dst == nil {
			_, err := readValue(dec, src) // checked as thoroughly as a kept one
			return err
		}
		if dec.PeekKind() != '"' {
			if notString == "" {
				notString = name
			}
			_, err := readValue(dec, src)
			return err
		}
		var err error
		*dst, err = readString(dec, src)
		return err
	})
	if err != nil {
		return invalid("malformed", "token header: "+err.Error())
	}
	for _, name := range []string{"alg", "kid", "typ", "cty"} {
		if notString == name {
			return invalid("malformed", "token header "+name+" is not a string")
		}
	}
	switch {
	case t.alg == "":
		return invalid("malformed", "token header has no alg")
	case strings.EqualFold(t.alg, "none"):
		return invalid("alg_none", "unsigned tokens (alg none) are not accepted")
	case refused&hasEnc != 0:
		return invalid("malformed", "encrypted tokens (JWE) are not accepted")
	case strings.EqualFold(cty, "JWT"):
		return invalid("malformed", "nested tokens are not accepted")
	case refused&hasCrit != 0:
		// No JWS extension is understood here, so every critical one is unknown
		// (RFC 7515 §4.1.11); b64 always comes with crit.
		return invalid("malformed", "token has critical header parameters that are not supported")
	case refused&hasB64 != 0:
		return invalid("malformed", "unencoded payloads (b64) are not accepted")
	}
	for i, name := range []string{"jwk", "jku", "x5u", "x5c"} {
		if refused&(hasJWK<<i) != 0 {
			return invalid("token_key", "tokens that carry or point to their own key ("+name+") are not accepted")
		}
	}
	return nil
}

// decodeObject reads b, which must be a JSON object, into what
// encoding/json with UseNumber would make of it (map[string]any, []any,
// string, json.Number, bool, nil), rejecting on the way what encoding/json
// would silently accept and a signer and a verifier could read differently:
// duplicate object keys (last one wins in Go, first in others), invalid
// UTF-8, deep nesting, trailing data, and a top level that is not an object.
//
// One pass of jsontext (the JSON v2 tokenizer, which checks names and UTF-8
// as it reads): a check pass followed by encoding/json's own (which scans
// everything once more before decoding) was a third of a new token's cost
// besides its signature.
func decodeObject(b []byte) (Claims, error) {
	return decodeString(string(b))
}

// decodeString is decodeObject of a string. Names, numbers and strings
// without escapes are slices of src rather than copies: a verified token's
// claims stay in the verified-token cache, and one pointer-free copy of the
// payload is cheaper to allocate and for the collector to mark than a
// string per name and value.
func decodeString(src string) (Claims, error) {
	m := Claims{}
	err := walkObject(src, func(dec *jsontext.Decoder, name string) error {
		v, err := readValue(dec, src)
		m[name] = v
		return err
	})
	if err != nil {
		return nil, err
	}
	return m, nil
}

// checkJSON applies decodeObject's rules without keeping anything.
func checkJSON(b []byte) error {
	src := string(b)
	return walkObject(src, func(dec *jsontext.Decoder, _ string) error {
		_, err := readValue(dec, src)
		return err
	})
}

// walkObject reads src as one JSON object and nothing after it, calling
// member for each name; member must read the name's value from dec.
func walkObject(src string, member func(dec *jsontext.Decoder, name string) error) error {
	jd := jsonCheckers.Get().(*jsonChecker)
	defer jsonCheckers.Put(jd)
	jd.r.Reset(src)
	jd.dec.Reset(&jd.r)
	defer jd.r.Reset("") // no reference to src kept in the pool
	dec := &jd.dec
	tok, err := dec.ReadToken()
	if err != nil {
		return jsonError(err)
	}
	if tok.Kind() != '{' {
		return fmt.Errorf("not a JSON object")
	}
	for dec.PeekKind() != '}' {
		name, err := readString(dec, src)
		if err != nil {
			return err
		}
		if err := member(dec, name); err != nil {
			return err
		}
	}
	if _, err := dec.ReadToken(); err != nil {
		return jsonError(err)
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		return fmt.Errorf("trailing data after JSON object")
	}
	return nil
}

// readString reads the next string (a name or a value) from dec, which
// reads src: the slice of src between its quotes when it has no escape
// (jsontext has checked its UTF-8), else its unescaped copy.
func readString(dec *jsontext.Decoder, src string) (string, error) {
	raw, err := dec.ReadValue()
	if err != nil {
		return "", jsonError(err)
	}
	if len(raw) < 2 || raw[0] != '"' {
		return "", fmt.Errorf("invalid JSON")
	}
	if bytes.IndexByte(raw, '\\') < 0 {
		end := int(dec.InputOffset())
		return src[end-len(raw)+1 : end-1], nil
	}
	s, err := jsontext.AppendUnquote(nil, raw)
	if err != nil {
		return "", jsonError(err)
	}
	return string(s), nil
}

// readValue reads the next value from dec, which reads src, whole.
func readValue(dec *jsontext.Decoder, src string) (any, error) {
	switch dec.PeekKind() {
	case '"':
		return readString(dec, src)
	case '0':
		raw, err := dec.ReadValue()
		if err != nil {
			return nil, jsonError(err)
		}
		end := int(dec.InputOffset())
		return json.Number(src[end-len(raw) : end]), nil
	}
	tok, err := dec.ReadToken()
	if err != nil {
		return nil, jsonError(err)
	}
	switch tok.Kind() {
	case 't', 'f':
		return tok.Bool(), nil
	case 'n':
		return nil, nil
	case '{':
		if dec.StackDepth() > maxJSONDepth {
			return nil, fmt.Errorf("JSON nested deeper than %d", maxJSONDepth)
		}
		m := map[string]any{}
		for dec.PeekKind() != '}' {
			name, err := readString(dec, src)
			if err != nil {
				return nil, err
			}
			v, err := readValue(dec, src)
			if err != nil {
				return nil, err
			}
			m[name] = v
		}
		_, err := dec.ReadToken()
		return m, jsonError(err)
	case '[':
		if dec.StackDepth() > maxJSONDepth {
			return nil, fmt.Errorf("JSON nested deeper than %d", maxJSONDepth)
		}
		l := []any{}
		for dec.PeekKind() != ']' {
			v, err := readValue(dec, src)
			if err != nil {
				return nil, err
			}
			l = append(l, v)
		}
		_, err := dec.ReadToken()
		return l, jsonError(err)
	}
	return nil, fmt.Errorf("invalid JSON")
}

// jsonError names a tokenizer error for a message; nil stays nil.
func jsonError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, jsontext.ErrDuplicateName):
		return fmt.Errorf("duplicate key")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("truncated JSON")
	}
	return fmt.Errorf("invalid JSON")
}

// truncate shortens s, an untrusted token field, for a message: at most n
// bytes cut at a rune boundary, invalid UTF-8 replaced, so a message never
// breaks the protobuf string it ends up in.
func truncate(s string, n int) string {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// jsonChecker is a reusable tokenizer: a jsontext.Decoder's buffers are
// most of what a fresh one costs.
type jsonChecker struct {
	r   strings.Reader
	dec jsontext.Decoder
}

var jsonCheckers = sync.Pool{New: func() any { return new(jsonChecker) }}
