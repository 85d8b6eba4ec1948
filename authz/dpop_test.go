package authz_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"google.golang.org/grpc/codes"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/cache/redistest"
	"github.com/tokenauthz/tokenauthz/verify"
	"github.com/tokenauthz/tokenauthz/verify/idptest"
)

// dpopClient is a DPoP client written for the tests: a key pair, its public
// JWK and RFC 7638 thumbprint, and proofs signed with it.
type dpopClient struct {
	t   testing.TB
	key *ecdsa.PrivateKey
	jwk map[string]any
	jkt string
	seq atomic.Int64
}

func newDPoPClient(t testing.TB) *dpopClient {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := jwk.FromRaw(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(pub)
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	return &dpopClient{t: t, key: k, jwk: m, jkt: base64.RawURLEncoding.EncodeToString(tp)}
}

// proof signs a proof for method and htu with token's ath; mod changes the
// header and claims before signing.
func (c *dpopClient) proof(method, htu, token string, mod func(h, cl map[string]any)) string {
	sum := sha256.Sum256([]byte(token))
	h := map[string]any{"typ": "dpop+jwt", "alg": "ES256", "jwk": c.jwk}
	cl := map[string]any{"jti": fmt.Sprint("proof-", c.seq.Add(1), "-", time.Now().UnixNano()), "htm": method, "htu": htu,
		"iat": time.Now().Unix(), "ath": base64.RawURLEncoding.EncodeToString(sum[:])}
	if mod != nil {
		mod(h, cl)
	}
	return idptest.Sign(c.t, "ES256", c.key, h, cl)
}

// dpopFixture: an issuer with dpop on, and routes of each sender_constraint.
func dpopFixture(t *testing.T, nonce bool) (*idptest.IdP, *idptest.Key, *authz.Config) {
	key := idptest.NewKey(t, "k1", "RS256")
	idp := idptest.New(t, key)
	cfg := &authz.Config{
		Issuers: []verify.IssuerConfig{{Name: "main", Issuer: idp.URL(), Audiences: []string{aud}, JWKSURI: idp.JWKSURL(),
			Algorithms: []string{"RS256"}, Leeway: dur(5 * time.Second),
			DPoP: &verify.DPoPConfig{Algorithms: []string{"ES256", "EdDSA", "PS256"}, MaxAge: 60 * time.Second, Nonce: nonce}}},
		Routes: []authz.RouteConfig{
			{Name: "payments", Match: authz.Match{PathPrefix: "/payments"}, SenderConstraint: "required"},
			{Name: "legacy", Match: authz.Match{PathPrefix: "/legacy"}, SenderConstraint: "none"},
			{Name: "default", Match: authz.Match{PathPrefix: "/"}},
		},
		Headers: authz.ClaimHeaders(map[string]string{"x-user-id": "sub"}),
	}
	return idp, key, cfg
}

func dpopReq(method, path, token, proof string) req {
	h := map[string]string{"authorization": "DPoP " + token}
	if proof != "" {
		h["dpop"] = proof
	}
	return req{method: method, path: path, headers: h}
}

const dpopHost = "https://api.example.com"

func TestDPoP(t *testing.T) {
	idp, key, cfg := dpopFixture(t, false)
	c := start(t, cfg, nil)
	client := newDPoPClient(t)
	claims := idp.Claims(aud)
	claims["cnf"] = map[string]any{"jkt": client.jkt}
	tok := idptest.Mint(t, key, claims)
	unbound := idptest.Mint(t, key, idp.Claims(aud))
	url := dpopHost + "/orders/1"

	allowed(t, check(t, c, dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, nil))))
	// The verified-token cache keeps the token from its second verification
	// and serves it then; the proof is still checked on every request.
	for range 2 {
		allowed(t, check(t, c, dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, nil))))
	}
	// htu: query and fragment ignored, scheme and host case-insensitive,
	// default port dropped, the path exact; the request's query is not part.
	for _, htu := range []string{url + "?x=1", url + "#f", "HTTPS://API.Example.COM/orders/1", "https://api.example.com:443/orders/1"} {
		allowed(t, check(t, c, dpopReq("GET", "/orders/1?a=b", tok, client.proof("GET", htu, tok, nil))))
	}

	other := newDPoPClient(t)
	hs := idptest.Sign(t, "HS256", []byte(strings.Repeat("k", 32)), map[string]any{"typ": "dpop+jwt", "alg": "HS256",
		"jwk": map[string]any{"kty": "oct", "k": "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s"}},
		map[string]any{"jti": "h", "htm": "GET", "htu": url, "iat": time.Now().Unix()})
	none := b64(`{"typ":"dpop+jwt","alg":"none","jwk":{}}`) + "." + b64(`{"jti":"n","htm":"GET"}`) + "."
	priv := map[string]any{}
	for k, v := range client.jwk {
		priv[k] = v
	}
	priv["d"] = base64.RawURLEncoding.EncodeToString(client.key.D.Bytes())
	for _, tc := range []struct {
		name, oauth string
		r           req
	}{
		{"no proof", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, "")},
		{"wrong htm", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("POST", url, tok, nil))},
		{"htm lower case", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("get", url, tok, nil))},
		{"wrong htu path", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", dpopHost+"/orders/2", tok, nil))},
		{"htu path case", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", dpopHost+"/Orders/1", tok, nil))},
		{"htu other host", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", "https://evil.example.com/orders/1", tok, nil))},
		{"htu other scheme", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", "http://api.example.com/orders/1", tok, nil))},
		{"htu other port", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", "https://api.example.com:8443/orders/1", tok, nil))},
		{"htu dot segments", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", dpopHost+"/x/../orders/1", tok, nil))},
		{"old iat", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, func(_, cl map[string]any) { cl["iat"] = time.Now().Unix() - 120 }))},
		{"future iat", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, func(_, cl map[string]any) { cl["iat"] = time.Now().Unix() + 120 }))},
		{"no jti", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, func(_, cl map[string]any) { delete(cl, "jti") }))},
		{"wrong ath", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", url, unbound, nil))},
		{"no ath", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, func(_, cl map[string]any) { delete(cl, "ath") }))},
		{"wrong typ", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, func(h, _ map[string]any) { h["typ"] = "JWT" }))},
		{"another key (jkt)", "invalid_token", dpopReq("GET", "/orders/1", tok, other.proof("GET", url, tok, nil))},
		{"HMAC proof", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, hs)},
		{"alg none", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, none)},
		{"private key in jwk", "invalid_dpop_proof", dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, func(h, _ map[string]any) { h["jwk"] = priv }))},
		{"two proofs", "invalid_dpop_proof", req{path: "/orders/1", headers: map[string]string{"authorization": "DPoP " + tok,
			"dpop": client.proof("GET", url, tok, nil) + "," + client.proof("GET", url, tok, nil)}}},
		{"bound token as Bearer", "invalid_token", req{path: "/orders/1", headers: bearer(tok)}},
		{"unbound token with DPoP", "invalid_token", dpopReq("GET", "/orders/1", unbound, client.proof("GET", url, unbound, nil))},
		{"unbound token on a required route", "invalid_token", req{path: "/payments/1", headers: bearer(unbound)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := check(t, c, tc.r)
			denied(t, resp, codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="`+tc.oauth+`"`)
			if wa := wwwAuth(resp); tc.name != "unbound token on a required route" && !strings.HasPrefix(wa, "DPoP ") {
				t.Errorf("challenge %q is not DPoP", wa)
			} else if strings.HasPrefix(wa, "DPoP ") && !strings.Contains(wa, `algs="ES256 EdDSA PS256"`) {
				t.Errorf("challenge %q lacks algs", wa)
			}
		})
	}
	// A replayed proof is refused on the same pod.
	p := client.proof("GET", url, tok, nil)
	allowed(t, check(t, c, dpopReq("GET", "/orders/1", tok, p)))
	denied(t, check(t, c, dpopReq("GET", "/orders/1", tok, p)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "used before")
	// Unbound tokens pass where binding is optional; none ignores binding.
	allowed(t, check(t, c, req{path: "/orders/1", headers: bearer(unbound)}))
	allowed(t, check(t, c, req{path: "/legacy/1", headers: bearer(tok)}))
	allowed(t, check(t, c, dpopReq("POST", "/payments/1", tok, client.proof("POST", dpopHost+"/payments/1", tok, nil))))
}

// TestDPoPReplayAcrossPods: a proof used on one pod is refused on another
// that shares its Redis.
func TestDPoPReplayAcrossPods(t *testing.T) {
	rs := redistest.Start(t)
	idp, key, cfg := dpopFixture(t, false)
	rc := &cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 2 * time.Second}
	a, b := startInstance(t, cfg, rc), startInstance(t, cfg, rc)
	a.waitReady(t)
	b.waitReady(t)
	client := newDPoPClient(t)
	claims := idp.Claims(aud)
	claims["cnf"] = map[string]any{"jkt": client.jkt}
	tok := idptest.Mint(t, key, claims)
	p := client.proof("GET", dpopHost+"/orders/1", tok, nil)
	allowed(t, check(t, a.c, dpopReq("GET", "/orders/1", tok, p)))
	denied(t, check(t, b.c, dpopReq("GET", "/orders/1", tok, p)), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "used before")
	allowed(t, check(t, b.c, dpopReq("GET", "/orders/1", tok, client.proof("GET", dpopHost+"/orders/1", tok, nil))))
}

// TestDPoPNonce: with nonce: true a proof without a nonce, or with a stale
// one, gets 401 use_dpop_nonce and a fresh DPoP-Nonce; the retry with it
// passes, on another pod too (nonces are valid fleet-wide through Redis).
func TestDPoPNonce(t *testing.T) {
	rs := redistest.Start(t)
	idp, key, cfg := dpopFixture(t, true)
	rc := &cache.RedisConfig{Addrs: []string{rs.Addr()}, Timeout: 2 * time.Second}
	a, b := startInstance(t, cfg, rc), startInstance(t, cfg, rc)
	a.waitReady(t)
	client := newDPoPClient(t)
	claims := idp.Claims(aud)
	claims["cnf"] = map[string]any{"jkt": client.jkt}
	tok := idptest.Mint(t, key, claims)
	url := dpopHost + "/orders/1"

	resp := check(t, a.c, dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, nil)))
	denied(t, resp, codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="use_dpop_nonce"`)
	nonce := deniedHeader(resp, "dpop-nonce")
	if nonce == "" {
		t.Fatal("no DPoP-Nonce header")
	}
	withNonce := func(n string) func(h, cl map[string]any) { return func(_, cl map[string]any) { cl["nonce"] = n } }
	allowed(t, check(t, b.c, dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, withNonce(nonce)))))
	for _, bad := range []string{"made-up", nonce[:len(nonce)-2] + "AA", ""} {
		denied(t, check(t, a.c, dpopReq("GET", "/orders/1", tok, client.proof("GET", url, tok, withNonce(bad)))),
			codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="use_dpop_nonce"`)
	}
}

// TestDPoPNonceExpires: a nonce older than max_age is stale.
func TestDPoPNonceExpires(t *testing.T) {
	idp, key, cfg := dpopFixture(t, true)
	clk := newClock()
	cfg.Issuers[0].DPoP.MaxAge = 30 * time.Second
	c := start(t, cfg, clk)
	client := newDPoPClient(t)
	claims := claimsAt(idp, clk)
	claims["cnf"] = map[string]any{"jkt": client.jkt}
	tok := idptest.Mint(t, key, claims)
	url := dpopHost + "/orders/1"
	proofAt := func(n string) string {
		return client.proof("GET", url, tok, func(_, cl map[string]any) { cl["nonce"], cl["iat"] = n, clk.Unix() })
	}
	nonce := deniedHeader(check(t, c, dpopReq("GET", "/orders/1", tok, proofAt(""))), "dpop-nonce")
	allowed(t, check(t, c, dpopReq("GET", "/orders/1", tok, proofAt(nonce))))
	clk.Add(40 * time.Second)
	resp := check(t, c, dpopReq("GET", "/orders/1", tok, proofAt(nonce)))
	denied(t, resp, codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="use_dpop_nonce"`)
	if n := deniedHeader(resp, "dpop-nonce"); n == "" || n == nonce {
		t.Errorf("a stale nonce gets a fresh one, got %q", n)
	}
}

