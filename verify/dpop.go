package verify

import (
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math"
	"net/url"
	"strings"
	"sync"
	"time"

	jsonv2 "github.com/go-json-experiment/json"
	"github.com/go-json-experiment/json/jsontext"
	"github.com/lestrrat-go/jwx/v2/jwk"

	"github.com/tokenauthz/tokenauthz/cache"
)

// DPoPConfig turns on DPoP (RFC 9449) proofs for an issuer's tokens.
type DPoPConfig struct {
	// Algorithms a proof may be signed with: asymmetric only. Default
	// [ES256, EdDSA, PS256].
	Algorithms []string `yaml:"algorithms"`
	// MaxAge is how old a proof's iat may be (plus the issuer's leeway).
	// Default 60s.
	MaxAge time.Duration `yaml:"max_age"`
	// Nonce requires server-issued nonces in proofs (401 use_dpop_nonce with
	// a fresh DPoP-Nonce header otherwise). Nonces are valid fleet-wide when
	// the Redis tier is on, else on the pod that issued them.
	Nonce bool `yaml:"nonce"`
}

var defaultDPoPAlgorithms = []string{"ES256", "EdDSA", "PS256"}

const defaultDPoPMaxAge = 60 * time.Second

func (c *DPoPConfig) validate() []string {
	var p []string
	for i, a := range c.Algorithms {
		spec, ok := algorithms[a]
		switch {
		case !ok:
			p = append(p, fmt.Sprintf("dpop.algorithms[%d]: %q is not one of %s", i, a, supportedAlgorithms()))
		case spec.kty == ktyOct:
			p = append(p, fmt.Sprintf("dpop.algorithms[%d]: %s is symmetric; a proof is signed with the client's private key", i, a))
		}
	}
	if c.MaxAge < 0 || c.MaxAge > 10*time.Minute {
		p = append(p, "dpop.max_age: between 0 (default 60s) and 10m")
	}
	return p
}

// Binding is what a token is bound to (RFC 9449 §6, RFC 8705 §3): the
// thumbprint of a DPoP key or of a client certificate. Empty: a bearer
// token.
type Binding struct {
	JKT       string // cnf.jkt: base64url SHA-256 JWK thumbprint (RFC 7638)
	X5TS256   string // cnf.x5t#S256: base64url SHA-256 of the certificate's DER
	Malformed bool   // cnf is present but not an object of strings
}

// Bound reports whether the token names a key or certificate.
func (b Binding) Bound() bool { return b.JKT != "" || b.X5TS256 != "" || b.Malformed }

// Binding reads the result's cnf claim: the token's, or the introspection
// answer's (RFC 9449 §6.2, RFC 8705 §3.2).
func (r *Result) Binding() Binding {
	v, ok := r.Claims["cnf"]
	if !ok {
		return Binding{}
	}
	m, ok := v.(map[string]any)
	if !ok {
		return Binding{Malformed: true}
	}
	var b Binding
	if j, present := m["jkt"]; present {
		if b.JKT, ok = j.(string); !ok || b.JKT == "" {
			return Binding{Malformed: true}
		}
	}
	if x, present := m["x5t#S256"]; present {
		if b.X5TS256, ok = x.(string); !ok || b.X5TS256 == "" {
			return Binding{Malformed: true}
		}
	}
	return b
}

// ProofRequest is what a DPoP proof must match.
type ProofRequest struct {
	Method string // the request's method
	URI    string // scheme://host[:port]/path: canonical, no query or fragment
	Token  string // the access token the proof accompanies
	JKT    string // the token's cnf.jkt
}

// DPoP error reasons: a proof that fails its rules is invalid_dpop_proof, a
// missing or stale nonce use_dpop_nonce (RFC 9449 §7.1, §8, §9).
const (
	ReasonInvalidProof = "invalid_dpop_proof"
	ReasonUseNonce     = "use_dpop_nonce"
	// ReasonUnbound: an unbound token sent with the DPoP scheme.
	ReasonUnbound = "not_dpop_bound"
)

func badProof(desc string) *Error {
	return &Error{Kind: Invalid, Reason: ReasonInvalidProof, Desc: desc}
}

// proofs checks DPoP proofs for one issuer.
type proofs struct {
	cfg     DPoPConfig
	algs    map[string]algSpec
	leeway  time.Duration
	now     func() time.Time
	seen    jtiSet // proof jtis seen here, until they are too old anyway
	keysMu  sync.RWMutex
	keys    map[string]*proofKey // the proof jwk's JSON → its parsed key: parsed once
	shared  *cache.Shared
	issuer  string
	nonceMu sync.Mutex
	nonceK  []byte
}

type proofKey struct {
	key verifyKey
	jkt string
	err error
}

const maxProofKeys = 10000

