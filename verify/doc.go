// Package verify checks bearer tokens against configured issuers.
//
// It owns the JWT rules (strict compact parsing, the per-issuer algorithm
// allowlist, iss/aud/exp/nbf/iat with leeway, required claims, RFC 9068 token
// types) and the issuers' keys: JWKS URLs, OIDC discovery, inline or file key
// sets and HMAC secrets, fetched with size limits and timeouts, refreshed in
// the background, and served stale within a bound when the issuer is down.
//
// It never fetches keys named by the token (jku, x5u, jwk, x5c) and never
// accepts alg none. It does not decide whether a request may pass: that is
// the authz package, which maps this package's *Error kinds to responses.
package verify
