package authz_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"fmt"
	"math/big"
	"strings"
	"sync"
	"testing"

	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// The attack classes of RFC 8725 and of the bugs that broke well-known JWT
// libraries, beyond those in TestTokenChecks and TestHostileHeaders, each
// driven through the real Check server. Every case must be denied.
func TestAdversarialTokens(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	weak, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	weakJWK, _ := jwk.FromRaw(weak.Public())
	_ = weakJWK.Set(jwk.KeyIDKey, "weak")
	idp.AddRawKey(weakJWK) // published, but a pod must ignore it
	c := start(t, cfg, nil)
	claims := idp.Claims(aud)
	rs, es := keys["RS256"], keys["ES256"]
	valid := idptest.Mint(t, rs, claims)
	enc := base64.RawURLEncoding
	segs := func(tok string) []string { return strings.Split(tok, ".") }
	withSig := func(tok string, sig []byte) string {
		p := segs(tok)
		return p[0] + "." + p[1] + "." + enc.EncodeToString(sig)
	}
	esValid := idptest.Mint(t, es, claims)
	esSig, _ := enc.DecodeString(segs(esValid)[2])
	n := elliptic.P256().Params().N
	pad32 := func(b *big.Int) []byte { out := make([]byte, 32); b.FillBytes(out); return out }
	r, s := esSig[:32], esSig[32:]
	ecPub, _ := x509.MarshalPKIXPublicKey(&es.Private.(*ecdsa.PrivateKey).PublicKey)
	x5c := base64.StdEncoding.EncodeToString(ecPub) // any bytes: the header alone must be refused

	cases := []struct {
		name, token string
	}{
		{"x5c header", idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "x5c": []string{x5c}}, claims)},
		{"ES/HS confusion (public key as HMAC secret)", idptest.Sign(t, "HS256", ecPub, map[string]any{"alg": "HS256", "kid": es.Kid}, claims)},
		{"ECDSA r = 0", withSig(esValid, append(make([]byte, 32), s...))},
		{"ECDSA s = 0", withSig(esValid, append(append([]byte{}, r...), make([]byte, 32)...))},
		{"ECDSA r = n", withSig(esValid, append(pad32(n), s...))},
		{"ECDSA s = n", withSig(esValid, append(append([]byte{}, r...), pad32(n)...))},
		{"ECDSA s = 2^256-1", withSig(esValid, append(append([]byte{}, r...), bytesOf(0xff, 32)...))},
		{"ECDSA signature in DER", withSig(esValid, derSig(t, r, s))},
		{"ECDSA signature too short", withSig(esValid, esSig[:63])},
		{"RSA key under 2048 bits in the JWKS", idptest.Sign(t, "RS256", weak, map[string]any{"alg": "RS256", "kid": "weak"}, claims)},
		{"kid path traversal", idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": "../../../etc/passwd"}, claims)},
		{"kid SQL", idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": "' OR '1'='1' --"}, claims)},
		{"kid huge", idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": strings.Repeat("k", 4000)}, claims)},
		{"b64 false", idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "b64": false, "crit": []string{"b64"}}, claims)},
		{"b64 false without crit", idptest.Sign(t, "RS256", rs.Private, map[string]any{"alg": "RS256", "kid": rs.Kid, "b64": false}, claims)},
		{"duplicate alg in header", idptest.SignRaw(t, "RS256", rs.Private, []byte(`{"alg":"RS256","kid":"k-RS256","alg":"none"}`), mustJSON(claims))},
		{"deep nesting", idptest.SignRaw(t, "RS256", rs.Private, []byte(`{"alg":"RS256","kid":"k-RS256"}`),
			[]byte(`{"iss":"`+idp.URL()+`","aud":"`+aud+`","sub":"x","exp":9999999999,"n":`+strings.Repeat("[", 100)+strings.Repeat("]", 100)+`}`))},
		{"standard base64 alphabet", strings.NewReplacer("-", "+", "_", "/").Replace(valid)},
		{"non-canonical trailing bits", nonCanonical(valid)},
		{"whitespace inside", valid[:30] + "\t" + valid[30:]},
		{"newline at end", valid + "\n"},
		{"NUL inside", valid[:30] + "\x00" + valid[30:]},
		{"exp as float far future", idptest.Mint(t, rs, with(claims, "exp", 1e300))},
		{"exp huge integer", idptest.Mint(t, rs, with(claims, "exp", rawNumber(`99999999999999999999999`)))},
		{"nbf as string", idptest.Mint(t, rs, with(claims, "nbf", "0"))},
		{"iat as string", idptest.Mint(t, rs, with(claims, "iat", "0"))},
		{"iat as boolean", idptest.Mint(t, rs, with(claims, "iat", true))},
		{"iss as array", idptest.Mint(t, rs, with(claims, "iss", []any{idp.URL()}))},
		{"aud as object", idptest.Mint(t, rs, with(claims, "aud", map[string]any{"aud": aud}))},
		{"payload is an array", idptest.SignRaw(t, "RS256", rs.Private, []byte(`{"alg":"RS256","kid":"k-RS256"}`), []byte(`[1,2]`))},
		{"header is not an object", idptest.SignRaw(t, "RS256", rs.Private, []byte(`"RS256"`), mustJSON(claims))},
		{"six segments", valid + ".a.b.c"},
		{"only dots", ".."},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp := check(t, c, req{headers: bearer(tc.token)})
			if resp.GetStatus().GetCode() == 0 {
				t.Fatal("allowed")
			}
			if d := resp.GetDeniedResponse(); d == nil || d.GetStatus().GetCode() != typev3.StatusCode_Unauthorized {
				t.Fatalf("want a 401 denial, got %v", resp)
			}
		})
	}
	// The weak key also never counts as a key of the issuer: no fetch was
	// needed to refuse it, and the valid token still passes.
	allowed(t, check(t, c, req{headers: bearer(valid)}))
}

