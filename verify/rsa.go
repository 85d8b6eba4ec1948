package verify

import (
	"bytes"
	"crypto"
	"crypto/fips140"
	"crypto/rsa"
	"crypto/sha512"
	"sync"

	"filippo.io/bigmod"
)

// rsaKey is an RSA public key with its Montgomery modulus computed once, when
// the key set is loaded.
//
// crypto/rsa converts the key into its internal form on every verify, and
// that conversion (the modulus' R² mod N) is a third of a 2048-bit verify: a
// fifth of a check of a never-seen token. The standard library has no way to
// keep it, so RS256/384/512 verify here with filippo.io/bigmod, the exported
// copy of the arithmetic crypto/rsa itself uses (crypto/internal/fips140/
// bigmod), and the same checks in the same order as crypto/rsa's
// VerifyPKCS1v15: a signature of exactly the modulus' length and below it,
// s^e mod N, and a comparison with the whole encoded message built from the
// hash. Building and comparing, rather than parsing the decrypted block, is
// what keeps this immune to the padding-parsing forgeries of RSA's past
// (Bleichenbacher 2006, BERserk). PSS stays on crypto/rsa. Tests compare it
// with crypto/rsa on valid, tampered and malformed signatures.
type rsaKey struct {
	n *bigmod.Modulus
	e uint
}

// newRSAKey precomputes pub, or returns nil when crypto/rsa must verify it
// itself: a key crypto/rsa would refuse (so its error stays the answer) or a
// FIPS 140-3 only build, whose rules live in crypto/rsa.
func newRSAKey(pub *rsa.PublicKey) *rsaKey {
	if fips140.Enforced() || pub.N == nil || pub.N.Sign() <= 0 || pub.N.Bit(0) == 0 ||
		pub.E < 3 || pub.E&1 == 0 || pub.E > 1<<31-1 {
		return nil
	}
	n, err := bigmod.NewModulus(pub.N.Bytes())
	if err != nil {
		return nil
	}
	return &rsaKey{n: n, e: uint(pub.E)}
}

// DigestInfo prefixes of RFC 8017 §9.2, note 1 (as in crypto/rsa).
var digestInfo = map[crypto.Hash][]byte{
	crypto.SHA256: {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20},
	crypto.SHA384: {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30},
	crypto.SHA512: {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40},
}

// emBuffers holds the expected encoded message per check; a 4096-bit key's
// is 512 bytes, too big to keep on the stack across the call.
var emBuffers = sync.Pool{New: func() any { return new([]byte) }}

// verifyPKCS1v15 reports whether sig is an RSASSA-PKCS1-v1_5 signature of
// input (RFC 8017 §8.2.2) under h, one of SHA-256/384/512.
func (k *rsaKey) verifyPKCS1v15(h crypto.Hash, input string, sig []byte) bool {
	prefix, ok := digestInfo[h]
	size := k.n.Size()
	// §8.2.2 step 1: a signature of another length is invalid.
	if !ok || len(sig) != size || size < len(prefix)+h.Size()+11 {
		return false
	}
	// Step 2: s must be below N (SetBytes refuses otherwise), m = s^e mod N.
	s, err := bigmod.NewNat().SetBytes(sig, k.n)
	if err != nil {
		return false
	}
	em := bigmod.NewNat().ExpShortVarTime(s, k.e, k.n).Bytes(k.n)

	// Steps 3–4: EM' = 0x00 || 0x01 || 0xff… || 0x00 || DigestInfo || H(M),
	// compared whole.
	bp := emBuffers.Get().(*[]byte)
	defer emBuffers.Put(bp)
	want := append((*bp)[:0], 0x00, 0x01)
	for range size - len(prefix) - h.Size() - 3 {
		want = append(want, 0xff)
	}
	want = append(want, 0x00)
	want = append(want, prefix...)
	switch h {
	case crypto.SHA256:
		sum := sum256(input)
		want = append(want, sum[:]...)
	case crypto.SHA384:
		sum := sha512.Sum384([]byte(input))
		want = append(want, sum[:]...)
	default:
		sum := sha512.Sum512([]byte(input))
		want = append(want, sum[:]...)
	}
	*bp = want
	return bytes.Equal(em, want)
}
