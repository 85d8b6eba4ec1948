package authz_test

import (
	"encoding/base64"
	"encoding/json"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// noneToken is an unsigned token with the given alg spelling.
func noneToken(claims map[string]any, alg string) string {
	enc := base64.RawURLEncoding
	return enc.EncodeToString(mustJSON(map[string]any{"alg": alg})) + "." + enc.EncodeToString(mustJSON(claims)) + "."
}

// padded re-encodes the signature segment with base64 padding, which a
// lenient decoder accepts.
func padded(tok string) string {
	p := strings.Split(tok, ".")
	b, _ := base64.RawURLEncoding.DecodeString(p[2])
	return p[0] + "." + p[1] + "." + base64.URLEncoding.EncodeToString(b) // 256 bytes: "==" padding
}

func rawHeaders(kv ...string) []*corev3.HeaderValue {
	var out []*corev3.HeaderValue
	for i := 0; i+1 < len(kv); i += 2 {
		out = append(out, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return out
}

func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }
