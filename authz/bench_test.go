package authz_test

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"testing"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// BenchmarkCheck measures the whole decision in process (no network) for a
// valid token. There is no verified-token cache yet, so each call includes
// the signature check; compare with BenchmarkBareRSAVerify.
func BenchmarkCheck(b *testing.B) {
	for _, alg := range []string{"RS256", "ES256", "EdDSA"} {
		b.Run(alg, func(b *testing.B) {
			k := idptest.NewKey(b, "k", alg)
			idp := idptest.New(b, k)
			cfg := &authz.Config{
				Issuers: []verify.IssuerConfig{{Name: "idp", Issuer: idp.URL(), Audiences: []string{aud},
					JWKSURI: idp.JWKSURL(), Algorithms: []string{alg}}},
				Routes:  []authz.RouteConfig{{Name: "all", Match: authz.Match{PathPrefix: "/"}}},
				Headers: map[string]string{"x-user-id": "sub", "x-user-scopes": "scope"},
			}
			v, err := verify.New(cfg.Issuers, verify.Options{})
			if err != nil {
				b.Fatal(err)
			}
			srv, err := authz.NewServer(cfg, v, nil)
			if err != nil {
				b.Fatal(err)
			}
			r := req{headers: bearer(idptest.Mint(b, k, idp.Claims(aud)))}.proto()
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				resp, _ := srv.Check(ctx, r)
				if resp.GetStatus().GetCode() != 0 {
					b.Fatal("denied")
				}
			}
		})
	}
}

// BenchmarkBareRSAVerify is the floor for an RS256 check: one PKCS#1 v1.5
// verification of a 2048-bit signature.
func BenchmarkBareRSAVerify(b *testing.B) {
	k := idptest.NewKey(b, "k", "RS256").Private.(*rsa.PrivateKey)
	sum := sha256.Sum256([]byte("header.payload"))
	sig, err := rsa.SignPKCS1v15(nil, k, crypto.SHA256, sum[:])
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		h := sha256.Sum256([]byte("header.payload"))
		if rsa.VerifyPKCS1v15(&k.PublicKey, crypto.SHA256, h[:], sig) != nil {
			b.Fatal("verify failed")
		}
	}
}
