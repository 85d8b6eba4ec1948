package verify

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"

	"github.com/tokenauthz/tokenauthz/cache"
)

type keyType int

const (
	ktyRSA keyType = iota + 1
	ktyEC
	ktyOKP
	ktyOct
)

// minRSABits: RSA keys below this are ignored when a set is loaded (RFC 7518
// §3.3 requires 2048).
const minRSABits = 2048

type algSpec struct {
	kty       keyType
	curve     elliptic.Curve // for ES*
	minSecret int            // for HS*: hash output size in bytes
	pkcs1     crypto.Hash    // for RS*: verified by rsaKey when the key has one
	verifier  jws.Verifier
}

// algorithms is every algorithm an issuer may allow. Verifiers are looked up
// once here rather than per token.
var algorithms = func() map[string]algSpec {
	m := map[string]algSpec{
		"RS256": {kty: ktyRSA, pkcs1: crypto.SHA256}, "RS384": {kty: ktyRSA, pkcs1: crypto.SHA384}, "RS512": {kty: ktyRSA, pkcs1: crypto.SHA512},
		"PS256": {kty: ktyRSA}, "PS384": {kty: ktyRSA}, "PS512": {kty: ktyRSA},
		"ES256": {kty: ktyEC, curve: elliptic.P256()},
		"ES384": {kty: ktyEC, curve: elliptic.P384()},
		"ES512": {kty: ktyEC, curve: elliptic.P521()},
		"EdDSA": {kty: ktyOKP},
		"HS256": {kty: ktyOct, minSecret: 32},
		"HS384": {kty: ktyOct, minSecret: 48},
		"HS512": {kty: ktyOct, minSecret: 64},
	}
	for name, s := range m {
		v, err := jws.NewVerifier(jwa.SignatureAlgorithm(name))
		if err != nil {
			panic("verify: jwx lacks " + name + ": " + err.Error())
		}
		s.verifier = v
		m[name] = s
	}
	return m
}()

func supportedAlgorithms() string {
	names := make([]string, 0, len(algorithms))
	for n := range algorithms {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// verifyKey is one usable public key (or HMAC secret) in raw form, so the hot
// path does no JWK conversion.
type verifyKey struct {
	kid   string
	alg   string // the key's own alg, "" if the set did not say
	kty   keyType
	curve elliptic.Curve
	raw   any // *rsa.PublicKey, *ecdsa.PublicKey, ed25519.PublicKey or []byte
	rsa   *rsaKey
}

// verify checks sig over input with k for alg (spec), which k fits.
func (k *verifyKey) verify(spec algSpec, input string, sig []byte) bool {
	if spec.pkcs1 != 0 && k.rsa != nil {
		return k.rsa.verifyPKCS1v15(spec.pkcs1, input, sig)
	}
	return spec.verifier.Verify([]byte(input), sig, k.raw) == nil
}

// fits reports whether k may verify a token signed with alg: the key type must
// match the algorithm family (this is what stops RS/HS confusion), the curve
// must match, and a key that names its own alg only serves that alg.
func (k *verifyKey) fits(alg string, spec algSpec) bool {
	if k.kty != spec.kty || (k.alg != "" && k.alg != alg) {
		return false
	}
	if spec.kty == ktyEC && k.curve != spec.curve {
		return false
	}
	return true
}

// keySet is an immutable snapshot of an issuer's keys.
type keySet struct {
	keys      []verifyKey
	fetchedAt time.Time
	// refreshAt is when the set should be refreshed; it keeps serving until
	// refreshAt+MaxStale if refreshes fail.
	refreshAt time.Time
	skipped   int          // keys in the document that cannot verify (enc, weak, oct, …)
	doc       []byte       // the JWKS document, for publishing to the fleet's Redis tier; nil without one
	sum       [32]byte     // the document's SHA-256: the same document keeps its generation
	src       cache.Source // where it was loaded from
	gen       uint64       // the content's generation (remoteKeys.gen)
}

func (s *keySet) hasKid(kid string) bool {
	for i := range s.keys {
		if s.keys[i].kid == kid {
			return true
		}
	}
	return false
}

// parseKeySet reads a JWKS document and keeps the keys usable for signature
// verification. Keys for encryption (use: enc, or key_ops without verify),
// RSA keys under 2048 bits, symmetric keys (HMAC secrets belong in a secret
// file, not a published set) and unknown types are skipped. A set with no
// usable key is an error, so a broken publication never replaces good keys.
func parseKeySet(b []byte, maxKeys int) (*keySet, error) {
	set, err := jwk.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("key set: %w", err)
	}
	if set.Len() > maxKeys {
		return nil, fmt.Errorf("key set has %d keys, more than the limit of %d", set.Len(), maxKeys)
	}
	ks := &keySet{sum: sha256.Sum256(b)}
	for i := 0; i < set.Len(); i++ {
		k, _ := set.Key(i)
		vk, ok := toVerifyKey(k)
		if !ok {
			ks.skipped++
			continue
		}
		ks.keys = append(ks.keys, vk)
	}
	if len(ks.keys) == 0 {
		return nil, fmt.Errorf("key set has no usable signature verification key (%d skipped)", ks.skipped)
	}
	return ks, nil
}

func toVerifyKey(k jwk.Key) (verifyKey, bool) {
	if use := k.KeyUsage(); use != "" && use != string(jwk.ForSignature) {
		return verifyKey{}, false
	}
	if ops := k.KeyOps(); len(ops) > 0 {
		canVerify := false
		for _, op := range ops {
			if op == jwk.KeyOpVerify {
				canVerify = true
			}
		}
		if !canVerify {
			return verifyKey{}, false
		}
	}
	raw, err := jwk.PublicRawKeyOf(k)
	if err != nil {
		return verifyKey{}, false
	}
	vk := verifyKey{kid: k.KeyID()}
	if a := k.Algorithm(); a != nil {
		vk.alg = a.String()
	}
	switch pk := raw.(type) {
	case *rsa.PublicKey:
		if pk.N.BitLen() < minRSABits {
			return verifyKey{}, false
		}
		vk.kty, vk.raw, vk.rsa = ktyRSA, pk, newRSAKey(pk)
	case *ecdsa.PublicKey:
		vk.kty, vk.curve, vk.raw = ktyEC, pk.Curve, pk
	case ed25519.PublicKey:
		if len(pk) != ed25519.PublicKeySize {
			return verifyKey{}, false // ed25519.Verify panics on another length
		}
		vk.kty, vk.raw = ktyOKP, pk
	default:
		return verifyKey{}, false
	}
	return vk, true
}