func newProofs(c *DPoPConfig, leeway time.Duration, now func() time.Time, shared *cache.Shared, issuer string) *proofs {
	cfg := *c
	if len(cfg.Algorithms) == 0 {
		cfg.Algorithms = defaultDPoPAlgorithms
	}
	if cfg.MaxAge == 0 {
		cfg.MaxAge = defaultDPoPMaxAge
	}
	p := &proofs{cfg: cfg, algs: map[string]algSpec{}, leeway: leeway, now: now, shared: shared, issuer: issuer,
		keys: map[string]*proofKey{}}
	p.seen.window = cfg.MaxAge + 2*leeway
	for _, a := range cfg.Algorithms {
		p.algs[a] = algorithms[a]
	}
	return p
}

// AlgList is the WWW-Authenticate algs attribute.
func (p *proofs) AlgList() string { return strings.Join(p.cfg.Algorithms, " ") }

// check verifies one proof against the request (RFC 9449 §4.3). It returns
// the error to answer with; a nonce problem is ReasonUseNonce.
func (p *proofs) check(ctx context.Context, proof string, r ProofRequest) error {
	if proof == "" {
		return badProof("a DPoP proof is required")
	}
	if len(proof) > 8192 {
		return badProof("the DPoP proof is too large")
	}
	if strings.Count(proof, ".") != 2 {
		return badProof("the DPoP proof is not a compact JWS")
	}
	h, rest, _ := strings.Cut(proof, ".")
	pl, s, _ := strings.Cut(rest, ".")
	hb, err1 := b64.DecodeString(h)
	pb, err2 := b64.DecodeString(pl)
	sig, err3 := b64.DecodeString(s)
	if err1 != nil || err2 != nil || err3 != nil || len(sig) == 0 {
		return badProof("the DPoP proof is not base64url")
	}
	// JSON v2 decoding: one pass that refuses duplicate names and invalid
	// UTF-8 and matches member names exactly (v1 would take "HTM" for htm).
	var hdr struct {
		Typ  string         `json:"typ"`
		Alg  string         `json:"alg"`
		JWK  jsontext.Value `json:"jwk"`
		Crit jsontext.Value `json:"crit"`
		JKU  jsontext.Value `json:"jku"`
		X5U  jsontext.Value `json:"x5u"`
		X5C  jsontext.Value `json:"x5c"`
	}
	if jsonv2.Unmarshal(hb, &hdr) != nil {
		return badProof("the DPoP proof header is malformed (or has duplicate names)")
	}
	switch {
	case !strings.EqualFold(hdr.Typ, "dpop+jwt"):
		return badProof("the DPoP proof's typ is not dpop+jwt")
	case strings.EqualFold(hdr.Alg, "none"):
		return badProof("an unsigned DPoP proof (alg none) is not accepted")
	case hdr.Crit != nil || hdr.JKU != nil || hdr.X5U != nil || hdr.X5C != nil:
		return badProof("the DPoP proof header has parameters that are not accepted (crit, jku, x5u, x5c)")
	case len(hdr.JWK) == 0:
		return badProof("the DPoP proof has no jwk")
	}
	spec, ok := p.algs[hdr.Alg]
	if !ok {
		return badProof("the DPoP proof's alg is not accepted")
	}
	pk := p.key(hdr.JWK)
	if pk.err != nil {
		return pk.err
	}
	if !pk.key.fits(hdr.Alg, spec) {
		return badProof("the DPoP proof's jwk does not fit its alg")
	}
	if spec.verifier.Verify([]byte(proof[:len(h)+1+len(pl)]), sig, pk.key.raw) != nil {
		return badProof("the DPoP proof's signature is invalid")
	}

	var claims struct {
		JTI   *string  `json:"jti"`
		HTM   *string  `json:"htm"`
		HTU   *string  `json:"htu"`
		IAT   *float64 `json:"iat"`
		ATH   *string  `json:"ath"`
		Nonce *string  `json:"nonce"`
	}
	if jsonv2.Unmarshal(pb, &claims) != nil {
		return badProof("the DPoP proof's claims are malformed (or have duplicate names)")
	}
	switch {
	case claims.JTI == nil || *claims.JTI == "" || len(*claims.JTI) > 256:
		return badProof("the DPoP proof has no jti")
	case claims.HTM == nil || *claims.HTM != r.Method:
		return badProof("the DPoP proof's htm does not match the request's method")
	case claims.HTU == nil || !sameTarget(*claims.HTU, r.URI):
		return badProof("the DPoP proof's htu does not match the request's URI")
	case claims.IAT == nil:
		return badProof("the DPoP proof has no iat")
	case claims.ATH == nil || *claims.ATH != accessTokenHash(r.Token):
		return badProof("the DPoP proof's ath does not match the access token")
	case pk.jkt != r.JKT:
		return &Error{Kind: Invalid, Reason: "dpop_key_mismatch", Desc: "the token is bound to another key than the DPoP proof's"}
	}
	now := p.now()
	iat := *claims.IAT
	if math.IsNaN(iat) || iat < 0 || iat > 253402300799 {
		return badProof("the DPoP proof's iat is out of range")
	}
	issued := time.Unix(0, int64(iat*1e9))
	if issued.Before(now.Add(-p.cfg.MaxAge - p.leeway)) {
		return badProof("the DPoP proof is too old")
	}
	if issued.After(now.Add(p.leeway)) {
		return badProof("the DPoP proof is issued in the future")
	}
	if p.cfg.Nonce && (claims.Nonce == nil || !p.validNonce(ctx, *claims.Nonce)) {
		return &Error{Kind: Invalid, Reason: ReasonUseNonce, Desc: "a fresh DPoP nonce is required"}
	}
	// Replay: each proof is used once, here and across the fleet. A jti is
	// remembered as long as a proof carrying it could be accepted.
	window := p.cfg.MaxAge + 2*p.leeway
	jtiKey := "dpop-jti:" + p.issuer + ":" + cache.Hash(pk.jkt, *claims.JTI)
	if !p.seen.add(jtiKey, now) {
		return badProof("the DPoP proof has been used before")
	}
	if p.shared != nil {
		first, err := p.shared.Claim(ctx, jtiKey, window)
		if err == nil && !first {
			return badProof("the DPoP proof has been used before")
		}
		// A Redis failure leaves the check on this pod only: Redis is a
		// shortcut, never a dependency (see the README's DPoP section).
	}
	return nil
}