func deniedHeader(resp *authv3.CheckResponse, name string) string {
	for _, h := range resp.GetDeniedResponse().GetHeaders() {
		if h.GetHeader().GetKey() == name {
			return h.GetHeader().GetValue()
		}
	}
	return ""
}

// testCert makes a self-signed client certificate and returns it as Envoy
// sends it (URL-encoded PEM) with its x5t#S256.
func testCert(t *testing.T, cn string) (urlPEM, x5t, hexHash string) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(der)
	p := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	return url.QueryEscape(string(p)), base64.RawURLEncoding.EncodeToString(sum[:]), hex.EncodeToString(sum[:])
}

// TestCertificateBoundTokens: RFC 8705 cnf.x5t#S256 against Envoy's peer
// certificate; an XFCC header counts only when configured.
func TestCertificateBoundTokens(t *testing.T) {
	idp, key, cfg := dpopFixture(t, false)
	c := start(t, cfg, nil)
	certA, x5tA, hashA := testCert(t, "client-a")
	certB, _, _ := testCert(t, "client-b")
	claims := idp.Claims(aud)
	claims["cnf"] = map[string]any{"x5t#S256": x5tA}
	tok := idptest.Mint(t, key, claims)

	allowed(t, check(t, c, req{path: "/payments/1", headers: bearer(tok), cert: certA}))
	denied(t, check(t, c, req{path: "/payments/1", headers: bearer(tok), cert: certB}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "another client certificate")
	denied(t, check(t, c, req{path: "/orders/1", headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, "no client certificate")
	// An XFCC header is not trusted unless the config says so.
	xfcc := `By=spiffe://cluster.local/ns/a/sa/b;Hash=` + hashA + `;Cert="` + certA + `";Subject="CN=client-a"`
	denied(t, check(t, c, req{path: "/orders/1", headers: map[string]string{"authorization": "Bearer " + tok, "x-forwarded-client-cert": xfcc}}),
		codes.Unauthenticated, typev3.StatusCode_Unauthorized)

	cfg.ClientCert = authz.ClientCertConfig{From: "header"}
	viaProxy := start(t, cfg, nil)
	allowed(t, check(t, viaProxy, req{path: "/orders/1", headers: map[string]string{"authorization": "Bearer " + tok, "x-forwarded-client-cert": xfcc}}))
	// The last element is the nearest proxy's: an earlier one is the client's own claim.
	spoofed := `Hash=` + hashA + `,Hash=` + strings.Repeat("0", 64)
	denied(t, check(t, viaProxy, req{path: "/orders/1", headers: map[string]string{"authorization": "Bearer " + tok, "x-forwarded-client-cert": spoofed}}),
		codes.Unauthenticated, typev3.StatusCode_Unauthorized)
	// Hash= alone serves too.
	allowed(t, check(t, viaProxy, req{path: "/orders/1", headers: map[string]string{"authorization": "Bearer " + tok, "x-forwarded-client-cert": "Hash=" + hashA}}))
	_ = certB
}

// TestIntrospectedTokensAreBound: an introspection answer's cnf binds an
// opaque token the same way (RFC 9449 §6.2, RFC 8705 §3.2).
func TestIntrospectedTokensAreBound(t *testing.T) {
	f := newIntroFixture(t, "client_secret_basic")
	f.cfg.Issuers[0].DPoP = &verify.DPoPConfig{}
	c, _ := f.start(t)
	client := newDPoPClient(t)
	tok := f.opaque(map[string]any{"cnf": map[string]any{"jkt": client.jkt}})
	denied(t, check(t, c, req{path: "/orders/1", headers: bearer(tok)}), codes.Unauthenticated, typev3.StatusCode_Unauthorized, `error="invalid_token"`)
	allowed(t, check(t, c, dpopReq("GET", "/orders/1", tok, client.proof("GET", dpopHost+"/orders/1", tok, nil))))
}
