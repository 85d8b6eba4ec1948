package main

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tokenauthz/tokenauthz/cache"
	"github.com/tokenauthz/tokenauthz/proto/cachev1"
)

// revokeRequest is the body of POST /admin/revoke: exactly one of
// token_sha256, jti or sub; jti and sub name the issuer (its config name).
type revokeRequest struct {
	TokenSHA256 string `json:"token_sha256"`
	JTI         string `json:"jti"`
	Sub         string `json:"sub"`
	Issuer      string `json:"issuer"`
	// TTL (e.g. "1h") bounds how long the revocation is kept; default
	// server.revocation_ttl. It must outlive the tokens it covers.
	TTL string `json:"ttl"`
}

const maxRevocationTTL = 30 * 24 * time.Hour

var sha256Hex = regexp.MustCompile(`^[0-9a-f]{64}$`)

// adminHandler serves the admin API, authenticated with a bearer token
// compared in constant time. The token and the issuers jti and sub
// revocations name are the ones in force: both change with a reload.
//
// It is mounted whether or not a token is configured, so that a token added
// by a reload turns it on (and one removed turns it off) without a restart.
func adminHandler(lv *live, dl *cache.Denylist) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /admin/revoke", func(w http.ResponseWriter, r *http.Request) {
		want := lv.adminToken.Load()
		if want == nil {
			adminError(w, http.StatusNotFound, "the admin API is off: no admin token is configured (server.admin_token_file or server.admin_token_env)")
			return
		}
		got, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		sum := sha256.Sum256([]byte(got))
		if subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="tokenauthz-admin"`)
			adminError(w, http.StatusUnauthorized, "a valid admin token is required")
			return
		}
		var req revokeRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 16<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			adminError(w, http.StatusBadRequest, "body: "+err.Error())
			return
		}
		rev, err := req.revocation(*lv.issuers.Load())
		if err != nil {
			adminError(w, http.StatusBadRequest, err.Error())
			return
		}
		ttl := time.Duration(lv.revocationTTL.Load())
		if req.TTL != "" {
			if ttl, err = time.ParseDuration(req.TTL); err != nil || ttl <= 0 || ttl > maxRevocationTTL {
				adminError(w, http.StatusBadRequest, fmt.Sprintf("ttl: a duration between 1s and %s", maxRevocationTTL))
				return
			}
		}
		if err := dl.Revoke(r.Context(), rev, ttl); err != nil {
			adminError(w, http.StatusServiceUnavailable, err.Error())
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"revoked": strings.ToLower(strings.TrimPrefix(rev.GetKind().String(), "KIND_")),
			"until":   time.Now().Add(ttl).UTC().Format(time.RFC3339),
		})
	})
	return mux
}

func (req *revokeRequest) revocation(issuers map[string]string) (*cachev1.Revocation, error) {
	set := 0
	for _, v := range []string{req.TokenSHA256, req.JTI, req.Sub} {
		if v != "" {
			set++
		}
	}
	if set != 1 {
		return nil, fmt.Errorf("name exactly one of token_sha256, jti, sub")
	}
	r := &cachev1.Revocation{RevokedUnix: time.Now().Unix()}
	if req.TokenSHA256 != "" {
		if !sha256Hex.MatchString(req.TokenSHA256) {
			return nil, fmt.Errorf("token_sha256: 64 lower-case hex digits (sha256sum of the token)")
		}
		r.Kind, r.Id = cachev1.Revocation_KIND_TOKEN, req.TokenSHA256
		return r, nil
	}
	iss, ok := issuers[req.Issuer]
	if !ok {
		return nil, fmt.Errorf("issuer: %q is not a configured issuer name", req.Issuer)
	}
	if req.JTI != "" {
		r.Kind, r.Id = cachev1.Revocation_KIND_JTI, cache.Hash(iss, req.JTI)
	} else {
		r.Kind, r.Id = cachev1.Revocation_KIND_SUBJECT, cache.Hash(iss, req.Sub)
	}
	return r, nil
}

// live is what a reload changes besides the policy and the verifier: the
// admin token (its SHA-256; nil with none) and the issuers' names and
// issuer URLs, which revocations by jti and sub are keyed by.
type live struct {
	adminToken    atomic.Pointer[[32]byte]
	issuers       atomic.Pointer[map[string]string]
	revocationTTL atomic.Int64 // the default, as a time.Duration
}

func (lv *live) set(cfg *fileConfig, adminToken []byte) {
	if adminToken != nil {
		sum := sha256.Sum256(adminToken)
		lv.adminToken.Store(&sum)
	} else {
		lv.adminToken.Store(nil)
	}
	issuers := map[string]string{}
	for _, is := range cfg.Issuers {
		issuers[is.Name] = is.Issuer
	}
	lv.issuers.Store(&issuers)
	lv.revocationTTL.Store(int64(cfg.withDefaults().Server.RevocationTTL))
}

func adminError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": msg})
}