// key parses a proof's jwk once: a client signs every proof with the same
// key. The cache is bounded; past the bound, keys are parsed every time.
func (p *proofs) key(raw []byte) *proofKey {
	p.keysMu.RLock()
	pk, ok := p.keys[string(raw)] // no allocation for the lookup
	p.keysMu.RUnlock()
	if ok {
		return pk
	}
	pk = parseProofKey(raw)
	p.keysMu.Lock()
	if len(p.keys) < maxProofKeys {
		p.keys[string(raw)] = pk
	}
	p.keysMu.Unlock()
	return pk
}

func parseProofKey(raw []byte) *proofKey {
	var members map[string]json.RawMessage
	if json.Unmarshal(raw, &members) != nil {
		return &proofKey{err: badProof("the DPoP proof's jwk is not a JSON object")}
	}
	for _, private := range []string{"d", "p", "q", "dp", "dq", "qi", "oth", "k"} {
		if _, ok := members[private]; ok {
			return &proofKey{err: badProof("the DPoP proof's jwk holds private or symmetric key material")}
		}
	}
	k, err := jwk.ParseKey(raw)
	if err != nil {
		return &proofKey{err: badProof("the DPoP proof's jwk is not a public key")}
	}
	vk, ok := toVerifyKey(k)
	if !ok {
		return &proofKey{err: badProof("the DPoP proof's jwk is not a usable public key")}
	}
	vk.alg = "" // the proof's alg is checked against the issuer's list
	tp, err := k.Thumbprint(crypto.SHA256)
	if err != nil {
		return &proofKey{err: badProof("the DPoP proof's jwk has no thumbprint")}
	}
	return &proofKey{key: vk, jkt: base64.RawURLEncoding.EncodeToString(tp)}
}

// sameTarget compares a proof's htu with the request's URI: scheme and host
// case-insensitively, default ports dropped, query and fragment ignored
// (RFC 9449 §4.3), the path exactly after the same canonicalization as the
// request's.
func sameTarget(htu, want string) bool {
	u, err := url.Parse(htu)
	if err != nil || u.Opaque != "" || u.User != nil || u.Host == "" {
		return false
	}
	scheme := strings.ToLower(u.Scheme)
	host := strings.ToLower(u.Hostname())
	port := u.Port()
	if scheme == "https" && port == "443" || scheme == "http" && port == "80" {
		port = ""
	}
	if strings.HasSuffix(host, ".") {
		host = host[:len(host)-1]
	}
	if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	path := u.EscapedPath()
	if path == "" {
		path = "/"
	}
	if l := strings.ToLower(path); strings.Contains(l, "%2f") || strings.Contains(l, "%5c") || strings.Contains(l, "%25") ||
		strings.ContainsAny(path, ";\\") {
		return false // the request side refuses these too: no canonical path could match
	}
	dec, err := url.PathUnescape(path)
	if err != nil {
		return false
	}
	got := scheme + "://" + host
	if port != "" {
		got += ":" + port
	}
	return got+dec == want
}

