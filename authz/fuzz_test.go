package authz_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
)

// demoJWKS is the demo issuer's public key (deploy/demo): nothing random
// can be signed by it.
const demoJWKS = `{"keys":[{"alg":"ES256","crv":"P-256","kid":"demo-2026","kty":"EC","use":"sig","x":"kFGt-JSn-ZyyTgRrHIi-Y0ZT_cB0NJd2YsxRuzkOlL8","y":"UPE4g3n1HIs-IIeSZFWZYlVokZW214ozrSifttwvEMo"}]}`

// A real token of the demo issuer, expired long ago (so no seed is an allow),
// for the fuzzer to mutate.
const expiredDemoToken = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImRlbW8tMjAyNiIsInR5cCI6IkpXVCJ9.eyJhdWQiOlsiZGVtby1hcGkiXSwiZXhwIjoxNzAwMDAwMDAwLCJpYXQiOjE2OTk5OTk5MDAsImlzcyI6Imh0dHBzOi8vZGVtby50b2tlbmF1dGh6LmludmFsaWQiLCJzY29wZSI6InJlYWQgYWRtaW4iLCJzdWIiOiJhbGljZSJ9.MEUCIQDx"

// FuzzCheck drives the whole decision with random requests: it must never
// panic (Check would answer INTERNAL) and never allow, since nothing random
// carries a valid signature and no route is anonymous.
func FuzzCheck(f *testing.F) {
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "demo", Issuer: "https://demo.tokenauthz.invalid", Audiences: []string{"demo-api"},
			Algorithms: []string{"ES256"}, JWKS: demoJWKS, RequiredClaims: []string{"sub"}}},
		Routes: []authz.RouteConfig{
			{Name: "admin", Match: authz.Match{PathPrefix: "/admin", Host: "*.example.com"}, Scopes: []string{"admin"},
				Claims: map[string]any{"email_verified": true}},
			{Name: "default", Match: authz.Match{PathPrefix: "/"}},
		},
		Headers:              map[string]string{"x-user-id": "sub", "x-user-email": "email"},
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
	for _, tok := range []string{expiredDemoToken, "a.b.c", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", strings.Repeat("A", 9000)} {
		f.Add("Bearer "+tok, "/admin/x", "GET", "api.example.com")
		f.Add("bearer "+tok, "/orders?access_token=x", "POST", "")
	}
	f.Fuzz(func(t *testing.T, auth, path, method, host string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r := req{method: method, host: host, path: path, headers: map[string]string{"authorization": auth}}.proto()
		resp, err := srv.Check(ctx, r)
		if err != nil {
			t.Fatalf("gRPC error: %v", err)
		}
		switch codes.Code(resp.GetStatus().GetCode()) {
		case codes.OK:
			t.Fatalf("allowed: %q %q %q %q", auth, path, method, host)
		case codes.Internal:
			t.Fatalf("internal error (a recovered panic): %q %q", auth, path)
		}
	})
}
