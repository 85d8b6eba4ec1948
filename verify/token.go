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
	hb, err := b64.DecodeString(h)
	if err != nil {
		return nil, invalid("malformed", "token header is not base64url")
	}
	t := &jwt{signingInput: raw[:len(h)+1+len(p)]}
	// The header goes first so that alg none is named as such.
	if err := t.parseHeader(hb); err != nil {
		return nil, err
	}
	if s == "" {
		return nil, invalid("malformed", "token has no signature")
	}
	pb, err := b64.DecodeString(p)
	if err != nil {
		return nil, invalid("malformed", "token payload is not base64url")
	}
	if t.signature, err = b64.DecodeString(s); err != nil {
		return nil, invalid("malformed", "token signature is not base64url")
	}
	if err := checkJSON(pb); err != nil {
		return nil, invalid("malformed", "token payload: "+err.Error())
	}
	dec := json.NewDecoder(bytes.NewReader(pb))
	dec.UseNumber()
	if err := dec.Decode(&t.claims); err != nil || t.claims == nil {
		return nil, invalid("malformed", "token payload is not a JSON object")
	}
	return t, nil
}

func (t *jwt) parseHeader(hb []byte) error {
	if err := checkJSON(hb); err != nil {
		return invalid("malformed", "token header: "+err.Error())
	}
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(hb, &hdr); err != nil || hdr == nil {
		return invalid("malformed", "token header is not a JSON object")
	}
	str := func(name string) (string, error) {
		v, ok := hdr[name]
		if !ok {
			return "", nil
		}
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return "", invalid("malformed", "token header "+name+" is not a string")
		}
		return s, nil
	}
	var err error
	if t.alg, err = str("alg"); err != nil {
		return err
	}
	if t.kid, err = str("kid"); err != nil {
		return err
	}
	if t.typ, err = str("typ"); err != nil {
		return err
	}
	cty, err := str("cty")
	if err != nil {
		return err
	}
	switch {
	case t.alg == "":
		return invalid("malformed", "token header has no alg")
	case strings.EqualFold(t.alg, "none"):
		return invalid("alg_none", "unsigned tokens (alg none) are not accepted")
	case hdr["enc"] != nil:
		return invalid("malformed", "encrypted tokens (JWE) are not accepted")
	case strings.EqualFold(cty, "JWT"):
		return invalid("malformed", "nested tokens are not accepted")
	case hdr["crit"] != nil:
		// No JWS extension is understood here, so every critical one is unknown
		// (RFC 7515 §4.1.11); b64 always comes with crit.
		return invalid("malformed", "token has critical header parameters that are not supported")
	case hdr["b64"] != nil:
		return invalid("malformed", "unencoded payloads (b64) are not accepted")
	}
	for _, name := range []string{"jwk", "jku", "x5u", "x5c"} {
		if hdr[name] != nil {
			return invalid("token_key", "tokens that carry or point to their own key ("+name+") are not accepted")
		}
	}
	return nil
}

// checkJSON rejects what encoding/json would silently accept and a signer and
// a verifier could read differently: duplicate object keys (last one wins in
// Go, first in others), invalid UTF-8, deep nesting, trailing data, and a
// top level that is not an object. jsontext (the JSON v2 tokenizer) checks
// names and UTF-8 as it reads, without allocating a token per value: the
// encoding/json token walk it replaces was a quarter of a new token's cost.
func checkJSON(b []byte) error {
	jd := jsonCheckers.Get().(*jsonChecker)
	defer jsonCheckers.Put(jd)
	jd.r.Reset(b)
	jd.dec.Reset(&jd.r)
	defer jd.r.Reset(nil) // no reference to b kept in the pool
	dec := &jd.dec
	tok, err := dec.ReadToken()
	if err != nil {
		return fmt.Errorf("invalid JSON")
	}
	if tok.Kind() != '{' {
		return fmt.Errorf("not a JSON object")
	}
	for dec.StackDepth() > 0 {
		if _, err := dec.ReadToken(); err != nil {
			switch {
			case errors.Is(err, jsontext.ErrDuplicateName):
				return fmt.Errorf("duplicate key")
			case errors.Is(err, io.ErrUnexpectedEOF):
				return fmt.Errorf("truncated JSON")
			}
			return fmt.Errorf("invalid JSON")
		}
		if dec.StackDepth() > maxJSONDepth {
			return fmt.Errorf("JSON nested deeper than %d", maxJSONDepth)
		}
	}
	if _, err := dec.ReadToken(); err != io.EOF {
		return fmt.Errorf("trailing data after JSON object")
	}
	return nil
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
	r   bytes.Reader
	dec jsontext.Decoder
}

var jsonCheckers = sync.Pool{New: func() any { return new(jsonChecker) }}