// TargetURI builds the URI a proof's htu must match: the scheme, the
// canonical host, the port unless it is the scheme's default, and the
// canonical (decoded) path.
func TargetURI(scheme, host, port, path string) string {
	scheme = strings.ToLower(scheme)
	if scheme == "https" && port == "443" || scheme == "http" && port == "80" {
		port = ""
	}
	u := scheme + "://" + host
	if port != "" {
		u += ":" + port
	}
	return u + path
}

func accessTokenHash(tok string) string {
	sum := sha256.Sum256([]byte(tok))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// Nonces are stateless: the time they were issued and an HMAC over it with
// a key shared by the fleet (through Redis; without it, this pod's own),
// valid for max_age.
func (p *proofs) nonceKey(ctx context.Context) []byte {
	p.nonceMu.Lock()
	defer p.nonceMu.Unlock()
	if p.nonceK != nil {
		return p.nonceK
	}
	if p.shared != nil {
		if k, err := p.shared.Secret(ctx, "dpop-nonce-key:"+p.issuer); err == nil {
			p.nonceK = k
			return k
		}
	}
	k := make([]byte, 32)
	_, _ = rand.Read(k)
	if p.shared == nil {
		p.nonceK = k // with Redis, try again next time
	}
	return k
}

// Nonce issues a fresh nonce.
func (p *proofs) Nonce(ctx context.Context) string {
	var b [8 + 32]byte
	binary.BigEndian.PutUint64(b[:8], uint64(p.now().Unix()))
	m := hmac.New(sha256.New, p.nonceKey(ctx))
	m.Write(b[:8])
	copy(b[8:], m.Sum(nil))
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func (p *proofs) validNonce(ctx context.Context, n string) bool {
	b, err := base64.RawURLEncoding.DecodeString(n)
	if err != nil || len(b) != 40 {
		return false
	}
	m := hmac.New(sha256.New, p.nonceKey(ctx))
	m.Write(b[:8])
	if !hmac.Equal(m.Sum(nil), b[8:]) {
		return false
	}
	issued := time.Unix(int64(binary.BigEndian.Uint64(b[:8])), 0)
	now := p.now()
	return !issued.After(now.Add(p.leeway)) && now.Sub(issued) <= p.cfg.MaxAge
}

// CertificateThumbprint is base64url(SHA-256(DER)) of the first certificate
// in a URL-encoded PEM (Envoy's attributes.source.certificate and XFCC's
// Cert=), for RFC 8705's x5t#S256.
func CertificateThumbprint(urlEncodedPEM string) (string, error) {
	p, err := url.QueryUnescape(urlEncodedPEM)
	if err != nil {
		return "", errors.New("the certificate is not URL-encoded")
	}
	block, _ := pem.Decode([]byte(p))
	if block == nil || block.Type != "CERTIFICATE" {
		return "", errors.New("no PEM certificate")
	}
	if _, err := x509.ParseCertificate(block.Bytes); err != nil {
		return "", errors.New("the certificate does not parse")
	}
	sum := sha256.Sum256(block.Bytes)
	return base64.RawURLEncoding.EncodeToString(sum[:]), nil
}

// DPoP is an issuer's proof checker, nil when the issuer has no dpop block.
func (i *Issuer) DPoP() *Proofs {
	if i.dpop == nil {
		return nil
	}
	return &Proofs{i.dpop}
}

// Proofs is the exported face of an issuer's DPoP checks.
type Proofs struct{ p *proofs }

// Check verifies proof for the request r (RFC 9449 §4.3).
func (p *Proofs) Check(ctx context.Context, proof string, r ProofRequest) error {
	return p.p.check(ctx, proof, r)
}

// Nonce issues a fresh server nonce.
func (p *Proofs) Nonce(ctx context.Context) string { return p.p.Nonce(ctx) }

// Algs is the list for WWW-Authenticate's algs attribute.
func (p *Proofs) Algs() string { return p.p.AlgList() }

// NonceRequired says whether proofs need a server nonce.
func (p *Proofs) NonceRequired() bool { return p.p.cfg.Nonce }

// jtiSet remembers proof jtis for at least window: two generations of sets,
// the older dropped when the newer is window old. It is exact (nothing is
// evicted early, as a size-bounded cache might under a flood); its size is
// the valid proofs of two windows, each of which needed a bound token and
// its private key to make.
type jtiSet struct {
	mu        sync.Mutex
	cur, prev map[string]struct{}
	rotated   time.Time
	window    time.Duration
}

func (s *jtiSet) add(key string, now time.Time) (fresh bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil || now.Sub(s.rotated) >= s.window {
		s.prev, s.cur, s.rotated = s.cur, map[string]struct{}{}, now
	}
	if _, ok := s.cur[key]; ok {
		return false
	}
	if _, ok := s.prev[key]; ok {
		return false
	}
	s.cur[key] = struct{}{}
	return true
}
