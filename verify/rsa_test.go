package verify

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"math/big"
	"strings"
	"sync"
	"testing"
)

var (
	rsaTestKeysOnce sync.Once
	rsaTestKeys     []*rsa.PrivateKey
)

// testRSAKeys are 2048-, 3072- and 4096-bit keys, made once per test binary.
func testRSAKeys(t testing.TB) []*rsa.PrivateKey {
	rsaTestKeysOnce.Do(func() {
		for _, bits := range []int{2048, 3072, 4096} {
			k, err := rsa.GenerateKey(rand.Reader, bits)
			if err != nil {
				panic(err)
			}
			rsaTestKeys = append(rsaTestKeys, k)
		}
	})
	return rsaTestKeys
}

func digest(h crypto.Hash, input string) []byte {
	switch h {
	case crypto.SHA256:
		s := sha256.Sum256([]byte(input))
		return s[:]
	case crypto.SHA384:
		s := sha512.Sum384([]byte(input))
		return s[:]
	}
	s := sha512.Sum512([]byte(input))
	return s[:]
}

// rawSign is the RSA private operation on an arbitrary encoded message, so
// tests can make signatures over blocks a signer never would.
func rawSign(k *rsa.PrivateKey, em []byte) []byte {
	m := new(big.Int).SetBytes(em)
	s := new(big.Int).Exp(m, k.D, k.N)
	return s.FillBytes(make([]byte, k.Size()))
}

// agree checks that rsaKey and crypto/rsa give the same answer and that the
// answer is want.
func agree(t *testing.T, name string, k *rsa.PrivateKey, h crypto.Hash, input string, sig []byte, want bool) {
	t.Helper()
	rk := newRSAKey(&k.PublicKey)
	if rk == nil {
		t.Fatalf("%s: no precomputed key for a valid %d-bit key", name, k.N.BitLen())
	}
	std := rsa.VerifyPKCS1v15(&k.PublicKey, h, digest(h, input), sig) == nil
	got := rk.verifyPKCS1v15(h, input, sig)
	if got != std || got != want {
		t.Errorf("%s (%d bits, %v): verifyPKCS1v15 = %v, crypto/rsa = %v, want %v", name, k.N.BitLen(), h, got, std, want)
	}
}

func TestRSAKeyMatchesCryptoRSA(t *testing.T) {
	const input = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ"
	for _, k := range testRSAKeys(t) {
		for _, h := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
			sig, err := rsa.SignPKCS1v15(nil, k, h, digest(h, input))
			if err != nil {
				t.Fatal(err)
			}
			agree(t, "valid", k, h, input, sig, true)
			agree(t, "other input", k, h, input+"x", sig, false)
			for _, other := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
				if other != h {
					agree(t, "signed with another hash", k, other, input, sig, false)
				}
			}
			for _, i := range []int{0, 1, len(sig) / 2, len(sig) - 1} {
				b := append([]byte(nil), sig...)
				b[i] ^= 0x01
				agree(t, "bit flipped", k, h, input, b, false)
			}
			agree(t, "empty", k, h, input, nil, false)
			agree(t, "truncated", k, h, input, sig[1:], false)
			agree(t, "short by its last byte", k, h, input, sig[:len(sig)-1], false)
			agree(t, "leading zero added", k, h, input, append([]byte{0}, sig...), false)
			agree(t, "trailing byte added", k, h, input, append(append([]byte(nil), sig...), 0), false)
			agree(t, "zero", k, h, input, make([]byte, len(sig)), false)
			agree(t, "modulus", k, h, input, k.N.FillBytes(make([]byte, len(sig))), false)
			agree(t, "modulus plus the signature", k, h, input,
				new(big.Int).Add(k.N, new(big.Int).SetBytes(sig)).FillBytes(make([]byte, len(sig)+1))[1:], false)
			ff := make([]byte, len(sig))
			for i := range ff {
				ff[i] = 0xff
			}
			agree(t, "all ones", k, h, input, ff, false)

			// Blocks a real signer never makes, signed with the private key:
			// what a padding parser rather than a comparison would accept.
			hashed := digest(h, input)
			prefix := digestInfo[h]
			block := func(bt byte, ps int, tail ...[]byte) []byte {
				em := []byte{0x00, bt}
				for range ps {
					em = append(em, 0xff)
				}
				em = append(em, 0x00)
				for _, p := range tail {
					em = append(em, p...)
				}
				for len(em) < k.Size() {
					em = append(em, 0x5a) // garbage after the hash (BERserk-like)
				}
				return em[:k.Size()]
			}
			full := k.Size() - len(prefix) - len(hashed) - 3
			agree(t, "well-formed block, made here", k, h, input, rawSign(k, block(0x01, full, prefix, hashed)), true)
			agree(t, "block type 2", k, h, input, rawSign(k, block(0x02, full, prefix, hashed)), false)
			agree(t, "short padding, garbage after the hash", k, h, input, rawSign(k, block(0x01, 8, prefix, hashed)), false)
			agree(t, "no DigestInfo", k, h, input, rawSign(k, block(0x01, full+len(prefix), hashed)), false)
			noNull := append(append([]byte(nil), prefix[:len(prefix)-4]...), prefix[len(prefix)-2:]...)
			noNull[1] -= 2
			noNull[3] -= 2
			agree(t, "DigestInfo without its NULL", k, h, input, rawSign(k, block(0x01, full+2, noNull, hashed)), false)
			zeros := block(0x01, full, prefix, hashed)
			zeros[5] = 0x00
			agree(t, "a zero in the padding", k, h, input, rawSign(k, zeros), false)
		}
	}
}