func bytesOf(b byte, n int) []byte { return []byte(strings.Repeat(string([]byte{b}), n)) }

func with(m map[string]any, k string, v any) map[string]any {
	out := map[string]any{}
	for kk, vv := range m {
		out[kk] = vv
	}
	out[k] = v
	return out
}

// rawNumber is a raw JSON number for claims, beyond float64's exact range.
type rawNumber string

func (j rawNumber) MarshalJSON() ([]byte, error) { return []byte(j), nil }

// derSig re-encodes r||s as ASN.1 DER, the form JWS forbids for ECDSA.
func derSig(t *testing.T, r, s []byte) []byte {
	t.Helper()
	ri, si := new(big.Int).SetBytes(r), new(big.Int).SetBytes(s)
	enc := func(b *big.Int) []byte {
		v := b.Bytes()
		if v[0]&0x80 != 0 {
			v = append([]byte{0}, v...)
		}
		return append([]byte{0x02, byte(len(v))}, v...)
	}
	body := append(enc(ri), enc(si)...)
	return append([]byte{0x30, byte(len(body))}, body...)
}

// nonCanonical flips unused trailing bits of the signature's last base64
// character: lenient decoders give the same bytes.
func nonCanonical(tok string) string {
	p := strings.Split(tok, ".")
	sig := p[2]
	last := sig[len(sig)-1]
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	i := strings.IndexByte(alphabet, last)
	// 256-byte signature: 342 chars, the last holds 4 bits; the low 2 are unused.
	return p[0] + "." + p[1] + "." + sig[:len(sig)-1] + string(alphabet[i^1])
}

func TestRandomKidFloodIsRateLimited(t *testing.T) {
	idp, keys, cfg := mainFixture(t)
	c := start(t, cfg, nil)
	allowed(t, check(t, c, req{headers: bearer(idptest.Mint(t, keys["RS256"], idp.Claims(aud)))})) // keys loaded
	before := idp.JWKSHits.Load()
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Go(func() {
			k := &idptest.Key{Kid: fmt.Sprintf("random-%d", i), Alg: "RS256", Private: keys["RS256"].Private}
			resp, err := c.Check(t.Context(), req{headers: bearer(idptest.Mint(t, k, idp.Claims(aud)))}.proto())
			if err != nil || codes.Code(resp.GetStatus().GetCode()) != codes.Unauthenticated {
				t.Errorf("unknown kid: %v %v", err, resp.GetStatus())
			}
		})
	}
	wg.Wait()
	if n := idp.JWKSHits.Load() - before; n > 1 {
		t.Fatalf("200 distinct unknown kids made %d key set fetches; at most 1 per min_refresh_interval", n)
	}
}
