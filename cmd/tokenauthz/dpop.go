package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v2/jwa"
	"github.com/lestrrat-go/jwx/v2/jwk"
	"github.com/lestrrat-go/jwx/v2/jws"
)

// The demo's DPoP client: a P-256 key in a private JWK file, and proofs
// signed with it (RFC 9449 §4), so the DPoP path can be tried with grpcurl.

type proofOptions struct {
	keyFile, method, url, token, tokenFile, nonce string
}

// loadOrMakeProofKey reads the private JWK in path, or makes a P-256 key
// and writes it there (0600).
func loadOrMakeProofKey(path string) (jwk.Key, error) {
	if b, err := os.ReadFile(path); err == nil {
		k, err := jwk.ParseKey(b)
		if err != nil {
			return nil, fmt.Errorf("%s: not a JWK: %w", path, err)
		}
		return k, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	raw, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	k, err := jwk.FromRaw(raw)
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(k)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o600); err != nil {
		return nil, err
	}
	return k, nil
}

// thumbprint is the RFC 7638 SHA-256 thumbprint of k's public key, as
// cnf.jkt carries it.
func thumbprint(k jwk.Key) (string, error) {
	pub, err := k.PublicKey()
	if err != nil {
		return "", err
	}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(tp), nil
}

func dpopProof(o proofOptions) (string, error) {
	if o.keyFile == "" || o.url == "" {
		return "", errors.New("--key and --url are required")
	}
	tok := o.token
	switch {
	case tok != "" && o.tokenFile != "":
		return "", errors.New("give --token or --token-file, not both")
	case o.tokenFile != "":
		b, err := os.ReadFile(o.tokenFile)
		if err != nil {
			return "", err
		}
		tok = strings.TrimSpace(string(b))
	case tok == "":
		return "", errors.New("--token or --token-file is required")
	}
	u, err := url.Parse(o.url)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return "", fmt.Errorf("--url %q: want scheme://host/path", o.url)
	}
	u.RawQuery, u.Fragment = "", ""
	k, err := loadOrMakeProofKey(o.keyFile)
	if err != nil {
		return "", err
	}
	return signProof(k, o.method, u.String(), tok, o.nonce)
}

// signProof signs a DPoP proof with k for one request (RFC 9449 §4.2).
func signProof(k jwk.Key, method, htu, tok, nonce string) (string, error) {
	pub, err := k.PublicKey()
	if err != nil {
		return "", err
	}
	jti := make([]byte, 16)
	_, _ = rand.Read(jti)
	ath := sha256.Sum256([]byte(tok))
	claims := map[string]any{"jti": base64.RawURLEncoding.EncodeToString(jti), "htm": method, "htu": htu,
		"iat": time.Now().Unix(), "ath": base64.RawURLEncoding.EncodeToString(ath[:])}
	if nonce != "" {
		claims["nonce"] = nonce
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	hdr := jws.NewHeaders()
	_ = hdr.Set(jws.TypeKey, "dpop+jwt")
	_ = hdr.Set(jws.JWKKey, pub)
	signed, err := jws.Sign(payload, jws.WithKey(jwa.ES256, k, jws.WithProtectedHeaders(hdr)))
	if err != nil {
		return "", err
	}
	return string(signed), nil
}

// jwsPayload decodes a compact JWS's payload part.
func jwsPayload(part string) ([]byte, error) {
	return base64.RawURLEncoding.DecodeString(part)
}