func TestRSAKeyRefusesWhatCryptoRSARefuses(t *testing.T) {
	k := testRSAKeys(t)[0]
	for name, pub := range map[string]*rsa.PublicKey{
		"even modulus":  {N: new(big.Int).Add(k.N, big.NewInt(1)), E: k.E},
		"exponent 1":    {N: k.N, E: 1},
		"even exponent": {N: k.N, E: 65536},
		"huge exponent": {N: k.N, E: 1 << 31},
		"no modulus":    {E: k.E},
	} {
		if newRSAKey(pub) != nil {
			t.Errorf("%s: precomputed, so crypto/rsa would not give the answer", name)
		}
	}
}

// FuzzRSAVerify checks that no signature, however malformed, verifies here
// and not in crypto/rsa, or the other way round.
func FuzzRSAVerify(f *testing.F) {
	k := testRSAKeys(f)[0]
	rk := newRSAKey(&k.PublicKey)
	const input = "header.payload"
	sig, _ := rsa.SignPKCS1v15(nil, k, crypto.SHA256, digest(crypto.SHA256, input))
	f.Add(sig, uint16(0), byte(0))
	f.Add(sig[:100], uint16(3), byte(1))
	f.Fuzz(func(t *testing.T, s []byte, at uint16, x byte) {
		if len(s) > 0 {
			s = append([]byte(nil), s...)
			s[int(at)%len(s)] ^= x
		}
		std := rsa.VerifyPKCS1v15(&k.PublicKey, crypto.SHA256, digest(crypto.SHA256, input), s) == nil
		if got := rk.verifyPKCS1v15(crypto.SHA256, input, s); got != std {
			t.Fatalf("verifyPKCS1v15 = %v, crypto/rsa = %v for %x", got, std, s)
		}
	})
}

func TestSum256MatchesSHA256(t *testing.T) {
	for _, n := range []int{0, 1, 31, 32, 33, 511, 512, 513, 1024, 5000} {
		s := strings.Repeat("abcdefghijklmnopqrstuvwxyz", n/26+1)[:n]
		if sum256(s) != sha256.Sum256([]byte(s)) {
			t.Errorf("length %d: digests differ", n)
		}
	}
}

// BenchmarkRSAVerify: a 2048-bit RS256 verify by crypto/rsa (which converts
// the key, R² mod N included, on every call) and by rsaKey (converted once).
func BenchmarkRSAVerify(b *testing.B) {
	k := testRSAKeys(b)[0]
	const input = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEiLCJhdWQiOiJvcmRlcnMtYXBpIn0"
	sig, _ := rsa.SignPKCS1v15(nil, k, crypto.SHA256, digest(crypto.SHA256, input))
	b.Run("crypto-rsa", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			h := sha256.Sum256([]byte(input))
			if rsa.VerifyPKCS1v15(&k.PublicKey, crypto.SHA256, h[:], sig) != nil {
				b.Fatal("verify failed")
			}
		}
	})
	b.Run("precomputed", func(b *testing.B) {
		rk := newRSAKey(&k.PublicKey)
		b.ReportAllocs()
		for b.Loop() {
			if !rk.verifyPKCS1v15(crypto.SHA256, input, sig) {
				b.Fatal("verify failed")
			}
		}
	})
}
