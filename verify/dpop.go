package verify

import (
	"context"
	"crypto"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
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
	// Unsupported names a cnf member this server cannot check (jwk, kid,
	// x5t, a differently-cased JKT, …), or "{}" for an empty cnf: the
	// token is bound, to something we cannot verify.
	Unsupported string
}

// Bound reports whether the token carries a confirmation (checkable or not).
func (b Binding) Bound() bool {
	return b.JKT != "" || b.X5TS256 != "" || b.Malformed || b.Unsupported != ""
}

// Binding reads the result's cnf claim: the token's, or the introspection
// answer's (RFC 9449 §6.2, RFC 8705 §3.2). Member names are exact (JSON is
// case-sensitive); any member besides jkt and x5t#S256 is a confirmation
// method we do not check, and so makes the binding unsupported, never
// ignored.
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
	for name, val := range m {
		switch name {
		case "jkt":
			if b.JKT, ok = val.(string); !ok || b.JKT == "" {
				return Binding{Malformed: true}
			}
		case "x5t#S256":
			if b.X5TS256, ok = val.(string); !ok || b.X5TS256 == "" {
				return Binding{Malformed: true}
			}
		default:
			if b.Unsupported == "" || name < b.Unsupported { // deterministic: the first by name
				b.Unsupported = name
			}
		}
	}
	if len(m) == 0 {
		b.Unsupported = "{}"
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

// proofs checks DPoP proofs for one issuer. What must outlive a reload
// (seen jtis, nonce keys, parsed proof keys) is in mem, shared by every
// issuer of the process and keyed by the issuer's identity (its iss).
type proofs struct {
	cfg    DPoPConfig
	algs   map[string]algSpec
	leeway time.Duration
	now    func() time.Time
	mem    *dpopMemory
	shared *cache.Shared
	issuer string
}

type proofKey struct {
	key verifyKey
	jkt string
}

// dpopMemory is the process's DPoP state, carried from Verifier to
// Verifier by Reload: a reload that changes an issuer must not forget the
// proofs it has seen, or a proof could be replayed right after it.
type dpopMemory struct {
	seen jtiSet
	// since is when seen started: a proof made before it may have been
	// seen by a process before this one, so it is accepted only when Redis
	// vouches for its jti.
	since time.Time
	// keys are parsed proof keys by the SHA-256 of their JSON: a client
	// signs every proof with one key. Bounded by bytes and age, so a flood
	// of distinct keys evicts, never grows; failures are not kept.
	keys *cache.Cache[*proofKey]

	mu     sync.Mutex
	nonces map[string]*nonceKeys // by iss
}

const (
	proofKeyCacheBytes = 4 << 20
	proofKeyTTL        = 10 * time.Minute
)

func newDPoPMemory(now func() time.Time) *dpopMemory {
	return &dpopMemory{
		since: now(),
		keys: cache.New(cache.Options{MaxBytes: proofKeyCacheBytes, Now: now}, func(k *proofKey) int {
			n := 64 + len(k.jkt)
			if pk, ok := k.key.raw.(*rsa.PublicKey); ok {
				n += len(pk.N.Bits()) * 8
				if k.key.rsa != nil {
					n += 2 * len(pk.N.Bits()) * 8 // the modulus and its R²
				}
			}
			return n
		}),
		nonces: map[string]*nonceKeys{},
	}
}

func (m *dpopMemory) nonceKeysOf(iss string) *nonceKeys {
	m.mu.Lock()
	defer m.mu.Unlock()
	nk := m.nonces[iss]
	if nk == nil {
		nk = &nonceKeys{}
		m.nonces[iss] = nk
	}
	return nk
}

func newProofs(c *DPoPConfig, leeway time.Duration, now func() time.Time, shared *cache.Shared, issuer string, mem *dpopMemory) *proofs {
	cfg := *c
	if len(cfg.Algorithms) == 0 {
		cfg.Algorithms = defaultDPoPAlgorithms
	}
	if cfg.MaxAge == 0 {
		cfg.MaxAge = defaultDPoPMaxAge
	}
	p := &proofs{cfg: cfg, algs: map[string]algSpec{}, leeway: leeway, now: now, shared: shared, issuer: issuer, mem: mem}
	mem.seen.atLeast(p.window())
	for _, a := range cfg.Algorithms {
		p.algs[a] = algorithms[a]
	}
	return p
}

// window is how long a proof's jti must be remembered: as long as a proof
// carrying it could be accepted.
func (p *proofs) window() time.Duration { return p.cfg.MaxAge + 2*p.leeway }

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
	// Cheap checks first, the signature last but one: a proof that fails
	// any rule costs no public-key operation, whatever key it carries.
	pk, err := p.key(hdr.JWK)
	if err != nil {
		return err
	}
	if !pk.key.fits(hdr.Alg, spec) {
		return badProof("the DPoP proof's jwk does not fit its alg")
	}
	if pk.jkt != r.JKT {
		return &Error{Kind: Invalid, Reason: "dpop_key_mismatch", Desc: "the token is bound to another key than the DPoP proof's"}
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
	if !pk.key.verify(spec, proof[:len(h)+1+len(pl)], sig) {
		return badProof("the DPoP proof's signature is invalid")
	}
	if p.cfg.Nonce && (claims.Nonce == nil || !p.validNonce(ctx, *claims.Nonce)) {
		return &Error{Kind: Invalid, Reason: ReasonUseNonce, Desc: "a fresh DPoP nonce is required"}
	}
	// Replay: each proof is used once, here and across the fleet. A jti is
	// remembered as long as a proof carrying it could be accepted, under
	// the issuer's identity, across reloads (mem) and, with Redis, across
	// restarts and pods.
	jtiKey := "dpop-jti:" + p.issuer + ":" + cache.Hash(pk.jkt, *claims.JTI)
	if !p.mem.seen.add(jtiKey, now) {
		return badProof("the DPoP proof has been used before")
	}
	vouched := false
	if p.shared != nil {
		first, err := p.shared.Claim(ctx, jtiKey, p.window())
		if err == nil && !first {
			return badProof("the DPoP proof has been used before")
		}
		vouched = err == nil
	}
	// Without Redis's word, this process knows only the proofs it saw: one
	// made before it started may have been used with the process before
	// (a restart, a new pod). The client makes a new proof.
	if !vouched && issued.Before(p.mem.since.Truncate(time.Second)) {
		return badProof("the DPoP proof predates this server's replay memory; make a new proof")
	}
	return nil
}

// key parses a proof's jwk, once per key while it is in use.
func (p *proofs) key(raw []byte) (*proofKey, error) {
	sum := sha256.Sum256(raw)
	id := string(sum[:])
	if pk, ok := p.mem.keys.Peek(id); ok {
		return pk, nil
	}
	pk, err := parseProofKey(raw)
	if err != nil {
		return nil, err // not kept: a bad key must not evict good ones
	}
	p.mem.keys.Set(id, pk, proofKeyTTL)
	return pk, nil
}

// Proof key bounds: RSA moduli of 2048 to 4096 bits (a larger one would make
// every verify cost milliseconds), exponents odd and at most 65537.
const (
	minProofRSABits = 2048
	maxProofRSABits = 4096
	maxRSAExponent  = 65537
)

func parseProofKey(raw []byte) (*proofKey, error) {
	var members map[string]json.RawMessage
	if json.Unmarshal(raw, &members) != nil {
		return nil, badProof("the DPoP proof's jwk is not a JSON object")
	}
	for _, private := range []string{"d", "p", "q", "dp", "dq", "qi", "oth", "k"} {
		if _, ok := members[private]; ok {
			return nil, badProof("the DPoP proof's jwk holds private or symmetric key material")
		}
	}
	k, err := jwk.ParseKey(raw)
	if err != nil {
		return nil, badProof("the DPoP proof's jwk is not a public key")
	}
	vk, ok := toVerifyKey(k)
	if !ok {
		return nil, badProof("the DPoP proof's jwk is not a usable public key")
	}
	if rk, isRSA := vk.raw.(*rsa.PublicKey); isRSA {
		if bits := rk.N.BitLen(); bits < minProofRSABits || bits > maxProofRSABits || rk.E < 3 || rk.E > maxRSAExponent || rk.E%2 == 0 {
			return nil, badProof("the DPoP proof's RSA key is outside the accepted sizes (2048 to 4096 bits, exponent odd and at most 65537)")
		}
	}
	vk.alg = "" // the proof's alg is checked against the issuer's list
	tp, err := k.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, badProof("the DPoP proof's jwk has no thumbprint")
	}
	return &proofKey{key: vk, jkt: base64.RawURLEncoding.EncodeToString(tp)}, nil
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
	sum := sum256(tok)
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// Nonces are stateless: the time they were issued and an HMAC over it with
// a key shared by the fleet through Redis (without Redis, this process's
// own), valid for max_age.
//
// nonceKeys are one issuer's nonce keys. The pod starts with a key of its
// own and agrees with Redis on first use and every nonceResync after (and
// at once, at most every second, when a nonce fails): Redis's key wins,
// and where Redis has none (never set, or its data lost) ours is written
// back, as revocations are. A key replaced by the agreement stays valid
// for the nonces it made, so a pod that could not reach Redis when it
// first needed a key still accepts the nonces it issued.
type nonceKeys struct {
	mu      sync.Mutex
	cur     []byte
	old     []oldNonceKey
	synced  time.Time // zero: never agreed with Redis
	syncing sync.Mutex
}

type oldNonceKey struct {
	key   []byte
	until time.Time
}

const (
	nonceResync = 10 * time.Second
	// maxOldNonceKeys bounds the replaced keys kept (each for the longest
	// max_age, 10 minutes).
	maxOldNonceKeys = 4
)

// keys returns the key to issue with and every key to accept.
func (p *proofs) nonceKeys(ctx context.Context, urgent bool) (cur []byte, all [][]byte) {
	nk := p.mem.nonceKeysOf(p.issuer)
	now := p.now()
	nk.mu.Lock()
	if nk.cur == nil {
		nk.cur = make([]byte, 32)
		_, _ = rand.Read(nk.cur)
	}
	since := now.Sub(nk.synced)
	due := p.shared != nil && (nk.synced.IsZero() || since >= nonceResync || urgent && since >= time.Second)
	mine := nk.cur
	nk.mu.Unlock()
	if due && nk.syncing.TryLock() {
		got, err := p.shared.SecretOr(ctx, "dpop-nonce-key:"+p.issuer, mine)
		nk.mu.Lock()
		if err == nil && !hmac.Equal(got, nk.cur) {
			nk.old = append(nk.old, oldNonceKey{key: nk.cur, until: now.Add(10 * time.Minute)})
			if len(nk.old) > maxOldNonceKeys {
				nk.old = nk.old[len(nk.old)-maxOldNonceKeys:]
			}
			nk.cur = got
		}
		// After a failure, try again in a second, not on every request.
		nk.synced = now
		if err != nil {
			nk.synced = now.Add(time.Second - nonceResync)
		}
		nk.mu.Unlock()
		nk.syncing.Unlock()
	}
	nk.mu.Lock()
	defer nk.mu.Unlock()
	all = append(all, nk.cur)
	for _, o := range nk.old {
		if now.Before(o.until) {
			all = append(all, o.key)
		}
	}
	return nk.cur, all
}

// Nonce issues a fresh nonce.
func (p *proofs) Nonce(ctx context.Context) string {
	key, _ := p.nonceKeys(ctx, false)
	var b [8 + 32]byte
	binary.BigEndian.PutUint64(b[:8], uint64(p.now().Unix()))
	m := hmac.New(sha256.New, key)
	m.Write(b[:8])
	copy(b[8:], m.Sum(nil))
	return base64.RawURLEncoding.EncodeToString(b[:])
}

func (p *proofs) validNonce(ctx context.Context, n string) bool {
	b, err := base64.RawURLEncoding.DecodeString(n)
	if err != nil || len(b) != 40 {
		return false
	}
	issued := time.Unix(int64(binary.BigEndian.Uint64(b[:8])), 0)
	now := p.now()
	if issued.After(now.Add(p.leeway)) || now.Sub(issued) > p.cfg.MaxAge {
		return false
	}
	signedBy := func(keys [][]byte) bool {
		for _, k := range keys {
			m := hmac.New(sha256.New, k)
			m.Write(b[:8])
			if hmac.Equal(m.Sum(nil), b[8:]) {
				return true
			}
		}
		return false
	}
	_, keys := p.nonceKeys(ctx, false)
	if signedBy(keys) {
		return true
	}
	// Perhaps another pod's key that Redis now holds: agree, then look again.
	_, keys = p.nonceKeys(ctx, true)
	return signedBy(keys)
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
// its private key to make. The window is the longest any issuer needs.
type jtiSet struct {
	mu        sync.Mutex
	cur, prev map[string]struct{}
	rotated   time.Time
	window    time.Duration
}

// atLeast makes the set remember jtis for at least w.
func (s *jtiSet) atLeast(w time.Duration) {
	s.mu.Lock()
	s.window = max(s.window, w)
	s.mu.Unlock()
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
