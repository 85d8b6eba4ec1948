package authz_test

import (
	"context"
	"net/url"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
)

// demoJWKS is the demo issuer's public key (deploy/demo): nothing random
// can be signed by it.
const demoJWKS = `{"keys":[{"alg":"ES256","crv":"P-256","kid":"demo-2026","kty":"EC","use":"sig","x":"kFGt-JSn-ZyyTgRrHIi-Y0ZT_cB0NJd2YsxRuzkOlL8","y":"UPE4g3n1HIs-IIeSZFWZYlVokZW214ozrSifttwvEMo"}]}`

// A real token of the demo issuer, expired long ago (so no seed is an allow),
// for the fuzzer to mutate.
const expiredDemoToken = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImRlbW8tMjAyNiIsInR5cCI6IkpXVCJ9.eyJhdWQiOlsiZGVtby1hcGkiXSwiZXhwIjoxNzAwMDAwMDAwLCJpYXQiOjE2OTk5OTk5MDAsImlzcyI6Imh0dHBzOi8vZGVtby50b2tlbmF1dGh6LmludmFsaWQiLCJzY29wZSI6InJlYWQgYWRtaW4iLCJzdWIiOiJhbGljZSJ9.MEUCIQDx"

// FuzzCheck drives the whole decision with random requests. Properties:
//   - it never panics (Check would answer INTERNAL) and never returns a
//     gRPC error;
//   - every response marshals (all its strings are UTF-8), also when the
//     request comes as encode_raw_headers' raw bytes;
//   - nothing is allowed but on the anonymous /public route, since nothing
//     random carries a valid signature, and what is allowed there is
//     canonical: a path an upstream resolves under /public and nowhere else.
func FuzzCheck(f *testing.F) {
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "demo", Issuer: "https://demo.tokenauthz.invalid", Audiences: []string{"demo-api"},
			Algorithms: []string{"ES256"}, JWKS: demoJWKS, RequiredClaims: []string{"sub"}}},
		Routes: []authz.RouteConfig{
			{Name: "public", Match: authz.Match{PathPrefix: "/public"}, Anonymous: true},
			{Name: "admin", Match: authz.Match{PathPrefix: "/admin", Host: "*.example.com"}, Scopes: []string{"admin"},
				Claims: map[string]any{"email_verified": true}},
			{Name: "default", Match: authz.Match{PathPrefix: "/"}},
		},
		Headers:              authz.ClaimHeaders(map[string]string{"x-user-id": "sub", "x-user-email": "email"}),
		ReservedHeaderPrefix: "x-auth-",
	}
	v, err := verify.New(cfg.Issuers, verify.Options{})
	if err != nil {
		f.Fatal(err)
	}
	srv, err := authz.NewServer(cfg, v, nil)
	if err != nil {
		f.Fatal(err)
	}
	multibyte := "eyJhbGciOiJFUzI1NuKCrOKCrOKCrOKCrOKCrOKCrCJ9.eyJzdWIiOiJ4In0.AA" // alg "ES256€€€€€€": cut inside a rune by older code
	for _, tok := range []string{expiredDemoToken, "a.b.c", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", strings.Repeat("A", 9000), multibyte} {
		f.Add("Bearer "+tok, "/admin/x", "GET", "api.example.com", false)
		f.Add("bearer "+tok, "/orders?access_token=x", "POST", "", true)
	}
	for _, p := range []string{"/public/..;/admin", "/public/%2e%2e/admin", "/public/.%2e/admin", "/public%2f..%2fadmin",
		"/public/%252e%252e/admin", "/PUBLIC/x", "//public/../admin", "/public/x\\..\\..\\admin", "/public/x/..%00/"} {
		f.Add("", p, "GET", "api.example.com", false)
		f.Add("", p, "GET", "api.example.com\xff", true)
	}
	f.Fuzz(func(t *testing.T, auth, path, method, host string, raw bool) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		rq := req{method: method, host: host, path: path, headers: map[string]string{"authorization": auth}}
		if raw {
			rq.raw = []*corev3.HeaderValue{{Key: ":method", RawValue: []byte(method)}, {Key: ":authority", RawValue: []byte(host)},
				{Key: ":path", RawValue: []byte(path)}, {Key: "authorization", RawValue: []byte(auth)}}
		}
		r := rq.proto()
		if raw { // the string fields as Envoy sends them: sanitized
			h := r.Attributes.Request.Http
			h.Method, h.Host, h.Path = strings.ToValidUTF8(method, "!"), strings.ToValidUTF8(host, "!"), strings.ToValidUTF8(path, "!")
		} else if !utf8.ValidString(auth + path + method + host) {
			return // not a request gRPC can carry: Envoy sanitizes these fields
		}
		resp, err := srv.Check(ctx, r)
		if err != nil {
			t.Fatalf("gRPC error: %v", err)
		}
		if _, err := proto.Marshal(resp); err != nil {
			t.Fatalf("the response does not marshal (%v): %q %q %q %q", err, auth, path, method, host)
		}
		switch codes.Code(resp.GetStatus().GetCode()) {
		case codes.OK:
			if !resolvesUnder(path, "/public") {
				t.Fatalf("allowed: %q %q %q %q", auth, path, method, host)
			}
		case codes.Internal:
			t.Fatalf("internal error (a recovered panic): %q %q", auth, path)
		}
	})
}

// resolvesUnder is an oracle independent of the code under test: the path
// decodes (once, and again) to the same segments with no dot segments, path
// parameters, backslashes or empty segments, and they start with prefix.
func resolvesUnder(target, prefix string) bool {
	p, _, _ := strings.Cut(target, "?")
	once, err := url.PathUnescape(p)
	if err != nil {
		return false
	}
	if twice, err := url.PathUnescape(once); err != nil || twice != once {
		return false
	}
	if strings.ContainsAny(once, ";\\") || strings.Contains(p, "%2f") || strings.Contains(p, "%2F") {
		return false
	}
	segs := strings.Split(once, "/")
	for i, s := range segs[1:] {
		if s == "." || s == ".." || s == "" && i != len(segs)-2 || strings.TrimRight(s, ". ") != s {
			return false
		}
	}
	return once == prefix || strings.HasPrefix(once, prefix+"/")
}
